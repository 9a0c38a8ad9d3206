"""Exact oracle: identities of the theory on random tabular worlds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hi_jax.exact import enumerate_responses, exact_profile
from hi_jax.harms import DecayingHarm, Harm, HorizonHarm
from hi_jax.policy import TabularPolicy
from worlds import random_world

WORLDS = [(3, 4, 0), (2, 5, 1), (4, 3, 2)]  # (V, T, seed)


def brute_force_mean_harm(policy, harm):
    responses = enumerate_responses(policy.vocab_size, policy.response_length)
    return (jnp.exp(policy.sequence_log_prob(responses)) * harm(responses)).sum()


@pytest.mark.parametrize("V,T,seed", WORLDS)
def test_information_sums_to_variance(V, T, seed):
    policy, harm = random_world(V, T, seed)
    profile = exact_profile(policy, harm)
    np.testing.assert_allclose(profile.I.sum(), profile.var_harm, rtol=1e-5)
    np.testing.assert_allclose(profile.h0, brute_force_mean_harm(policy, harm), rtol=1e-5)


@pytest.mark.parametrize("V,T,seed", WORLDS)
def test_gradients_sum_to_gradient_of_mean_harm(V, T, seed):
    policy, harm = random_world(V, T, seed)
    profile = exact_profile(policy, harm, return_gradients=True)
    direct = jax.grad(lambda p: brute_force_mean_harm(policy.replace_params(p), harm))(
        policy.params)
    np.testing.assert_allclose(profile.G.sum(0), direct, atol=1e-6)
    norms = (profile.G.reshape(T, -1)**2).sum(1)
    np.testing.assert_allclose(profile.G_norm_sq, norms, rtol=1e-5)


@pytest.mark.parametrize("V,T,seed", WORLDS)
def test_horizon_zeroes_information_and_gradient(V, T, seed):
    horizon = T - 2
    policy, harm = random_world(V, T, seed, horizon=horizon)
    profile = exact_profile(policy, harm)
    assert np.all(profile.I[:horizon] > 1e-6)
    np.testing.assert_allclose(profile.I[horizon:], 0.0, atol=1e-7)
    np.testing.assert_allclose(profile.G_norm_sq[horizon:], 0.0, atol=1e-9)
    np.testing.assert_allclose(profile.cs_pointwise[horizon:], 0.0, atol=1e-7)


@pytest.mark.parametrize("V,T,seed", WORLDS)
def test_cauchy_schwarz_chain(V, T, seed):
    policy, harm = random_world(V, T, seed)
    profile = exact_profile(policy, harm)
    slack = 1e-7
    assert np.all(profile.G_norm_sq <= profile.cs_pointwise + slack)
    assert np.all(profile.cs_pointwise <= profile.fisher_trace_max * profile.I + slack)
    assert np.all(profile.cs_pointwise <= profile.fisher_bound + slack)


@pytest.mark.parametrize("V,T,seed", WORLDS)
def test_tabular_fisher_trace_is_one_minus_purity(V, T, seed):
    policy, harm = random_world(V, T, seed)
    profile = exact_profile(policy, harm)
    for t, logits in enumerate(policy.logit_tables()):
        probs = jax.nn.softmax(logits.reshape(-1, V), axis=-1)
        trace = 1.0 - (probs**2).sum(-1)  # one value per prefix node
        np.testing.assert_allclose(profile.fisher_trace_max[t], trace.max(), rtol=1e-5)
        node_prob = _node_probabilities(policy, t)
        np.testing.assert_allclose(profile.fisher_trace_mean[t], (node_prob * trace).sum(),
                                   rtol=1e-5)


def _node_probabilities(policy, t):
    """P(y<t) for every prefix node of length t, by brute force: [V**t]."""
    V = policy.vocab_size
    prob = jnp.ones((1,))
    for logits in policy.logit_tables()[:t]:
        cond = jax.nn.softmax(logits.reshape(-1, V), axis=-1)
        prob = (prob[:, None] * cond).reshape(-1)
    return prob


def test_decaying_harm_information_decays():
    V, T = 3, 5
    policy = TabularPolicy.random(jax.random.key(4), V, T)
    harm = DecayingHarm(jnp.array([-2.0, 0.0, 2.0]), decay=0.4)
    profile = exact_profile(policy, harm)
    assert np.all(np.diff(profile.I) < 0)


def test_float64_is_honoured():
    with jax.enable_x64(True):
        policy, harm = random_world(3, 3, 0)
        policy = policy.replace_params(policy.params.astype(jnp.float64))
        profile = exact_profile(policy, harm)
        assert profile.I.dtype == jnp.float64
        np.testing.assert_allclose(profile.I.sum(), profile.var_harm, rtol=1e-12)


class _HugePolicy(TabularPolicy):
    """Declares a size far too large to enumerate without holding a table."""

    def __init__(self):
        self.table = jnp.zeros((1, 2))
        self.vocab_size = 50
        self.response_length = 20


def test_too_large_to_enumerate_raises_before_allocating():
    with pytest.raises(ValueError, match=r"50\*\*20 = .* more than the limit"):
        exact_profile(_HugePolicy(), lambda y: jnp.zeros(y.shape[0]))


@pytest.mark.parametrize("fn,fragment", [
    (lambda y: jnp.full(y.shape[0], jnp.nan), "NaN"),
    (lambda y: jnp.full(y.shape[0], 1.5), "1.5, outside the allowed range"),
    (lambda y: -jnp.ones(y.shape[0]), "-1.0, outside the allowed range"),
    (lambda y: jnp.zeros((y.shape[0], 2)), "must return shape"),
])
def test_bad_harm_values_raise(fn, fragment):
    policy = TabularPolicy.random(jax.random.key(0), 2, 3)
    with pytest.raises(ValueError, match=fragment) as info:
        exact_profile(policy, Harm(fn, name="bad harm"))
    assert "bad harm" in str(info.value)


def tiny_transformer(V, T, seed):
    from hi_jax.transformer import TransformerConfig, TransformerPolicy
    config = TransformerConfig(vocab_size=V, response_length=T, width=8, depth=1,
                               num_heads=2, prompt=(1,))
    policy = TransformerPolicy.init(jax.random.key(seed), config)
    # Three times the default init: the conditionals then depend visibly on
    # the prefix while no token is close to certain.
    return policy.replace_params(jax.tree.map(lambda x: x * 3.0, policy.params))


def test_transformer_identities():
    V, T, horizon = 3, 4, 2
    policy = tiny_transformer(V, T, 0)
    harm = HorizonHarm(jax.random.uniform(jax.random.key(9), (V,) * horizon), horizon)
    profile = exact_profile(policy, harm, return_gradients=True)
    np.testing.assert_allclose(profile.I.sum(), profile.var_harm, rtol=1e-4)
    np.testing.assert_allclose(profile.I[horizon:], 0.0, atol=1e-7)
    np.testing.assert_allclose(profile.G_norm_sq[horizon:], 0.0, atol=1e-10)
    assert np.all(profile.I[:horizon] > 1e-5)
    direct = jax.grad(lambda p: brute_force_mean_harm(policy.replace_params(p), harm))(
        policy.params)
    summed = jax.tree.map(lambda g: g.sum(0), profile.G)
    for got, want in zip(jax.tree.leaves(summed), jax.tree.leaves(direct)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    slack = 1e-8
    assert np.all(profile.G_norm_sq <= profile.cs_pointwise + slack)
    assert np.all(profile.cs_pointwise <= profile.fisher_trace_max * profile.I + slack)
