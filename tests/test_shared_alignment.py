"""Shared parameters beyond the horizon: incidental KL, but no harm-driven tilt.

A tiny transformer is pretrained on a refusal world whose training harm
reads only y_0 (horizon k = 1), then aligned with the standard objective.
The theory predicts that the aligned conditionals at positions t >= k are
not tilted along the harm martingale, Cov_{y_t|y<t}(h_t, log P/P_base) = 0,
while the KL there may be positive because the parameters are shared.
"""

import jax
import numpy as np
import pytest

from hi_jax import TabularPolicy, TableHarm, enumerate_responses, exact_kl_profile
from hi_jax import training
from hi_jax import world as world_lib
from hi_jax.evaluation import harm_tilt_covariance
from hi_jax.transformer import TransformerConfig, TransformerPolicy


def exact_tilt_covariance(policy, base_policy, table):
    """E_{y<t}[Cov(h_t, log P/P_base)] by enumeration, for a table harm: [T]."""
    V, T = policy.vocab_size, policy.response_length
    responses = enumerate_responses(V, T)
    log_probs = np.asarray(policy.log_probs(responses), np.float64)
    base_log_probs = np.asarray(base_policy.log_probs(responses), np.float64)
    seq_prob = np.exp(np.asarray(policy.sequence_log_prob(responses), np.float64))
    harm = np.asarray(table, np.float64).reshape(-1)
    rows = np.arange(V**T)
    out = []
    for t in range(T):
        node = rows // V**(T - 1 - t)  # the prefix y_<=t of each response
        h = (np.bincount(node, seq_prob * harm) / np.bincount(node, seq_prob))[node]
        probs = np.exp(log_probs[:, t])
        ratio = log_probs[:, t] - base_log_probs[:, t]
        centred = ratio[rows, responses[:, t]] - (probs * ratio).sum(-1)
        out.append((seq_prob * h * centred).sum())
    return np.array(out)


def test_tilt_covariance_matches_enumeration():
    V, T = 3, 3
    base = TabularPolicy.random(jax.random.key(0), V, T)
    policy = TabularPolicy.random(jax.random.key(1), V, T)
    table = jax.random.uniform(jax.random.key(2), (V,) * T)
    estimate = harm_tilt_covariance(jax.random.key(3), policy, base, TableHarm(table),
                                    num=1000, num_continuations=2)
    exact = exact_tilt_covariance(policy, base, table)
    z = (estimate.mean - exact) / estimate.stderr
    assert np.all(np.abs(z) < 4), z


@pytest.fixture(scope="module")
def aligned_world():
    world = world_lib.WorldConfig.from_sizes(1, 1, 1, 1, response_length=4, horizon=1)
    config = TransformerConfig(vocab_size=world.vocab_size, response_length=4, width=16,
                               depth=1, num_heads=2)
    init = TransformerPolicy.init(jax.random.key(0), config)
    pretrain = training.default_pretrain_config()
    pretrain.update(dict(steps=300, batch_size=128, learning_rate=3e-3))
    base = training.pretrain(jax.random.key(1), init,
                             lambda key, num: world_lib.sample_teacher(key, world, num),
                             pretrain)
    align = training.default_align_config()
    align.update(dict(steps=200, batch_size=64, learning_rate=3e-3, lam=3.0,
                      eval_every=200, checkpoint_every=200))
    return world, base, align


def test_shared_parameters_beyond_horizon(aligned_world, tmp_path):
    world, base, align = aligned_world
    harm = world_lib.training_harm(world)
    aligned = training.align(jax.random.key(2), base, base, harm, align, str(tmp_path))
    k = world.horizon

    covariance = harm_tilt_covariance(jax.random.key(3), aligned, base, harm, num=256,
                                      num_continuations=2)
    # Inside the horizon alignment tilts the conditionals against the harm.
    assert covariance.mean[0] < -4 * covariance.stderr[0]
    # Beyond it h_t does not depend on y_t: zero up to float32 rounding.
    np.testing.assert_allclose(covariance.mean[k:], 0.0, atol=1e-6)

    kl = np.asarray(exact_kl_profile(aligned, base))
    assert kl[0] > 0.1
    assert np.all(kl[k:] >= 0)
    # Shared parameters move the conditionals beyond the horizon too, by far
    # less than at the horizon.
    assert np.all(kl[k:] < 0.1 * kl[0])
