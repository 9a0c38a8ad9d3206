"""Monte Carlo estimators against the exact oracle.

Statistical checks use fixed seeds. A field agrees when its z-score
(estimate - exact) / stderr is within 4 in absolute value. The file checks
a few hundred z-scores, so a bound of 4 standard errors fails by chance
with probability below 2%.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hi_jax import sampling
from hi_jax.estimators import estimate_profile
from hi_jax.exact import enumerate_responses, exact_profile
from hi_jax.harms import TableHarm
from worlds import random_world

Z_MAX = 4.0
FIELDS = ("I", "G_norm_sq", "cs_pointwise", "fisher_trace_mean")
METHODS = [
    dict(info_method="rao_blackwell"),
    dict(info_method="rao_blackwell", top_k=1),
    dict(info_method="pick_freeze", fisher_method="hutchinson"),
]


def z_scores(estimate, exact):
    """z-scores where the stderr is positive; exact matches elsewhere are checked."""
    mean, stderr, exact = map(np.asarray, (estimate.mean, estimate.stderr, exact))
    flat = stderr <= 1e-7 * np.maximum(1.0, np.abs(exact))
    np.testing.assert_allclose(mean[flat], exact[flat], rtol=1e-4, atol=1e-6)
    return (mean[~flat] - exact[~flat]) / stderr[~flat]


@pytest.mark.parametrize("options", METHODS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("V,T,seed", [(3, 4, 0), (4, 3, 1)])
def test_fields_agree_with_exact_oracle(options, V, T, seed):
    policy, harm = random_world(V, T, seed)
    exact = exact_profile(policy, harm)
    estimate = estimate_profile(jax.random.key(100 + seed), policy, harm,
                                num_sequences=512, num_continuations=4, **options)
    for field in FIELDS:
        z = z_scores(getattr(estimate, field), getattr(exact, field))
        assert np.all(np.abs(z) < Z_MAX), (field, z)
    for field in ("h0", "var_harm"):
        z = z_scores(getattr(estimate, field), getattr(exact, field))
        assert np.all(np.abs(z) < Z_MAX), (field, z)


def _repeat(options, num_seeds, num_sequences):
    """Estimates of one world over many seeds: {field: (means, stderrs)}."""
    policy, harm = random_world(3, 3, 7)
    exact = exact_profile(policy, harm)
    fields = ("I", "cs_pointwise", "G_norm_sq")
    runs = {field: ([], []) for field in fields}
    for seed in range(num_seeds):
        estimate = estimate_profile(jax.random.key(seed), policy, harm,
                                    num_sequences=num_sequences, num_continuations=3,
                                    **options)
        for field in fields:
            runs[field][0].append(np.asarray(getattr(estimate, field).mean))
            runs[field][1].append(np.asarray(getattr(estimate, field).stderr))
    return exact, {f: (np.array(m), np.array(s)) for f, (m, s) in runs.items()}


@pytest.mark.parametrize("options", METHODS[::2], ids=["rao_blackwell", "pick_freeze"])
def test_standard_errors_are_honest(options):
    exact, runs = _repeat(options, num_seeds=30, num_sequences=96)
    # Means over units: 30 seeds x 2 fields x 3 positions = 180 z-scores. If
    # the stderrs are right their standard deviation is 1 up to a sampling
    # error of about 1/sqrt(2 * 180) = 0.05 (more, since fields and positions
    # are correlated); the band [0.75, 1.3] is several times that.
    z = np.concatenate([(runs[f][0] - getattr(exact, f)) / runs[f][1]
                        for f in ("I", "cs_pointwise")])
    assert 0.75 < z.std() < 1.3, z.std()
    assert abs(z.mean()) < 0.3, z.mean()
    # ||G_t||^2 is a U-statistic whose distribution is skewed when it is not
    # far from zero, and its jackknife stderr shrinks with the estimate, so
    # z-scores are not normal. Check calibration instead: the average
    # reported stderr against the spread of the estimates over seeds (which
    # itself has a relative sampling error of about 1/sqrt(2 * 30) = 0.13).
    means, stderrs = runs["G_norm_sq"]
    calibration = stderrs.mean(0) / means.std(0, ddof=1)
    assert np.all((calibration > 0.6) & (calibration < 1.6)), calibration
    spread_of_mean = means.std(0, ddof=1) / np.sqrt(means.shape[0])
    assert np.all(np.abs(means.mean(0) - exact.G_norm_sq) < Z_MAX * spread_of_mean)


def test_plug_in_bias_visible_unbiased_none():
    policy, harm = random_world(3, 4, 0)
    exact = exact_profile(policy, harm)
    key = jax.random.key(5)
    common = dict(num_sequences=2048, num_continuations=2)
    plug_in = estimate_profile(key, policy, harm, info_method="plug_in", **common)
    bias_z = (plug_in.I.mean - exact.I) / plug_in.I.stderr
    # The table harm is exact at the last position, so only t < T - 1 is biased.
    assert np.all(bias_z[:-1] > 6), bias_z
    for method in ("rao_blackwell", "pick_freeze"):
        unbiased = estimate_profile(key, policy, harm, info_method=method, **common)
        z = (unbiased.I.mean - exact.I) / unbiased.I.stderr
        assert np.all(np.abs(z) < Z_MAX), (method, z)


def test_nested_bias_is_the_continuation_noise():
    policy, harm = random_world(3, 4, 0)
    exact = exact_profile(policy, harm)
    M = 2
    nested = estimate_profile(jax.random.key(6), policy, harm, num_sequences=2048,
                              num_continuations=M, info_method="nested", num_branches=3)
    # E[nested I_t] = I_t + E[Var(Harm | y_<=t)] / M, and the expected
    # conditional variance left after position t is the sum of the later I_s.
    tail = np.cumsum(exact.I[::-1])[::-1] - exact.I
    z = (nested.I.mean - (exact.I + tail / M)) / nested.I.stderr
    assert np.all(np.abs(z) < Z_MAX), z
    bias_z = (nested.I.mean - exact.I) / nested.I.stderr
    assert np.all(bias_z[:-1] > 6), bias_z
    # Its gradient contributions and Fisher traces are unbiased.
    for field in ("G_norm_sq", "fisher_trace_mean", "h0"):
        z = z_scores(getattr(nested, field), getattr(exact, field))
        assert np.all(np.abs(z) < Z_MAX), (field, z)


def test_nested_default_branches_equal_vocab():
    policy, harm = random_world(3, 3, 0)
    estimate = estimate_profile(jax.random.key(0), policy, harm, num_sequences=6,
                                num_continuations=2, info_method="nested")
    assert estimate.settings["num_branches"] == 3


@pytest.mark.parametrize("method", ["rao_blackwell", "pick_freeze"])
def test_horizon_harm_beyond_horizon(method):
    policy, harm = random_world(3, 4, 3, horizon=2)
    estimate = estimate_profile(jax.random.key(0), policy, harm, num_sequences=64,
                                num_continuations=3, info_method=method)
    assert np.all(np.abs(estimate.I.mean[:2]) > 0)
    np.testing.assert_allclose(estimate.I.mean[2:], 0.0, atol=1e-6)
    np.testing.assert_allclose(estimate.cs_pointwise.mean[2:], 0.0, atol=1e-6)
    np.testing.assert_allclose(estimate.G_norm_sq.mean[2:], 0.0, atol=1e-9)


def test_second_call_does_not_recompile():
    policy, harm = random_world(3, 3, 0)
    kwargs = dict(num_sequences=12, num_continuations=2)
    estimate_profile(jax.random.key(0), policy, harm, **kwargs)
    other = policy.replace_params(policy.params * 2.0)
    with jax.log_compiles(True):
        import logging
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger = logging.getLogger("jax")
        logger.addHandler(handler)
        try:
            estimate_profile(jax.random.key(1), other, harm, **kwargs)
        finally:
            logger.removeHandler(handler)
    compiled = [r.getMessage() for r in records if "Compiling" in r.getMessage()
                and "_estimate_raw" in r.getMessage()]
    assert compiled == []


def test_sampler_matches_exact_distribution():
    V, T = 3, 3
    policy, _ = random_world(V, T, 2)
    responses = enumerate_responses(V, T)
    probs = np.asarray(jnp.exp(policy.sequence_log_prob(responses)))
    num = 60000
    samples = np.asarray(sampling.sample_responses(jax.random.key(0), policy, num))
    index = (samples * V**np.arange(T - 1, -1, -1)).sum(1)
    freq = np.bincount(index, minlength=V**T) / num
    stderr = np.sqrt(probs * (1 - probs) / num)
    assert np.all(np.abs(freq - probs) < Z_MAX * stderr + 1e-12)


def test_continuations_keep_prefix_and_follow_conditionals():
    V, T = 3, 3
    policy, _ = random_world(V, T, 1)
    prefix = jnp.array([2, 1, 0])
    num = 40000
    out = np.asarray(jax.jit(sampling.sample_continuations, static_argnums=(4,))(
        jax.random.key(0), policy, prefix, 2, num))
    assert np.all(out[:, :2] == [2, 1])
    expected = np.asarray(jax.nn.softmax(policy.logit_tables()[2][2, 1]))
    freq = np.bincount(out[:, 2], minlength=V) / num
    stderr = np.sqrt(expected * (1 - expected) / num)
    assert np.all(np.abs(freq - expected) < Z_MAX * stderr)
    # vmapped over start positions, each row keeps its own prefix length.
    starts = jnp.arange(T + 1)
    batched = jax.vmap(lambda k, s: sampling.sample_continuations(k, policy, prefix, s, 4))(
        jax.random.split(jax.random.key(1), T + 1), starts)
    for s in range(T + 1):
        assert np.all(np.asarray(batched[s, :, :s]) == np.asarray(prefix[:s]))


@pytest.mark.parametrize("kwargs,error,fragment", [
    (dict(num_continuations=1), ValueError, "num_continuations must be >= 2"),
    (dict(num_sequences=0), ValueError, "num_sequences must be >= 3"),
    (dict(num_sequences=2.5), ValueError, "num_sequences must be an integer"),
    (dict(info_method="plugin"), ValueError, "info_method must be one of"),
    (dict(fisher_method="diag"), ValueError, "fisher_method must be one of"),
    (dict(top_k=3), ValueError, r"top_k must be in \[1, V - 1\] = \[1, 2\]"),
    (dict(top_k=1, info_method="pick_freeze"), ValueError, "top_k applies"),
    (dict(top_k=1, info_method="nested"), ValueError, "top_k applies"),
    (dict(num_branches=4), ValueError, "num_branches applies to info_method 'nested'"),
    (dict(num_branches=1, info_method="nested"), ValueError, "num_branches must be >= 2"),
    (dict(num_branches=5000, info_method="nested"), ValueError,
     r"num_branches must be in \[2, MAX_BRANCHES\] = \[2, 4096\]"),
    (dict(num_probes=0), ValueError, "num_probes must be >= 1"),
    (dict(num_sequences=10, num_groups=4), ValueError, "must divide num_sequences"),
    (dict(num_sequences=37), ValueError, "no divisor"),
    (dict(key=7), TypeError, "key must be a PRNG key"),
    (dict(key=jnp.zeros(3, jnp.uint32)), TypeError, "key must be a single PRNG key"),
])
def test_invalid_settings_raise(kwargs, error, fragment):
    policy, harm = random_world(3, 3, 0)
    key = kwargs.pop("key", jax.random.key(0))
    with pytest.raises(error, match=fragment):
        estimate_profile(key, policy, harm, **kwargs)


def test_raw_uint32_key_is_accepted():
    policy, harm = random_world(3, 3, 0)
    estimate = estimate_profile(jax.random.PRNGKey(0), policy, harm, num_sequences=6,
                                num_continuations=2)
    assert estimate.I.mean.shape == (3,)


def test_transformer_fields_agree_with_exact_oracle():
    from hi_jax.transformer import TransformerConfig, TransformerPolicy
    V, T = 3, 3
    config = TransformerConfig(vocab_size=V, response_length=T, width=8, depth=1,
                               num_heads=2)
    policy = TransformerPolicy.init(jax.random.key(1), config)
    policy = policy.replace_params(jax.tree.map(lambda x: x * 3.0, policy.params))
    harm = TableHarm(jax.random.uniform(jax.random.key(2), (V,) * T))
    exact = exact_profile(policy, harm)
    for options in (dict(info_method="rao_blackwell"),
                    dict(info_method="pick_freeze", fisher_method="hutchinson")):
        estimate = estimate_profile(jax.random.key(3), policy, harm, num_sequences=256,
                                    num_continuations=3, **options)
        for field in FIELDS + ("h0", "var_harm"):
            z = z_scores(getattr(estimate, field), getattr(exact, field))
            assert np.all(np.abs(z) < Z_MAX), (options, field, z)
