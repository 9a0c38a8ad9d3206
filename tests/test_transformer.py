"""Tests of the transformer policy: cached decoding, causality, jit, vmap, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hi_jax.policy import fork_cache
from hi_jax.transformer import TransformerConfig, TransformerPolicy

V, T = 5, 5
CONFIG = TransformerConfig(
    vocab_size=V, response_length=T, width=16, depth=2, num_heads=2,
    mlp_ratio=2, prompt=(1, 3))

# Float32 tolerance for the same logits computed by two code paths.
ATOL32 = 1e-5


# Jitted entry points shared by the tests, so each shape compiles once.
logits_fn = jax.jit(lambda policy, tokens: policy.logits(tokens))
prefill_fn = jax.jit(lambda policy, tokens: policy.prefill(tokens))
decode_step_fn = jax.jit(lambda policy, cache, tokens, position:
                         policy.decode_step(cache, tokens, position))


def random_policy(config=CONFIG, seed=0, scale=0.5):
    """A policy whose parameters are all normal with standard deviation `scale`.

    The default initialisation gives nearly uniform logits, which would let
    a wrong cache pass a tolerance check, so the tests use larger weights.
    The parameters come from numpy with the shapes and dtypes of `init`, so
    no initialisation has to compile.
    """
    shapes = jax.eval_shape(lambda key: TransformerPolicy.init(key, config),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), shapes)


def random_tokens(seed, batch=3, length=T, vocab=V):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


def decode_from(policy, cache, tokens, start):
    """Feeds tokens[:, start:] one at a time to `decode_step`.

    Returns the logits of y_{start+1} ... y_{T-1}, float [B, T - 1 - start, V].
    """
    outputs = []
    for position in range(start, policy.response_length):
        logits, cache = decode_step_fn(policy, cache, tokens[:, position], position)
        outputs.append(logits)
    # The logits after y_{T-1} are meaningless and dropped.
    return jnp.stack(outputs, axis=1)[:, :-1]


# Cached decoding -------------------------------------------------------------


def test_prefill_logits_equal_logits():
    policy = random_policy()
    tokens = random_tokens(1)
    logits, _ = prefill_fn(policy, tokens)
    np.testing.assert_array_equal(logits, logits_fn(policy, tokens))
    assert logits.shape == (3, T, V)


def test_cache_shapes():
    policy = random_policy()
    _, cache = prefill_fn(policy, random_tokens(1))
    assert len(cache) == CONFIG.depth
    slots = 1 + len(CONFIG.prompt) + T
    for layer in cache:
        assert set(layer) == {"key", "value"}
        assert layer["key"].shape == (3, 2, slots, 8)
        assert layer["value"].shape == (3, 2, slots, 8)


@pytest.mark.parametrize("start", range(T))
def test_cached_decode_matches_logits(start):
    policy = random_policy()
    tokens = random_tokens(1)
    expected = logits_fn(policy, tokens)

    # Tokens at positions >= start in the prefill differ from the decoded
    # ones, so the check fails if decoding reads a stale cache slot.
    stale = tokens.at[:, start:].set(random_tokens(2)[:, start:])
    prefill_logits, cache = prefill_fn(policy, stale)
    np.testing.assert_allclose(prefill_logits[:, :start + 1], expected[:, :start + 1],
                               atol=ATOL32, rtol=0)

    decoded = decode_from(policy, cache, tokens, start)
    assert decoded.shape == (3, T - 1 - start, V)
    np.testing.assert_allclose(decoded, expected[:, start + 1:], atol=ATOL32, rtol=0)


def test_decode_from_dummy_prefill():
    policy = random_policy(seed=3)
    tokens = random_tokens(4)
    expected = logits_fn(policy, tokens)

    first_logits, cache = prefill_fn(policy, jnp.zeros_like(tokens))
    np.testing.assert_allclose(first_logits[:, 0], expected[:, 0], atol=ATOL32, rtol=0)
    decoded = decode_from(policy, cache, tokens, 0)
    np.testing.assert_allclose(decoded, expected[:, 1:], atol=ATOL32, rtol=0)


def test_decode_without_prompt():
    config = TransformerConfig(vocab_size=V, response_length=T, width=16, depth=1,
                               num_heads=4)
    policy = random_policy(config, seed=5)
    tokens = random_tokens(6)
    expected = logits_fn(policy, tokens)
    _, cache = prefill_fn(policy, jnp.zeros_like(tokens))
    decoded = decode_from(policy, cache, tokens, 0)
    np.testing.assert_allclose(decoded, expected[:, 1:], atol=ATOL32, rtol=0)


def test_decode_at_last_position_is_finite():
    policy = random_policy()
    tokens = random_tokens(1)
    _, cache = prefill_fn(policy, tokens)
    logits, cache = decode_step_fn(policy, cache, tokens[:, T - 1], T - 1)
    assert logits.shape == (3, V)
    assert bool(jnp.isfinite(logits).all())


def test_eager_and_jitted_decode_agree():
    policy = random_policy()
    tokens = random_tokens(1)
    _, cache = prefill_fn(policy, tokens)
    eager, _ = policy.decode_step(cache, tokens[:, 2], 2)
    traced, _ = decode_step_fn(policy, cache, tokens[:, 2], jnp.asarray(2))
    np.testing.assert_allclose(eager, traced, atol=ATOL32, rtol=0)


def test_decode_loop_under_scan():
    policy = random_policy()
    tokens = random_tokens(1)
    expected = logits_fn(policy, tokens)
    _, cache = prefill_fn(policy, jnp.zeros_like(tokens))

    def step(cache, inputs):
        token, position = inputs
        logits, cache = policy.decode_step(cache, token, position)
        return cache, logits

    @jax.jit
    def decode_all(cache):
        _, logits = jax.lax.scan(step, cache, (tokens.T, jnp.arange(T)))
        return logits  # [T, B, V]

    decoded = jnp.moveaxis(decode_all(cache), 0, 1)[:, :-1]
    np.testing.assert_allclose(decoded, expected[:, 1:], atol=ATOL32, rtol=0)


# vmap and fork_cache ------------------------------------------------------------


def test_vmap_over_positions():
    policy = random_policy()
    tokens = random_tokens(1)
    _, cache = prefill_fn(policy, tokens)
    positions = jnp.arange(T)
    step_tokens = random_tokens(7, batch=T, length=3)  # [positions, B]

    batched_logits, batched_cache = jax.jit(jax.vmap(
        policy.decode_step, in_axes=(None, 0, 0)))(cache, step_tokens, positions)
    for i in range(T):
        logits, single_cache = decode_step_fn(policy, cache, step_tokens[i], i)
        np.testing.assert_allclose(batched_logits[i], logits, atol=ATOL32, rtol=0)
        for batched, single in zip(jax.tree.leaves(batched_cache),
                                   jax.tree.leaves(single_cache)):
            np.testing.assert_allclose(batched[i], single, atol=ATOL32, rtol=0)


def test_vmap_over_caches_and_positions():
    policy = random_policy()
    tokens = random_tokens(1, batch=4)  # each row becomes its own batch of 1
    expected = logits_fn(policy, tokens)
    _, cache = prefill_fn(policy, tokens)
    per_row_cache = jax.tree.map(lambda x: x[:, None], cache)
    positions = jnp.array([0, 1, 3, 2])

    def step(row_cache, row_tokens, position):
        return policy.decode_step(row_cache, row_tokens[position][None], position)

    logits, _ = jax.jit(jax.vmap(step))(per_row_cache, tokens, positions)
    for row, position in enumerate(positions):
        np.testing.assert_allclose(logits[row, 0], expected[row, position + 1],
                                   atol=ATOL32, rtol=0)


def test_forked_cache_decodes_each_copy():
    policy = random_policy()
    tokens = random_tokens(1, batch=2)
    _, cache = prefill_fn(policy, tokens)
    forked = fork_cache(cache, 3)
    logits, _ = decode_step_fn(policy, forked, jnp.repeat(tokens[:, 1], 3), 1)
    expected = jnp.repeat(logits_fn(policy, tokens)[:, 2], 3, axis=0)
    np.testing.assert_allclose(logits, expected, atol=ATOL32, rtol=0)


# Causality and the prompt ---------------------------------------------------------


@pytest.mark.parametrize("position", range(T))
def test_logits_ignore_later_tokens(position):
    policy = random_policy()
    tokens = random_tokens(1)
    changed = tokens.at[:, position:].set((tokens[:, position:] + 1) % V)
    before, after = logits_fn(policy, tokens), logits_fn(policy, changed)
    np.testing.assert_allclose(after[:, :position + 1], before[:, :position + 1],
                               atol=ATOL32, rtol=0)
    if position + 1 < T:
        # The check above could pass with constant logits, so later ones must move.
        change = jnp.abs(after[:, position + 1:] - before[:, position + 1:])
        assert float(change.max()) > 1e-3


@jax.jit
def position_embed_grad(policy, tokens, position):
    """Gradient of logits[:, position].sum() w.r.t. the position embedding: [max_len, D]."""
    def logits_at(table):
        params = dict(policy.params, position_embed=table)
        return policy.replace_params(params).logits(tokens)[:, position].sum()

    return jax.grad(logits_at)(policy.params["position_embed"])


@pytest.mark.parametrize("position", range(T))
def test_causality_by_gradient(position):
    # Slot j of the position embedding enters only the input at slot j, so
    # the logits of y_t, read at slot L0 - 1 + t, have zero gradient for
    # every later slot.
    policy = random_policy()
    query_slot = len(CONFIG.prompt) + position
    grad = position_embed_grad(policy, random_tokens(1), position)
    row_norms = jnp.abs(grad).sum(axis=1)
    np.testing.assert_array_equal(row_norms[query_slot + 1:], 0.0)
    assert float(row_norms[query_slot]) > 0.0
    assert float(row_norms[0]) > 0.0


def test_prompt_changes_logits():
    policy = random_policy()
    other_config = TransformerConfig(
        vocab_size=V, response_length=T, width=16, depth=2, num_heads=2,
        mlp_ratio=2, prompt=(4, 0))
    other = TransformerPolicy(policy.params, other_config)
    tokens = random_tokens(1)
    difference = jnp.abs(logits_fn(policy, tokens) - logits_fn(other, tokens))
    # Every position attends to the prompt, so every logit vector changes.
    assert float(difference.max(axis=-1).min()) > 1e-3


# Pytree, jit and gradients -----------------------------------------------------


def test_policy_is_pytree_of_params():
    policy = random_policy()
    leaves, treedef = jax.tree.flatten(policy)
    assert len(leaves) == len(jax.tree.leaves(policy.params))
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, TransformerPolicy)
    assert rebuilt.config == CONFIG
    assert policy.num_params() == sum(x.size for x in leaves)


def test_no_recompile_for_new_params():
    traces = []

    @jax.jit
    def counted_logits(policy, tokens):
        traces.append(1)
        return policy.logits(tokens)

    tokens = random_tokens(1)
    first = counted_logits(random_policy(seed=0), tokens)
    second = counted_logits(random_policy(seed=1), tokens)
    assert len(traces) == 1
    assert counted_logits._cache_size() == 1
    assert float(jnp.abs(first - second).max()) > 1e-3


def test_grad_has_params_structure():
    policy = random_policy()
    tokens = random_tokens(1)
    grads = jax.jit(jax.grad(lambda pol: pol.sequence_log_prob(tokens).sum()))(policy)
    assert isinstance(grads, TransformerPolicy)
    assert jax.tree.structure(grads.params) == jax.tree.structure(policy.params)
    for grad, param in zip(jax.tree.leaves(grads.params), jax.tree.leaves(policy.params)):
        assert grad.shape == param.shape
        assert grad.dtype == param.dtype
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads.params))


# Dtypes ---------------------------------------------------------------------------


def test_float64_decode_matches_logits():
    with jax.enable_x64(True):
        policy = random_policy()
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(policy.params))
        tokens = random_tokens(1)
        expected = logits_fn(policy, tokens)
        assert expected.dtype == jnp.float64
        _, cache = prefill_fn(policy, jnp.zeros_like(tokens))
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(cache))
        decoded = decode_from(policy, cache, tokens, 0)
        np.testing.assert_allclose(decoded, expected[:, 1:], atol=1e-12, rtol=0)


def init_dtypes(config):
    shapes = jax.eval_shape(lambda key: TransformerPolicy.init(key, config),
                            jax.random.key(0))
    return {x.dtype for x in jax.tree.leaves(shapes)}


def test_default_dtype_follows_x64():
    with jax.enable_x64(False):
        assert init_dtypes(CONFIG) == {jnp.dtype(jnp.float32)}
    with jax.enable_x64(True):
        assert init_dtypes(CONFIG) == {jnp.dtype(jnp.float64)}


def test_bfloat16_config():
    config = TransformerConfig(vocab_size=V, response_length=T, width=16, depth=1,
                               num_heads=2, dtype="bfloat16")
    assert init_dtypes(config) == {jnp.dtype(jnp.bfloat16)}
    logits = logits_fn(random_policy(config), random_tokens(1))
    assert logits.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(logits).all())


def test_init_gives_small_finite_params():
    policy = TransformerPolicy.init(jax.random.key(0), CONFIG)
    leaves = jax.tree.leaves(policy.params)
    assert all(x.dtype == jnp.result_type(float) for x in leaves)
    assert all(bool(jnp.isfinite(x).all()) for x in leaves)
    # Kernels and embeddings are normal(0.02), LayerNorm scales are ones.
    kernel = policy.params["block_0"]["mlp"]["hidden"]["kernel"]
    assert 0.01 < float(kernel.std()) < 0.03
    np.testing.assert_array_equal(policy.params["final_norm"]["scale"], 1.0)


def test_float64_config_needs_x64():
    config = TransformerConfig(vocab_size=V, response_length=T, width=16, depth=1,
                               num_heads=2, dtype="float64")
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
        TransformerPolicy.init(jax.random.key(0), config)


# Config and input checks ------------------------------------------------------------


def test_config_normalises_prompt_and_max_len():
    config = TransformerConfig(vocab_size=4, response_length=3, prompt=[np.int64(2), 0])
    assert config.prompt == (2, 0)
    assert isinstance(config.prompt[0], int)
    assert config.max_len == 6
    assert config.prefix_length == 3
    assert config.num_slots == 6
    assert hash(config) == hash(TransformerConfig(vocab_size=4, response_length=3,
                                                  prompt=(2, 0), max_len=6))


def test_longer_max_len_decodes():
    config = TransformerConfig(vocab_size=V, response_length=T, width=16, depth=1,
                               num_heads=2, prompt=(2,), max_len=20)
    policy = random_policy(config)
    assert policy.params["position_embed"].shape == (20, 16)
    tokens = random_tokens(1)
    expected = logits_fn(policy, tokens)
    _, cache = prefill_fn(policy, jnp.zeros_like(tokens))
    decoded = decode_from(policy, cache, tokens, 0)
    np.testing.assert_allclose(decoded, expected[:, 1:], atol=ATOL32, rtol=0)


@pytest.mark.parametrize("field, value, shown", [
    ("vocab_size", 1, "got 1"),
    ("vocab_size", 2.0, "got 2.0"),
    ("response_length", 0, "got 0"),
    ("width", 0, "got 0"),
    ("depth", 0, "got 0"),
    ("num_heads", 0, "got 0"),
    ("num_heads", 3, "divisible by num_heads=3; got width=8"),
    ("mlp_ratio", 0, "got 0"),
    ("max_len", 4, "got 4"),
    ("prompt", (0, 5), "got 5"),
    ("prompt", (-1,), "got -1"),
    ("prompt", (True,), "got True"),
    ("prompt", "ab", "got the string 'ab'"),
    ("prompt", 3, "got 3"),
    ("dtype", "int32", "got 'int32'"),
])
def test_config_rejects_invalid_field(field, value, shown):
    kwargs = dict(vocab_size=5, response_length=3, width=8, depth=1, num_heads=2,
                  prompt=(1,))
    kwargs[field] = value
    with pytest.raises(ValueError, match=field) as error:
        TransformerConfig(**kwargs)
    assert shown in str(error.value)


def test_rejects_wrong_token_shapes():
    policy = random_policy()
    with pytest.raises(ValueError, match=r"\[B, T\] with T=5"):
        policy.logits(jnp.zeros((2, T + 1), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        policy.prefill(jnp.zeros((T,), jnp.int32))
    _, cache = prefill_fn(policy, random_tokens(1))
    with pytest.raises(ValueError, match=r"\[B\]"):
        policy.decode_step(cache, jnp.zeros((3, 1), jnp.int32), 0)


def test_rejects_position_out_of_range():
    policy = random_policy()
    _, cache = prefill_fn(policy, random_tokens(1))
    with pytest.raises(ValueError, match=r"position must be in \[0, 4\]; got 5"):
        policy.decode_step(cache, jnp.zeros((3,), jnp.int32), T)
