"""Bad input across the library: each case raises an error naming the field and value.

Each row is (case id, a call that must fail, the exception type, a plain
substring of the message). The modules' own test files hold more cases per module;
this table checks the library-wide contract in one place.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hi_jax import (DecayingHarm, Harm, HorizonHarm, TableHarm, TabularPolicy,
                    estimate_profile, exact_profile, objectives, sample_from_prefixes,
                    theory, training, world)
from hi_jax.transformer import TransformerConfig


def tabular(V=3, T=3, seed=0):
    return TabularPolicy.random(jax.random.key(seed), V, T)


def estimate(harm, policy=None, **kwargs):
    policy = policy or tabular()
    settings = dict(num_sequences=6, num_continuations=2)
    settings.update(kwargs)
    return estimate_profile(jax.random.key(0), policy, harm, **settings)


def constant_harm(value):
    return Harm(lambda y: jnp.full(y.shape[0], value), name="constant harm")


def align_config(**overrides):
    config = training.default_align_config()
    config.update(overrides)
    return config


CASES = [
    # Coefficients and probabilities out of range.
    ("lam negative", lambda: training.validate_align_config(align_config(lam=-1.0)),
     ValueError, "lam must be a finite number >= 0; got -1.0"),
    ("mu negative", lambda: training.validate_align_config(align_config(mu=-0.5)),
     ValueError, "mu must be a finite number >= 0; got -0.5"),
    ("gamma zero", lambda: training.validate_align_config(align_config(gamma=0.0)),
     ValueError, "gamma must be a finite number in (0, 1]; got 0.0"),
    ("theory mu negative", lambda: theory.recovery_guarantee(0.05, -1.0, 0.9, 8),
     ValueError, "mu must be finite and >= 0; got -1.0"),
    ("theory gamma above one", lambda: theory.recovery_guarantee(0.05, 1.0, 1.5, 8),
     ValueError, "gamma must be in the interval (0, 1]; got 1.5"),
    ("p0 above one", lambda: theory.gibbs_recovery(1.5, 1.0),
     ValueError, "p0 must be a probability in the open interval (0, 1); got 1.5"),
    ("delta zero", lambda: theory.attack_prefix_length(0.0, 0.05, 1.0, 0.9),
     ValueError, "delta must be a probability"),
    ("p_min zero", lambda: world.WorldConfig.from_sizes(p_min=0.0),
     ValueError, "WorldConfig.p_min must be in (0, 1); got 0.0"),
    # Lengths.
    ("horizon beyond T", lambda: world.WorldConfig.from_sizes(horizon=9, response_length=8),
     ValueError, "WorldConfig.horizon must be in [1, response_length=8]; got 9"),
    ("theory horizon beyond T", lambda: theory.recovery_kl_bound(0.05, 1.0, 0.9, 9, 8),
     ValueError, "horizon must be an integer in [0, response_length=8]; got 9"),
    ("T beyond max_len", lambda: TransformerConfig(vocab_size=5, response_length=4,
                                                   max_len=3),
     ValueError, "TransformerConfig.max_len must be an int >= 5; got 3"),
    ("harm horizon beyond T", lambda: estimate(HorizonHarm(lambda y: y[:, 0] * 0.0, 4)),
     ValueError, "has horizon 4, beyond the response length T=3"),
    # Sample counts.
    ("zero sequences", lambda: estimate(constant_harm(0.5), num_sequences=0),
     ValueError, "num_sequences must be >= 3; got 0"),
    ("one continuation", lambda: estimate(constant_harm(0.5), num_continuations=1),
     ValueError, "num_continuations must be >= 2; got 1"),
    ("align batch of one", lambda: training.validate_align_config(align_config(batch_size=1)),
     ValueError, "batch_size must be an integer >= 2; got 1"),
    ("zero continuations sampled",
     lambda: sample_from_prefixes(jax.random.key(0), tabular(), jnp.zeros((1, 3), jnp.int32),
                                  jnp.array([1]), 0),
     ValueError, "num must be an integer >= 1; got 0"),
    # Token ids outside the vocabulary.
    ("prompt token", lambda: TransformerConfig(vocab_size=5, response_length=4, prompt=(7,)),
     ValueError, "TransformerConfig.prompt[0] must be an int token id in [0, 4]; got 7"),
    ("recovery token", lambda: objectives.check_recovery_ids((99,), 5),
     ValueError, "recovery_ids contains token id 99, outside the vocabulary [0, 4]"),
    ("prefix token",
     lambda: sample_from_prefixes(jax.random.key(0), tabular(),
                                  jnp.array([[0, 3, 1]]), jnp.array([2]), 1),
     ValueError, "prefixes contains token id 3, outside the vocabulary [0, 2]"),
    ("prefix length",
     lambda: sample_from_prefixes(jax.random.key(0), tabular(),
                                  jnp.array([[0, 1, 1]]), jnp.array([4]), 1),
     ValueError, "lengths must be in [0, T] = [0, 3]"),
    ("harm table vocabulary", lambda: exact_profile(tabular(V=3), TableHarm(np.zeros((2,) * 3))),
     ValueError, "needs V=2, T=3; the policy has V=3, T=3"),
    ("harm table length", lambda: estimate(TableHarm(np.zeros((3,) * 2))),
     ValueError, "needs V=3, T=2; the policy has V=3, T=3"),
    # Harm values.
    ("harm NaN", lambda: estimate(constant_harm(jnp.nan)),
     ValueError, "harm 'constant harm' returned NaN"),
    ("harm infinite", lambda: estimate(constant_harm(jnp.inf)),
     ValueError, "harm 'constant harm' returned inf, outside the allowed range"),
    ("harm above one", lambda: exact_profile(tabular(), constant_harm(1.5)),
     ValueError, "returned 1.5, outside the allowed range"),
    ("harm shape", lambda: estimate(Harm(lambda y: jnp.zeros((y.shape[0], 2)), name="wide")),
     ValueError, "harm 'wide' must return shape"),
    ("harm table values", lambda: TableHarm(np.full((2, 2), -0.1), name="negative table"),
     ValueError, "harm 'negative table' returned -0.1"),
    ("decay zero", lambda: DecayingHarm(np.zeros(3), decay=0.0),
     ValueError, "decay must be in (0, 1]"),
    # Tabular logits.
    ("logits not full history",
     lambda: TabularPolicy.from_logits([np.zeros(3), np.zeros((3, 2))]),
     ValueError, "logits[1] must have shape (3, 3)"),
    ("logits NaN", lambda: TabularPolicy.from_logits([np.array([0.0, np.nan])]),
     ValueError, "logits contain 1 NaN values"),
    ("logits as one array", lambda: TabularPolicy.from_logits(np.zeros((3, 3))),
     ValueError, "logits must be a non-empty list of T arrays"),
    # Enumeration too large.
    ("enumeration too large",
     lambda: exact_profile(TabularPolicy.random(jax.random.key(0), 2, 20), constant_harm(0.5)),
     ValueError, "V**T = 2**20 = 1048576 responses, more than the limit"),
    # Keys.
    ("integer key", lambda: estimate_profile(7, tabular(), constant_harm(0.5)),
     TypeError, "key must be a PRNG key"),
]


@pytest.mark.parametrize("call,error,fragment", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_raises(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


def test_constant_harm_gives_zero_information_and_undefined_ratios():
    profile = estimate(constant_harm(0.3), num_sequences=12)
    np.testing.assert_allclose(profile.I.mean, 0.0, atol=1e-7)
    assert np.all(np.isnan(profile.ratio_g_to_cs.mean))
    assert np.all(np.isnan(profile.ratio_cs_to_bound.mean))
    exact = exact_profile(tabular(), constant_harm(0.3))
    np.testing.assert_allclose(exact.I, 0.0, atol=1e-7)
    np.testing.assert_allclose(exact.var_harm, 0.0, atol=1e-7)


def test_deterministic_harm_gives_finite_estimates():
    # Harm in {0, 1} decided by the first token: I_0 = Var(Harm), I_t = 0 after.
    policy = tabular()
    harm = Harm(lambda y: (y[:, 0] == 0).astype(jnp.float32), name="first token")
    exact = exact_profile(policy, harm)
    np.testing.assert_allclose(exact.I[1:], 0.0, atol=1e-7)
    profile = estimate(harm, policy=policy, num_sequences=12)
    for field in ("I", "G_norm_sq", "cs_pointwise", "fisher_bound"):
        assert np.all(np.isfinite(getattr(profile, field).mean)), field
    np.testing.assert_allclose(profile.I.mean[1:], 0.0, atol=1e-7)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_logits_give_finite_results(scale):
    # Logits of +-1e4 make some probabilities exactly 0 in float32 and others
    # 1 - 1e-12; everything must stay finite.
    V, T = 3, 3
    tables = [np.where(np.arange(V) == 0, scale, 0.0) * np.ones((V,) * t + (V,))
              for t in range(T)]
    policy = TabularPolicy.from_logits(tables)
    harm = TableHarm(jax.random.uniform(jax.random.key(1), (V,) * T))
    exact = exact_profile(policy, harm, return_gradients=True)
    for name, value in exact._asdict().items():
        if value is not None and name != "G":
            assert np.all(np.isfinite(value)), name
    assert np.all(np.isfinite(exact.G))
    profile = estimate(harm, policy=policy, num_sequences=12)
    for field in ("I", "G_norm_sq", "cs_pointwise", "fisher_trace_mean"):
        assert np.all(np.isfinite(getattr(profile, field).mean)), field
    base = tabular()
    tokens = jnp.zeros((4, T), jnp.int32)
    kl = objectives.per_token_kl(policy, base, tokens)
    assert np.all(np.isfinite(kl))
    assert np.all(kl >= 0)
    grad = jax.grad(lambda p: objectives.per_token_kl(p, base, tokens).sum())(policy)
    assert np.all(np.isfinite(grad.table))


def test_same_seed_gives_identical_numbers():
    policy = tabular(seed=3)
    harm = TableHarm(jax.random.uniform(jax.random.key(4), (3,) * 3))
    first = estimate(harm, policy=policy, num_sequences=12, info_method="pick_freeze")
    second = estimate(harm, policy=policy, num_sequences=12, info_method="pick_freeze")
    for field in ("I", "G_norm_sq", "cs_pointwise"):
        np.testing.assert_array_equal(getattr(first, field).mean,
                                      getattr(second, field).mean)
