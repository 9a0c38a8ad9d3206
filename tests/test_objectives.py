"""Objectives: exact per-token KL, recovery penalty and gradient surrogates.

Monte Carlo gradients are averaged over N independent batches with a fixed
seed and compared with the exact gradient of the enumerated objective, entry
by entry. An entry agrees when its z-score (mean - exact) / stderr is within
Z_MAX = 4.5 in absolute value. Each comparison has 39 entries, so under a
normal approximation all of them pass by chance with probability above
0.9997.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hi_jax import equilibrium, objectives, sampling
from hi_jax.exact import enumerate_responses
from hi_jax.harms import TableHarm
from hi_jax.policy import TabularPolicy

Z_MAX = 4.5
V, T = 3, 3
RECOVERY_IDS = (0,)


def tabular_world(seed):
    key_policy, key_base, key_harm = jax.random.split(jax.random.key(seed), 3)
    policy = TabularPolicy.random(key_policy, V, T, scale=1.0)
    base = TabularPolicy.random(key_base, V, T, scale=1.0)
    harm = TableHarm(jax.random.uniform(key_harm, (V,) * T))
    return policy, base, harm


def q_prefixes(seed, lengths):
    tokens = jax.random.randint(jax.random.key(seed), (len(lengths), T), 0, V)
    mask = objectives.prefix_mask_from_lengths(jnp.asarray(lengths), T)
    return tokens, mask


def monte_carlo_gradients(key, policy, loss_fn, num_batches, batch_size):
    """Surrogate gradients of `num_batches` independent batches: table [N, S, V]."""

    def one_batch(batch_key):
        tokens = sampling.sample_responses(batch_key, policy, batch_size)
        return jax.grad(lambda params: loss_fn(policy.replace_params(params), tokens))(
            policy.params)

    return jax.jit(jax.vmap(one_batch))(jax.random.split(key, num_batches))


def z_scores(samples, exact):
    samples, exact = np.asarray(samples), np.asarray(exact)
    mean = samples.mean(axis=0)
    stderr = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    return (mean - exact) / stderr


# Per-token KL ---------------------------------------------------------------------


def test_per_token_kl_matches_numpy():
    policy, base, _ = tabular_world(0)
    tokens = enumerate_responses(V, T)
    kl = objectives.per_token_kl(policy, base, tokens)

    p = np.exp(np.asarray(policy.log_probs(tokens), np.float64))
    log_p = np.log(p / p.sum(-1, keepdims=True))
    q = np.exp(np.asarray(base.log_probs(tokens), np.float64))
    log_q = np.log(q / q.sum(-1, keepdims=True))
    expected = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    assert kl.shape == (V**T, T)
    np.testing.assert_allclose(kl, expected, rtol=1e-5, atol=1e-6)


def test_per_token_kl_sums_to_sequence_kl():
    policy, base, _ = tabular_world(1)
    tokens = enumerate_responses(V, T)
    weights = jnp.exp(policy.sequence_log_prob(tokens))
    chained = (weights * objectives.per_token_kl(policy, base, tokens).sum(1)).sum()
    direct = (weights * (policy.sequence_log_prob(tokens)
                         - base.sequence_log_prob(tokens))).sum()
    np.testing.assert_allclose(chained, direct, rtol=1e-5)


@pytest.mark.parametrize("logits,base_logits,expected", [
    # p = (1, 0, 0) up to exp(-1e4); log q_0 = -2e4, so KL = 2e4.
    ([1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], 2e4),
    # p puts 1e-12 on two tokens; q is uniform.
    ([np.log(1e-12), np.log(1e-12), 0.0], [0.0, 0.0, 0.0], None),
    # Both put 1e-12 on token 0 and q differs elsewhere.
    ([np.log(1e-12), 0.0, 1e4], [np.log(1e-12), 1e4, 0.0], 1e4),
])
def test_per_token_kl_finite_at_extreme_logits(logits, base_logits, expected):
    policy = TabularPolicy.from_logits([jnp.asarray(logits, jnp.float32)])
    base = TabularPolicy.from_logits([jnp.asarray(base_logits, jnp.float32)])
    tokens = jnp.zeros((1, 1), jnp.int32)
    kl = objectives.per_token_kl(policy, base, tokens)[0, 0]

    log_p = np.asarray(logits, np.float64) - np.logaddexp.reduce(np.asarray(logits))
    log_q = (np.asarray(base_logits, np.float64)
             - np.logaddexp.reduce(np.asarray(base_logits)))
    reference = (np.exp(log_p) * (log_p - log_q)).sum()
    if expected is not None:
        np.testing.assert_allclose(reference, expected, rtol=1e-6)
    assert np.isfinite(kl)
    assert kl >= 0.0
    np.testing.assert_allclose(kl, reference, rtol=1e-5, atol=1e-6)

    gradient = jax.grad(
        lambda p: objectives.per_token_kl(p, base, tokens).sum())(policy).table
    assert np.all(np.isfinite(gradient))


def test_per_token_kl_zero_probability_tokens():
    # A token with probability exactly 0 under both policies contributes 0.
    policy = TabularPolicy.from_logits([jnp.asarray([-jnp.inf, 0.0, 1.0])])
    base = TabularPolicy.from_logits([jnp.asarray([-jnp.inf, 1.0, 0.0])])
    tokens = jnp.ones((1, 1), jnp.int32)
    kl = objectives.per_token_kl(policy, base, tokens)[0, 0]
    assert np.isfinite(kl)
    gradient = jax.grad(
        lambda p: objectives.per_token_kl(p, base, tokens).sum())(policy).table
    assert np.all(np.isfinite(gradient))


# Recovery -------------------------------------------------------------------------


def test_recovery_positions_rule():
    mask = objectives.prefix_mask_from_lengths(jnp.asarray([0, 2, T]), T)
    counted = objectives.recovery_positions(mask)
    expected = np.array([[True, False, False],
                         [True, True, True],
                         [True, True, True]])
    np.testing.assert_array_equal(counted, expected)

    mask = objectives.prefix_mask_from_lengths(jnp.asarray([1]), 5)
    np.testing.assert_array_equal(objectives.recovery_positions(mask),
                                  [[True, True, False, False, False]])


def test_recovery_penalty_matches_direct_loop():
    policy, _, _ = tabular_world(2)
    lengths = [0, 1, 2, 3, 2]
    tokens, mask = q_prefixes(3, lengths)
    recovery_ids = (0, 2)
    gamma = 0.7
    penalty, probs = objectives.recovery_penalty(policy, tokens, mask, recovery_ids,
                                                 gamma)

    tables = [np.asarray(t, np.float64) for t in policy.logit_tables()]
    total = 0.0
    for b, length in enumerate(lengths):
        for t in range(min(length, T - 1) + 1):
            logits = tables[t][tuple(int(y) for y in tokens[b, :t])]
            p = np.exp(logits - np.logaddexp.reduce(logits))
            p_recover = p[list(recovery_ids)].sum()
            np.testing.assert_allclose(probs[b, t], p_recover, rtol=1e-5)
            total += gamma**t * (1.0 - p_recover)
    np.testing.assert_allclose(penalty, total / len(lengths), rtol=1e-5)


def test_recovery_probabilities_match_world_definition():
    policy, _, _ = tabular_world(4)
    tokens = enumerate_responses(V, T)
    probs = objectives.recovery_probabilities(policy, tokens, (1,))
    expected = jnp.exp(policy.log_probs(tokens))[..., 1]
    np.testing.assert_allclose(probs, expected, rtol=1e-6)


def test_exact_objective_matches_equilibrium_deep_objective():
    policy, base, harm = tabular_world(5)
    # Q: full responses, so every position counts, as in the tabular solver.
    tokens = jax.random.randint(jax.random.key(6), (7, T), 0, V)
    mask = jnp.ones((7, T), bool)
    lam, mu, gamma = 1.5, 2.0, 0.8
    exact = objectives.exact_objective(policy, base, harm, lam, mu, gamma, tokens, mask,
                                       RECOVERY_IDS)
    rows = np.asarray(tokens) @ (V ** np.arange(T - 1, -1, -1))
    distribution = np.bincount(rows, minlength=V**T) / tokens.shape[0]
    reference = equilibrium.deep_objective(policy, base, harm, lam, mu, gamma,
                                           distribution, RECOVERY_IDS)
    np.testing.assert_allclose(exact["total"], reference, rtol=1e-5)


# Gradients of the surrogates ------------------------------------------------------


def _exact_gradient(policy, base, harm, **kwargs):
    def total(params):
        return objectives.exact_objective(policy.replace_params(params), base, harm,
                                          **kwargs)["total"]

    return jax.grad(total)(policy.params)


@pytest.mark.parametrize("case", ["harm", "kl", "deep"])
def test_surrogate_gradient_matches_exact(case):
    policy, base, harm = tabular_world(10)
    kwargs = dict(lam=2.0)
    if case == "harm":
        # With P_base = P_theta the KL and its gradient vanish.
        base = policy
    elif case == "kl":
        kwargs = dict(lam=0.0)
    else:
        q_tokens, q_mask = q_prefixes(11, [0, 1, 2, 3, 3, 1])
        kwargs.update(mu=1.5, gamma=0.6, q_tokens=q_tokens, q_prefix_mask=q_mask,
                      recovery_ids=RECOVERY_IDS)

    def loss_fn(p, tokens):
        return objectives.objective_loss(p, base, tokens, harm(tokens), **kwargs)[0]

    samples = monte_carlo_gradients(jax.random.key(12), policy, loss_fn,
                                    num_batches=4000, batch_size=8)
    exact = _exact_gradient(policy, base, harm, **kwargs)
    z = z_scores(samples, exact)
    assert np.all(np.isfinite(z)), z
    assert np.max(np.abs(z)) < Z_MAX, z


def test_gradient_without_prefix_score_term_is_biased():
    # Differentiating sum_t KL_t with the prefixes held fixed misses the
    # score term of the prefix distribution; the comparison above detects it.
    policy, base, harm = tabular_world(10)

    def direct_only(p, tokens):
        return objectives.per_token_kl(p, base, tokens).sum(1).mean()

    samples = monte_carlo_gradients(jax.random.key(12), policy, direct_only,
                                    num_batches=4000, batch_size=8)
    exact = _exact_gradient(policy, base, harm, lam=0.0)
    assert np.max(np.abs(z_scores(samples, exact))) > 10 * Z_MAX


def test_loss_terms_are_unbiased():
    policy, base, harm = tabular_world(13)
    q_tokens, q_mask = q_prefixes(14, [1, 2, 3])
    kwargs = dict(lam=1.0, mu=0.5, gamma=0.9, q_tokens=q_tokens, q_prefix_mask=q_mask,
                  recovery_ids=RECOVERY_IDS)

    def terms(key):
        tokens = sampling.sample_responses(key, policy, 8)
        return objectives.objective_loss(policy, base, tokens, harm(tokens), **kwargs)[1]

    samples = jax.jit(jax.vmap(terms))(jax.random.split(jax.random.key(15), 2000))
    exact = objectives.exact_objective(policy, base, harm, **kwargs)
    for name in ("harm", "kl", "total"):
        z = z_scores(samples[name], exact[name])
        assert abs(z) < Z_MAX, (name, z)
    # The recovery term is deterministic given the Q prefixes.
    np.testing.assert_allclose(samples["recovery"], exact["recovery"], rtol=1e-6)


# Shapes, jit and validation -------------------------------------------------------


def test_objective_loss_under_jit_and_shapes():
    policy, base, harm = tabular_world(16)
    tokens = sampling.sample_responses(jax.random.key(17), policy, 5)
    q_tokens, q_mask = q_prefixes(18, [0, 3])
    loss = jax.jit(functools.partial(objectives.deep_loss, recovery_ids=RECOVERY_IDS,
                                     lam=1.0, mu=1.0, gamma=0.5))
    surrogate, terms = loss(policy, base, tokens, harm(tokens), q_tokens, q_mask)
    eager_surrogate, eager_terms = objectives.deep_loss(
        policy, base, tokens, harm(tokens), q_tokens, q_mask, RECOVERY_IDS, 1.0, 1.0, 0.5)
    assert surrogate.shape == ()
    np.testing.assert_allclose(surrogate, eager_surrogate, rtol=1e-5)
    for name in ("harm", "kl", "recovery", "total"):
        assert terms[name].shape == (), name
        np.testing.assert_allclose(terms[name], eager_terms[name], rtol=1e-5)
    assert terms["kl_per_position"].shape == (T,)
    assert terms["recovery_per_position"].shape == (T,)
    np.testing.assert_allclose(terms["total"],
                               terms["harm"] + terms["kl"] + terms["recovery"], rtol=1e-6)


def test_standard_loss_has_nan_recovery_profile():
    policy, base, harm = tabular_world(19)
    tokens = sampling.sample_responses(jax.random.key(20), policy, 4)
    _, terms = objectives.standard_loss(policy, base, tokens, harm(tokens), lam=1.0)
    assert float(terms["recovery"]) == 0.0
    assert np.all(np.isnan(terms["recovery_per_position"]))


def test_leave_one_out_advantage():
    values = jnp.asarray([1.0, 2.0, 6.0])
    expected = [1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5]
    np.testing.assert_allclose(objectives.leave_one_out_advantage(values), expected)
    with pytest.raises(ValueError, match="at least 2"):
        objectives.leave_one_out_advantage(jnp.ones((1,)))


def test_invalid_arguments_raise():
    policy, base, harm = tabular_world(21)
    tokens = sampling.sample_responses(jax.random.key(22), policy, 4)
    with pytest.raises(ValueError, match="mu=1.0"):
        objectives.objective_loss(policy, base, tokens, harm(tokens), lam=1.0, mu=1.0)
    q_tokens, q_mask = q_prefixes(23, [1])
    with pytest.raises(ValueError, match="recovery_ids are required"):
        objectives.objective_loss(policy, base, tokens, harm(tokens), lam=1.0,
                                  q_tokens=q_tokens, q_prefix_mask=q_mask)
    with pytest.raises(ValueError, match="whole vocabulary"):
        objectives.check_recovery_ids([0, 1, 2], V)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        objectives.check_recovery_ids([3], V)
    with pytest.raises(ValueError, match="repeat"):
        objectives.check_recovery_ids([1, 1], V)
    with pytest.raises(ValueError, match="row 0"):
        objectives.check_prefix_mask(np.array([[True, False, True]]), T)
    objectives.check_prefix_mask(np.array([[True, True, False], [False] * 3]), T)
