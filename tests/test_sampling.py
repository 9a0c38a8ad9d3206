"""The decode loops of static length, and the packed Rademacher probes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hi_jax import estimators, sampling
from hi_jax.policy import TabularPolicy
from hi_jax.transformer import TransformerConfig, TransformerPolicy


def _policies():
    tabular = TabularPolicy.random(jax.random.key(0), 3, 5, scale=2.0)
    config = TransformerConfig(vocab_size=5, response_length=5, width=16, depth=1,
                               num_heads=2, prompt=(1, 2))
    transformer = TransformerPolicy.init(jax.random.key(1), config)
    # Larger weights than the initialisation, so that draws depend on the logits.
    transformer = transformer.replace_params(
        jax.tree.map(lambda p: 20.0 * p, transformer.params))
    return {"tabular": tabular, "transformer": transformer}


@pytest.mark.parametrize("name", ["tabular", "transformer"])
def test_static_steps_give_the_same_responses(name):
    policy = _policies()[name]
    T = policy.response_length
    tokens = sampling.sample_responses(jax.random.key(2), policy, 1)[0]
    prefilled = sampling.prefill_one(policy, tokens)
    keys = jax.random.split(jax.random.key(3), T + 1)
    starts = jnp.arange(T + 1)

    def continue_all(num_steps):
        return jax.vmap(lambda k, s: sampling.continue_prefilled(
            k, policy, prefilled, tokens, s, 6, num_steps=num_steps))(keys, starts)

    loop = continue_all(None)
    # More steps than any start needs: the extra ones must change nothing.
    for num_steps in (T, T + 3):
        np.testing.assert_array_equal(continue_all(num_steps), loop)
    assert len(np.unique(np.asarray(loop[0]), axis=0)) > 1

    def branch_all(num_steps):
        candidates = jnp.arange(T) % policy.vocab_size
        return jax.vmap(lambda k, t, v: sampling.branch_prefilled(
            k, policy, prefilled, tokens, t, v, 4, num_steps=num_steps))(
                keys[:T], jnp.arange(T), candidates)

    np.testing.assert_array_equal(branch_all(T - 1), branch_all(None))


def test_estimates_independent_of_chunking(monkeypatch):
    policy = _policies()["transformer"]
    harm = lambda y: (y == 0).mean(-1)  # noqa: E731
    kwargs = dict(num_sequences=12, num_continuations=2, num_groups=4,
                  fisher_method="hutchinson")
    reference = estimators.estimate_profile(jax.random.key(4), policy, harm, **kwargs)
    # One decode loop for all positions, and one group per chunk.
    monkeypatch.setattr(estimators, "MAX_DECODE_LOOPS", 1)
    monkeypatch.setattr(estimators, "MAX_CHUNK_CACHE_BYTES", 1)
    jax.clear_caches()
    other = estimators.estimate_profile(jax.random.key(4), policy, harm, **kwargs)
    for field in ("I", "G_norm_sq"):
        np.testing.assert_allclose(getattr(other, field).mean,
                                   getattr(reference, field).mean, rtol=1e-5, atol=1e-9)
    # Chunks change the batch shapes of the jvps, so the float32 sums behind
    # the Fisher traces (up to 3e4 here) differ in their last digits.
    for field in ("cs_pointwise", "fisher_trace_mean"):
        np.testing.assert_allclose(getattr(other, field).mean,
                                   getattr(reference, field).mean, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("shape", [(1,), (31,), (32,), (33,), (7, 45)])
def test_packed_signs_shape_and_values(shape):
    signs = estimators.rademacher_from_bits(jax.random.key(0), shape, jnp.float32)
    assert signs.shape == shape
    assert signs.dtype == jnp.float32
    assert set(np.unique(np.asarray(signs))) <= {-1.0, 1.0}


@pytest.mark.parametrize("shape,dtype,fragment", [
    ((4,), jnp.uint8, "dtype must be a floating-point type"),
    ((4,), jnp.bool_, "dtype must be a floating-point type"),
    ((-1,), jnp.float32, "shape must have non-negative sizes"),
])
def test_packed_signs_reject_bad_input(shape, dtype, fragment):
    with pytest.raises(ValueError, match=fragment):
        estimators.rademacher_from_bits(jax.random.key(0), shape, dtype)


def test_packed_signs_fair_and_independent():
    n = 2**20
    signs = np.asarray(estimators.rademacher_from_bits(jax.random.key(1), (n,),
                                                       jnp.float32), np.float64)
    # Means of products of independent fair signs have stderr 1 / sqrt(n).
    bound = 5 / np.sqrt(n)
    assert abs(signs.mean()) < bound
    # Bits within one word, and the same bit of neighbouring words.
    for lag in (1, 31, 32, 33):
        assert abs((signs[:-lag] * signs[lag:]).mean()) < bound, lag
    other = np.asarray(estimators.rademacher_from_bits(jax.random.key(2), (n,),
                                                       jnp.float32), np.float64)
    assert abs((signs * other).mean()) < bound
