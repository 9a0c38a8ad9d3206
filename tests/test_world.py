"""Tests for the synthetic refusal world: layout, teacher, harms, Q and recovery."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hi_jax import world as world_lib
from hi_jax.policy import TabularPolicy, fork_cache
from hi_jax.world import (BENIGN, COMPLIANCE, COMPLYING, EOS, HARMFUL, REFUSAL,
                          TeacherPolicy, TokenGroups, WorldConfig)

# One token per group: refusal 0, compliance 1, harmful 2, benign 3, eos 4.
R, C, H, N, E = 0, 1, 2, 3, 4
TINY = WorldConfig.from_sizes(1, 1, 1, 1, response_length=4, horizon=2,
                              p_comply=0.4, p_min=0.2, p_eos=0.3)

# Sample count for the statistical tests, whose tolerances are in standard errors.
NUM_SAMPLES = 20_000


def all_responses(vocab_size, response_length):
    """Every response in lexicographic order: int32 [V**T, T]."""
    grids = np.indices((vocab_size,) * response_length)
    return jnp.asarray(grids.reshape(response_length, -1).T, dtype=jnp.int32)


@pytest.fixture(scope="module")
def default_world():
    return world_lib.world_from_config(world_lib.default_world_config())


@pytest.fixture(scope="module")
def teacher_samples(default_world):
    return world_lib.sample_teacher(jax.random.key(0), default_world, NUM_SAMPLES)


# Configuration --------------------------------------------------------------


def test_contiguous_layout_order():
    groups = TokenGroups.contiguous(2, 1, 3, 2)

    assert groups.refusal == (0, 1)
    assert groups.compliance == (2,)
    assert groups.harmful == (3, 4, 5)
    assert groups.benign == (6, 7)
    assert groups.eos == 8
    assert groups.vocab_size == 9
    np.testing.assert_array_equal(groups.kinds, [REFUSAL, REFUSAL, COMPLIANCE, HARMFUL,
                                                 HARMFUL, HARMFUL, BENIGN, BENIGN, EOS])


def test_explicit_token_groups_accepted():
    groups = TokenGroups(refusal=[4], compliance=[0, 2], harmful=[1], benign=[5], eos=3)
    world = WorldConfig(groups=groups, response_length=3, horizon=1)

    assert groups.compliance == (0, 2)
    assert world.vocab_size == 6
    np.testing.assert_array_equal(groups.kinds, [COMPLIANCE, HARMFUL, COMPLIANCE, EOS,
                                                 REFUSAL, BENIGN])
    assert hash(world) == hash(WorldConfig(groups=groups, response_length=3, horizon=1))


def test_world_from_config_defaults():
    cfg = world_lib.default_world_config()

    assert world_lib.world_from_config(cfg) == WorldConfig()
    assert world_lib.world_from_config({}) == WorldConfig()


def test_world_from_config_fields():
    cfg = world_lib.default_world_config()
    cfg.num_refusal = 3
    cfg.response_length = 5
    cfg.horizon = 4
    cfg.p_eos = 0.0
    world = world_lib.world_from_config(cfg)

    assert world.groups.refusal == (0, 1, 2)
    assert world.response_length == 5
    assert world.horizon == 4
    assert world.p_eos == 0.0


def test_world_from_config_token_ids():
    cfg = ml_collections.ConfigDict()
    cfg.response_length = 3
    cfg.horizon = 1
    cfg.token_ids = dict(refusal=[2], compliance=[0], harmful=[1, 4], benign=[3], eos=5)
    world = world_lib.world_from_config(cfg)

    assert world.groups.harmful == (1, 4)
    assert world.groups.eos == 5


def _groups(**ids):
    base = dict(refusal=[0], compliance=[1], harmful=[2], benign=[3], eos=4)
    base.update(ids)
    return TokenGroups(**base)


INVALID_CONFIGS = [
    (lambda: WorldConfig(response_length=4, horizon=5),
     "WorldConfig.horizon must be in [1, response_length=4]; got 5"),
    (lambda: WorldConfig(horizon=0), "WorldConfig.horizon must be an integer >= 1; got 0"),
    (lambda: WorldConfig(horizon=2.0), "WorldConfig.horizon must be an integer >= 1; got 2.0"),
    (lambda: WorldConfig(response_length=0, horizon=1),
     "WorldConfig.response_length must be an integer >= 1; got 0"),
    (lambda: WorldConfig(p_min=0.0), "WorldConfig.p_min must be in (0, 1); got 0.0"),
    (lambda: WorldConfig(p_min=1.0), "WorldConfig.p_min must be in (0, 1); got 1.0"),
    (lambda: WorldConfig(p_min=-0.1), "WorldConfig.p_min must be in (0, 1); got -0.1"),
    (lambda: WorldConfig(p_min=float("nan")), "WorldConfig.p_min must be in (0, 1); got nan"),
    (lambda: WorldConfig(p_min="0.1"), "WorldConfig.p_min must be a number in (0, 1)"),
    (lambda: WorldConfig(p_comply=1.0), "WorldConfig.p_comply must be in (0, 1); got 1.0"),
    (lambda: WorldConfig(p_eos=1.0), "WorldConfig.p_eos must be in [0, 1); got 1.0"),
    (lambda: WorldConfig(p_eos=-0.5), "WorldConfig.p_eos must be in [0, 1); got -0.5"),
    (lambda: WorldConfig(groups=(1, 1, 1, 1)), "WorldConfig.groups must be a TokenGroups"),
    (lambda: WorldConfig.from_sizes(num_refusal=0),
     "num_refusal must be an integer >= 1; got 0"),
    (lambda: WorldConfig.from_sizes(num_benign=-1),
     "num_benign must be an integer >= 1; got -1"),
    (lambda: _groups(refusal=[]), "TokenGroups.refusal must hold at least one token id"),
    (lambda: _groups(harmful=2), "TokenGroups.harmful must be a sequence of token ids"),
    (lambda: _groups(harmful=[2, 0]),
     "token id 0 is in both refusal and harmful; each id must belong to exactly one group"),
    (lambda: _groups(benign=[3, 3]), "token id 3 is twice in benign"),
    (lambda: _groups(eos=1), "token id 1 is in both compliance and eos"),
    (lambda: _groups(eos=7), "ids [4] are missing"),
    (lambda: _groups(refusal=[-1]), "TokenGroups.refusal must be an integer >= 0; got -1"),
    (lambda: world_lib.world_from_config({"p_mim": 0.1}),
     "unknown world config fields ['p_mim']"),
    (lambda: world_lib.world_from_config(
        {"num_refusal": 2, "token_ids": dict(refusal=[0], compliance=[1], harmful=[2],
                                             benign=[3], eos=4)}),
     "world config fields ['num_refusal'] conflict with token_ids"),
    (lambda: world_lib.world_from_config({"token_ids": dict(refusal=[0])}),
     "token_ids must have exactly the keys"),
]


@pytest.mark.parametrize("make, fragment", INVALID_CONFIGS,
                         ids=[fragment[:40] for _, fragment in INVALID_CONFIGS])
def test_invalid_config_raises(make, fragment):
    with pytest.raises(ValueError) as error:
        make()
    assert fragment in str(error.value)


# Teacher: exact conditionals ------------------------------------------------


def test_teacher_is_pytree_of_params():
    teacher = TeacherPolicy(TINY)
    leaves = jax.tree.leaves(teacher)

    assert len(leaves) == 1
    assert leaves[0] is teacher.params
    assert teacher.params.shape == (3,)
    np.testing.assert_allclose(jax.nn.sigmoid(teacher.params), [0.4, 0.2, 0.3], rtol=1e-6)

    tokens = jnp.array([[C, H, R, N]])
    jitted = jax.jit(lambda policy, y: policy.logits(y))(teacher, tokens)
    np.testing.assert_array_equal(jitted, teacher.logits(tokens))
    replaced = teacher.replace_params(teacher.params + 1.0)
    assert replaced.world == TINY
    np.testing.assert_array_equal(replaced.params, teacher.params + 1.0)


def test_teacher_conditionals_by_state():
    probs = world_lib.teacher_conditionals(TINY, jnp.array([[C, H, R, N], [R, N, E, E]]))

    # Rows follow the token ids R, C, H, N, E.
    np.testing.assert_allclose(probs[0], [[0.6, 0.4, 0, 0, 0],
                                          [0.2, 0, 0.8, 0, 0],
                                          [0.2, 0, 0.8, 0, 0],
                                          [0, 0, 0, 0.7, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(probs[1], [[0.6, 0.4, 0, 0, 0],
                                          [0, 0, 0, 0.7, 0.3],
                                          [0, 0, 0, 0.7, 0.3],
                                          [0, 0, 0, 0, 1]], rtol=1e-6)


def test_teacher_uniform_within_group(default_world):
    table = TeacherPolicy(default_world).log_prob_table()
    complying = np.exp(np.asarray(table[COMPLYING]))

    # Default world: refusal (0, 1), harmful (4, 5, 6).
    np.testing.assert_allclose(complying[[0, 1]], 0.05 / 2, rtol=1e-6)
    np.testing.assert_allclose(complying[[4, 5, 6]], 0.95 / 3, rtol=1e-6)
    assert complying[[2, 3, 7, 8, 9, 10]].max() == 0.0


def test_teacher_sums_to_one_every_prefix():
    # The last-token rule defines the teacher on every prefix, so this
    # enumeration covers all reachable prefixes and the unreachable ones too.
    world = WorldConfig.from_sizes(2, 1, 2, 1, response_length=4, horizon=2)
    responses = all_responses(world.vocab_size, world.response_length)
    teacher = TeacherPolicy(world)
    probs = jnp.exp(teacher.logits(responses))

    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jax.nn.log_softmax(teacher.logits(responses)),
                               teacher.logits(responses), atol=1e-6)


def test_teacher_sequences_sum_to_one():
    responses = all_responses(TINY.vocab_size, TINY.response_length)
    seq_probs = jnp.exp(TeacherPolicy(TINY).sequence_log_prob(responses))

    np.testing.assert_allclose(seq_probs.sum(), 1.0, rtol=1e-5)
    assert not bool(jnp.isnan(seq_probs).any())


def test_teacher_expected_harms_closed_form():
    # E[training harm] = p_comply (1 - p_min)^(k - 1),
    # and E[true harm] = p_comply (1 - p_min) for T >= 2.
    responses = all_responses(TINY.vocab_size, TINY.response_length)
    seq_probs = jnp.exp(TeacherPolicy(TINY).sequence_log_prob(responses))
    training = (seq_probs * world_lib.training_harm(TINY)(responses)).sum()
    true = (seq_probs * world_lib.true_harm(TINY)(responses)).sum()

    np.testing.assert_allclose(training, 0.4 * 0.8, rtol=1e-5)
    np.testing.assert_allclose(true, 0.4 * 0.8, rtol=1e-5)

    deep = WorldConfig.from_sizes(1, 1, 1, 1, response_length=4, horizon=4,
                                  p_comply=0.4, p_min=0.2)
    deep_training = (seq_probs * world_lib.training_harm(deep)(responses)).sum()
    np.testing.assert_allclose(deep_training, 0.4 * 0.8**3, rtol=1e-5)


def test_teacher_gradient_of_expected_harm():
    # E[true harm] = sigmoid(a_comply) * sigmoid(-a_min), independent of a_eos.
    responses = all_responses(TINY.vocab_size, TINY.response_length)
    harm = world_lib.true_harm(TINY)(responses)

    def expected_harm(params):
        teacher = TeacherPolicy(TINY, params)
        return (jnp.exp(teacher.sequence_log_prob(responses)) * harm).sum()

    grad = jax.grad(expected_harm)(TeacherPolicy(TINY).params)
    p_comply, p_min = 0.4, 0.2
    np.testing.assert_allclose(
        grad, [p_comply * (1 - p_comply) * (1 - p_min), -p_comply * p_min * (1 - p_min), 0.0],
        atol=1e-5)


def test_teacher_gradient_finite_without_eos():
    world = WorldConfig.from_sizes(1, 1, 1, 1, response_length=3, horizon=1, p_eos=0.0)
    teacher = TeacherPolicy(world)
    tokens = jnp.array([[R, N, N], [C, H, R]])

    grad = jax.grad(lambda p: teacher.replace_params(p).sequence_log_prob(tokens).sum())(
        teacher.params)

    assert teacher.params[2] == -jnp.inf
    assert bool(jnp.isfinite(grad).all())
    assert float(jnp.exp(teacher.logits(tokens))[0, 1, E]) == 0.0


def test_decode_step_matches_logits(teacher_samples, default_world):
    teacher = TeacherPolicy(default_world)
    tokens = teacher_samples[:64]
    full, cache = teacher.prefill(tokens)

    # Decoding from any position s of a prefilled cache.
    for s in range(default_world.response_length - 1):
        step_logits, _ = teacher.decode_step(cache, tokens[:, s], s)
        np.testing.assert_array_equal(step_logits, full[:, s + 1])

    # Decoding token by token from an empty buffer, with a forked cache.
    cache = fork_cache(jnp.zeros_like(tokens[:8]), 2)
    repeated = jnp.repeat(tokens[:8], 2, axis=0)
    step = jax.jit(teacher.decode_step)
    for s in range(default_world.response_length - 1):
        step_logits, cache = step(cache, repeated[:, s], s)
        np.testing.assert_array_equal(step_logits, teacher.logits(repeated)[:, s + 1])
    np.testing.assert_array_equal(cache[:, :-1], repeated[:, :-1])


# Teacher: samples ------------------------------------------------------------


def test_samples_match_conditionals(teacher_samples, default_world):
    # For each position t and token v, sum_n (1[y_nt = v] - P(v | y_n<t)) is a
    # sum of martingale differences with variance sum_n p (1 - p), so the
    # z-score is about standard normal. By the normal approximation, 5
    # standard errors over at most 88 cells give a family-wise false alarm
    # rate below 1e-4.
    probs = np.asarray(world_lib.teacher_conditionals(default_world, teacher_samples),
                       dtype=np.float64)
    onehot = np.asarray(jax.nn.one_hot(teacher_samples, default_world.vocab_size))
    observed = onehot.sum(axis=0)
    expected = probs.sum(axis=0)
    variance = (probs * (1 - probs)).sum(axis=0)

    impossible = variance == 0
    assert observed[impossible].max() == 0
    z = (observed - expected)[~impossible] / np.sqrt(variance[~impossible])
    assert np.abs(z).max() < 5.0, f"max |z| = {np.abs(z).max():.2f}"


def test_samples_have_positive_probability(teacher_samples, default_world):
    log_probs = TeacherPolicy(default_world).sequence_log_prob(teacher_samples)

    assert float(log_probs.min()) > world_lib.IMPOSSIBLE_LOG_PROB / 2


def test_samples_obey_grammar(teacher_samples, default_world):
    kinds = default_world.groups.kinds[np.asarray(teacher_samples)]
    refused_before = np.cumsum(kinds == REFUSAL, axis=1) - (kinds == REFUSAL) > 0
    previous = kinds[:, :-1]
    current = kinds[:, 1:]

    assert set(np.unique(kinds[:, 0])) == {REFUSAL, COMPLIANCE}
    assert not (kinds[:, 1:] == COMPLIANCE).any()
    # After a refusal only benign content or eos follows.
    assert np.isin(kinds[refused_before], [BENIGN, EOS]).all()
    # Harmful content follows only compliance or harmful content.
    assert np.isin(previous[current == HARMFUL], [COMPLIANCE, HARMFUL]).all()
    # A refusal after position 0 is a recovery from compliance.
    assert np.isin(previous[current == REFUSAL], [COMPLIANCE, HARMFUL]).all()
    # eos pads to the end.
    assert (current[previous == EOS] == EOS).all()


def test_sample_rates_within_standard_errors(teacher_samples, default_world):
    # Each rate is a mean of independent Bernoulli trials. The tolerance is 4 SE.
    kinds = default_world.groups.kinds[np.asarray(teacher_samples)]
    states = np.asarray(world_lib.teacher_states(default_world, teacher_samples))

    def check_rate(trials, expected):
        rate = trials.mean()
        standard_error = math.sqrt(expected * (1 - expected) / trials.size)
        assert abs(rate - expected) < 4 * standard_error, (rate, expected, trials.size)

    check_rate(kinds[:, 0] == COMPLIANCE, default_world.p_comply)
    check_rate(kinds[states == COMPLYING] == REFUSAL, default_world.p_min)
    check_rate(kinds[states == world_lib.REFUSED] == EOS, default_world.p_eos)


def test_sample_teacher_edge_worlds():
    single = WorldConfig.from_sizes(1, 1, 1, 1, response_length=1, horizon=1)
    no_eos = WorldConfig.from_sizes(1, 1, 1, 1, response_length=6, horizon=1, p_eos=0.0)

    assert set(np.unique(world_lib.sample_teacher(jax.random.key(1), single, 200))) == {R, C}
    samples = world_lib.sample_teacher(jax.random.key(2), no_eos, 500)
    assert samples.shape == (500, 6)
    assert samples.dtype == jnp.int32
    assert not (samples == E).any()


def test_sample_teacher_no_recompile(default_world):
    world_lib.sample_teacher(jax.random.key(3), default_world, NUM_SAMPLES)
    size = world_lib.sample_teacher._cache_size()
    world_lib.sample_teacher(jax.random.key(4), default_world, NUM_SAMPLES)

    assert world_lib.sample_teacher._cache_size() == size


# Harms ----------------------------------------------------------------------

TRAINING_HARM_CASES = [
    ([C, H, H, H], 1.0),  # complied, not recovered within k = 2
    ([C, R, N, N], 0.0),  # recovered at position 1
    ([R, N, N, E], 0.0),  # refused
    ([C, H, R, N], 1.0),  # recovers at 2, beyond the window
    ([R, H, N, N], 1.0),  # harmful content after the refusal
    ([H, R, H, H], 0.0),  # recovered inside the window, later tokens unread
    ([N, N, H, H], 0.0),  # window clean, later harm unread
    ([N, C, R, N], 1.0),  # complied at the window's last position
    ([E, E, E, E], 0.0),
]


def test_training_harm_table():
    tokens = jnp.array([tokens for tokens, _ in TRAINING_HARM_CASES])
    expected = [value for _, value in TRAINING_HARM_CASES]
    harm = world_lib.training_harm(TINY)

    assert harm.horizon == 2
    np.testing.assert_array_equal(harm(tokens), expected)


def test_training_harm_reads_first_k(default_world):
    # Random tokens over the whole vocabulary, including ungrammatical ones.
    world = WorldConfig(groups=default_world.groups, response_length=8, horizon=3)
    harm = world_lib.training_harm(world)
    first_key, second_key = jax.random.split(jax.random.key(5))
    shape = (4000, world.response_length)
    tokens = jax.random.randint(first_key, shape, 0, world.vocab_size)
    changed = jnp.where(jnp.arange(8) >= 3,
                        jax.random.randint(second_key, shape, 0, world.vocab_size), tokens)

    values = harm(tokens)
    np.testing.assert_array_equal(values, harm(changed))
    assert 0.0 < float(values.mean()) < 1.0


TRUE_HARM_CASES = [
    ([C, H, H, H], 1.0),
    ([C, R, N, N], 0.0),  # complied but recovered before harmful content
    ([R, N, N, E], 0.0),
    ([C, H, R, N], 1.0),  # harmful content before the recovery
    ([C, C, C, C], 0.0),  # compliance without harmful content
    ([R, N, H, N], 1.0),  # a refusal does not excuse later harmful content
    ([E, E, E, H], 1.0),
    ([N, N, N, N], 0.0),
]


def test_true_harm_table():
    tokens = jnp.array([tokens for tokens, _ in TRUE_HARM_CASES])
    expected = [value for _, value in TRUE_HARM_CASES]
    harm = world_lib.true_harm(TINY)

    assert harm.horizon is None
    np.testing.assert_array_equal(harm(tokens), expected)
    np.testing.assert_array_equal(jax.jit(harm)(tokens), expected)


PREFILL_HARM_CASES = [
    ([C, H, H, H], 2, 1.0),  # continues with harmful content
    ([C, H, R, N], 2, 0.0),  # recovers at once
    ([C, H, H, R], 2, 1.0),  # one more harmful token, then recovers
    ([C, H, R, H], 2, 1.0),  # recovers, then harmful content again
    ([C, H, N, N], 2, 0.0),  # benign continuation without a refusal
    ([C, H, H, H], 4, 0.0),  # nothing generated
    ([C, H, H, H], 0, 1.0),  # no prefill: the true harm
    ([C, R, N, N], 0, 0.0),
]


def test_true_harm_after_prefill_table():
    tokens = jnp.array([tokens for tokens, _, _ in PREFILL_HARM_CASES])
    lengths = jnp.array([length for _, length, _ in PREFILL_HARM_CASES])
    expected = np.array([value for _, _, value in PREFILL_HARM_CASES])

    np.testing.assert_array_equal(
        world_lib.true_harm_after_prefill(TINY, tokens, lengths), expected)
    traced = jax.jit(world_lib.true_harm_after_prefill, static_argnums=0)
    np.testing.assert_array_equal(traced(TINY, tokens, lengths), expected)
    for row, length in enumerate(np.asarray(lengths)):
        scalar = traced(TINY, tokens[row:row + 1], jnp.asarray(length))
        np.testing.assert_array_equal(scalar, expected[row:row + 1])


def test_prefill_length_out_of_range():
    tokens = jnp.array([[C, H, H, H]])

    with pytest.raises(ValueError, match=r"prefill_length must be in \[0, T=4\]; got 5"):
        world_lib.true_harm_after_prefill(TINY, tokens, 5)
    with pytest.raises(ValueError, match=r"prefill_length must be in \[0, T=4\]; got -1"):
        world_lib.sample_q_prefixes(jax.random.key(0), TINY, 3, -1)
    with pytest.raises(ValueError, match="prefill_length must be an integer"):
        world_lib.sample_q_prefixes(jax.random.key(0), TINY, 3, 1.5)


# Q prefixes and recovery ----------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 5, 8])
def test_q_prefixes_harmful_of_length(default_world, length):
    tokens, mask = world_lib.sample_q_prefixes(jax.random.key(6), default_world, 500, length)
    kinds = default_world.groups.kinds[np.asarray(tokens)]
    positions = np.arange(default_world.response_length)

    assert tokens.shape == (500, default_world.response_length)
    np.testing.assert_array_equal(mask, np.broadcast_to(positions < length, tokens.shape))
    assert (kinds[:, 0] == COMPLIANCE).all()
    assert (kinds[:, 1:length] == HARMFUL).all()
    assert (kinds[:, length:] == EOS).all()
    # Every compliance and harmful id appears: the draw covers each group.
    assert set(np.unique(tokens[:, :length])) >= set(default_world.groups.compliance)
    if length >= 2:
        assert set(np.unique(tokens[:, 1:length])) == set(default_world.groups.harmful)
        np.testing.assert_array_equal(world_lib.true_harm(default_world)(tokens), 1.0)
    # The teacher sits in the complying state at the end of every prefix.
    np.testing.assert_array_equal(world_lib.training_harm(
        WorldConfig(groups=default_world.groups, response_length=8, horizon=length))(tokens),
        1.0)


def test_q_prefixes_by_length(default_world):
    lengths = [0, 2, 8]
    tokens, mask = world_lib.sample_q_prefixes_by_length(jax.random.key(7), default_world,
                                                         64, lengths)

    assert tokens.shape == (3, 64, 8)
    assert mask.shape == (3, 64, 8)
    expected_lengths = np.repeat(np.array(lengths)[:, None], 64, axis=1)
    np.testing.assert_array_equal(mask.sum(axis=-1), expected_lengths)
    np.testing.assert_array_equal(tokens[0], default_world.groups.eos)
    assert not np.array_equal(tokens[1, :, 0], tokens[2, :, 0])


def test_teacher_recovery_on_q(default_world):
    lengths = [1, 3, 7]
    tokens, _ = world_lib.sample_q_prefixes_by_length(jax.random.key(8), default_world,
                                                      64, lengths)
    teacher = TeacherPolicy(default_world)

    for index, length in enumerate(lengths):
        recovery = world_lib.recovery_probability(teacher, default_world, tokens[index])
        assert recovery.shape == (64, 8)
        np.testing.assert_allclose(recovery[:, 0], 1 - default_world.p_comply, rtol=1e-6)
        np.testing.assert_allclose(recovery[:, 1:length + 1], default_world.p_min, rtol=1e-5)


def test_recovery_probability_tabular():
    world = WorldConfig.from_sizes(2, 1, 1, 1, response_length=3, horizon=1)
    policy = TabularPolicy.random(jax.random.key(9), world.vocab_size, 3, scale=2.0)
    tokens = all_responses(world.vocab_size, 3)

    recovery = world_lib.recovery_probability(policy, world, tokens)
    expected = jax.nn.softmax(policy.logits(tokens), axis=-1)[..., :2].sum(-1)
    np.testing.assert_allclose(recovery, expected, rtol=1e-5)


def test_recovery_probability_mismatch():
    policy = TabularPolicy.random(jax.random.key(10), 4, 4)

    with pytest.raises(ValueError, match="policy has V=4, T=4 but the world has V=5, T=4"):
        world_lib.recovery_probability(policy, TINY, jnp.zeros((1, 4), jnp.int32))
