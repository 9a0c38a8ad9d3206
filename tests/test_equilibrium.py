"""Tests of the exact equilibria in hi_jax.equilibrium.

Reference quantities (harm information, per-position gradients and Fisher
matrices) are computed here from scratch by enumerating all responses and
differentiating `log_probs`, independently of the library code under test.
Tests that need precision run in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hi_jax import equilibrium, theory
from hi_jax.exact import enumerate_responses
from hi_jax.harms import HorizonHarm, TableHarm
from hi_jax.policy import Policy, TabularPolicy

V, T = 3, 3


def make_world(seed, horizon):
    """A random base policy and a random harm reading `horizon` tokens.

    Both use the default float dtype: float64 inside `jax.enable_x64(True)`.
    """
    policy_key, harm_key = jax.random.split(jax.random.key(seed))
    base = TabularPolicy.random(policy_key, V, T)
    harm = HorizonHarm(jax.random.uniform(harm_key, (V,) * horizon), horizon=horizon)
    return base, harm


def response_probs(policy):
    """Returns P(y) for every response in lexicographic order: float [V**T]."""
    return jnp.exp(policy.sequence_log_prob(enumerate_responses(V, T)))


def harm_information(policy, harm_values):
    """Computes I_t = E[(h_t - h_{t-1})**2] under `policy` by enumeration: float [T]."""
    probs = np.asarray(response_probs(policy)).reshape((V,) * T)
    harm = np.asarray(harm_values).reshape((V,) * T)
    means = []
    for observed in range(T + 1):
        axes = tuple(range(observed, T))
        mean = (probs * harm).sum(axes, keepdims=True) / probs.sum(axes, keepdims=True)
        means.append(np.broadcast_to(mean, probs.shape))
    return np.array([(probs * (means[t + 1] - means[t])**2).sum() for t in range(T)])


def score_quantities(make_policy, params, base_params, harm_values, recovery_mask,
                     prefix_dist):
    """Computes per-position gradients and Fisher matrices at `params` by enumeration.

    Returns G_t = E[Harm * grad log P(y_t | y<t)], the recovery gradient
    G~_t = -E_{y<t ~ Q}[sum_{v in R} P(v | y<t) grad log P(v | y<t)] and
    F_t = E_{y<t}[sum_v P(v | y<t) s_v s_v^T], with prefixes drawn from the
    policy at `base_params`: float [T, P], [T, P], [T, P, P].
    """
    responses = enumerate_responses(V, T)

    def log_probs(p):
        return make_policy(p).log_probs(responses)

    logp = log_probs(params)
    scores = jax.jacobian(log_probs)(params).reshape(logp.shape + (-1,))
    probs = jnp.exp(logp)
    weights = response_probs(make_policy(base_params))
    token_scores = jnp.take_along_axis(scores, responses[:, :, None, None], axis=2)[:, :, 0]
    harm_gradient = jnp.einsum("n,n,ntp->tp", weights, harm_values, token_scores)
    recovery_gradient = -jnp.einsum("n,ntv,ntvp->tp", prefix_dist,
                                    probs * recovery_mask, scores)
    fisher = jnp.einsum("n,ntv,ntvp,ntvq->tpq", weights, probs, scores, scores)
    return harm_gradient, recovery_gradient, fisher


def standard_objective(policy, base, harm_values, lam):
    """Computes lam * E_P[Harm] + KL(P || P_base) over whole responses."""
    responses = enumerate_responses(V, T)
    log_p = policy.sequence_log_prob(responses)
    log_base = base.sequence_log_prob(responses)
    return jnp.exp(log_p) @ (lam * harm_values + log_p - log_base)


# exact_equilibrium ------------------------------------------------------------


@pytest.mark.parametrize("horizon", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_equilibrium_is_gibbs_measure(seed, horizon):
    with jax.enable_x64(True):
        base, harm = make_world(seed, horizon)
        lam = 1.7
        harm_values = harm(enumerate_responses(V, T))
        optimum = equilibrium.exact_equilibrium(base, harm, lam)
        expected = response_probs(base) * jnp.exp(-lam * harm_values)
        expected = expected / expected.sum()
        np.testing.assert_allclose(response_probs(optimum), expected, rtol=1e-12)


@pytest.mark.parametrize("horizon", [1, 2])
def test_equilibrium_beats_perturbations(horizon):
    with jax.enable_x64(True):
        base, harm = make_world(3, horizon)
        lam = 2.0
        harm_values = harm(enumerate_responses(V, T))
        optimum = equilibrium.exact_equilibrium(base, harm, lam)
        best = standard_objective(optimum, base, harm_values, lam)

        gradient = jax.grad(lambda table: standard_objective(
            optimum.replace_params(table), base, harm_values, lam))(optimum.table)
        assert float(jnp.abs(gradient).max()) < 1e-12

        keys = jax.random.split(jax.random.key(4), 20)
        for key in keys:
            noise = 1e-2 * jax.random.normal(key, optimum.table.shape, jnp.float64)
            perturbed = optimum.replace_params(optimum.table + noise)
            assert float(standard_objective(perturbed, base, harm_values, lam)) > float(best)


@pytest.mark.parametrize("horizon", [1, 2])
@pytest.mark.parametrize("seed", [0, 5])
def test_equilibrium_kl_is_half_lambda_squared_info(seed, horizon):
    with jax.enable_x64(True):
        base, harm = make_world(seed, horizon)
        info = harm_information(base, harm(enumerate_responses(V, T)))
        lam = 1e-3
        optimum = equilibrium.exact_equilibrium(base, harm, lam)
        profile = np.asarray(equilibrium.exact_kl_profile(optimum, base))
        predicted = np.asarray(theory.predicted_kl_decoupled(lam, info))
        # The relative error of the prediction is O(lam).
        np.testing.assert_allclose(profile[:horizon], predicted[:horizon], rtol=1e-2)
        # Beyond the horizon P* equals P_base up to rounding.
        assert np.all(np.abs(profile[horizon:]) < 1e-15)


def test_equilibrium_kl_scales_as_lambda_squared():
    with jax.enable_x64(True):
        base, harm = make_world(6, 2)
        small, large = 1e-3, 2e-3
        profile_small = equilibrium.exact_kl_profile(
            equilibrium.exact_equilibrium(base, harm, small), base)
        profile_large = equilibrium.exact_kl_profile(
            equilibrium.exact_equilibrium(base, harm, large), base)
        slope = np.log(profile_large[:2] / profile_small[:2]) / math.log(large / small)
        np.testing.assert_allclose(slope, 2.0, atol=1e-2)


def test_equilibrium_keeps_zero_probability_tokens():
    base, harm = make_world(7, 1)
    logits = base.logit_tables()
    logits[1] = logits[1].at[..., 0].set(-jnp.inf)
    base = TabularPolicy.from_logits(logits)
    optimum = equilibrium.exact_equilibrium(base, harm, 1.0)
    assert bool(jnp.all(optimum.logit_tables()[1][..., 0] == -jnp.inf))
    assert bool(jnp.isfinite(response_probs(optimum)).all())


def test_equilibrium_rejects_bad_inputs():
    base, harm = make_world(0, 1)
    with pytest.raises(ValueError, match="lam"):
        equilibrium.exact_equilibrium(base, harm, -1.0)
    with pytest.raises(TypeError, match="TabularPolicy"):
        equilibrium.exact_equilibrium(BigramPolicy(jnp.zeros((T, V + 1, V))), harm, 1.0)
    bad_harm = TableHarm(jnp.full((V,) * T, 0.5))
    bad_harm.fn = lambda tokens: jnp.full(tokens.shape[:1], 2.0)
    with pytest.raises(ValueError, match="outside the allowed range"):
        equilibrium.exact_equilibrium(base, bad_harm, 1.0)


# exact_kl_profile ---------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class BigramPolicy(Policy):
    """A non-tabular policy whose logits at t depend on t and y_{t-1} only.

    logits[t, s] are the logits of y_t after token s (s = V stands for the
    start of the response).
    """

    def __init__(self, logits):
        self.table = logits
        self.response_length = logits.shape[0]
        self.vocab_size = logits.shape[-1]

    @property
    def params(self):
        return self.table

    def replace_params(self, params):
        return BigramPolicy(params)

    def _static(self):
        return ()

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(children[0])

    def logits(self, tokens):
        previous = jnp.concatenate(
            [jnp.full(tokens.shape[:-1] + (1,), self.vocab_size), tokens[..., :-1]], -1)
        return self.table[jnp.arange(self.response_length), previous]

    def prefill(self, tokens):
        raise NotImplementedError

    def decode_step(self, cache, tokens, position):
        raise NotImplementedError

    def as_tabular(self):
        tables = []
        for t in range(self.response_length):
            if t == 0:
                tables.append(self.table[0, self.vocab_size])
            else:
                rows = self.table[t, :self.vocab_size]
                shape = (self.vocab_size,) * (t - 1) + rows.shape
                tables.append(jnp.broadcast_to(rows, shape))
        return TabularPolicy.from_logits(tables)


def test_kl_profile_matches_node_sum():
    with jax.enable_x64(True):
        base, _ = make_world(0, 1)
        policy = TabularPolicy.random(jax.random.key(9), V, T, dtype=jnp.float64)
        profile = equilibrium.exact_kl_profile(policy, base)
        log_p = [jax.nn.log_softmax(x, -1) for x in policy.logit_tables()]
        log_b = [jax.nn.log_softmax(x, -1) for x in base.logit_tables()]
        prefix = jnp.zeros(())
        for t in range(T):
            kl = (jnp.exp(log_p[t]) * (log_p[t] - log_b[t])).sum(-1)
            assert float(profile[t]) == pytest.approx(float((jnp.exp(prefix) * kl).sum()),
                                                      rel=1e-12)
            prefix = prefix[..., None] + log_p[t]


def test_kl_profile_of_non_tabular_policy():
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(10), 3)
        policy = BigramPolicy(jax.random.normal(keys[0], (T, V + 1, V), jnp.float64))
        base = BigramPolicy(jax.random.normal(keys[1], (T, V + 1, V), jnp.float64))
        prefixes = BigramPolicy(jax.random.normal(keys[2], (T, V + 1, V), jnp.float64))
        for prefix_policy in [None, prefixes]:
            tabular_prefix = None if prefix_policy is None else prefix_policy.as_tabular()
            np.testing.assert_allclose(
                equilibrium.exact_kl_profile(policy, base, prefix_policy, batch_size=5),
                equilibrium.exact_kl_profile(policy.as_tabular(), base.as_tabular(),
                                             tabular_prefix),
                rtol=1e-12)


def test_kl_profile_prefix_policy_and_zero():
    with jax.enable_x64(True):
        base, _ = make_world(0, 1)
        np.testing.assert_array_equal(equilibrium.exact_kl_profile(base, base),
                                      np.zeros(T))
        policy = TabularPolicy.random(jax.random.key(11), V, T, dtype=jnp.float64)
        # Position 0 has a single (empty) prefix, so the prefix policy cannot matter.
        own = equilibrium.exact_kl_profile(policy, base)
        from_base = equilibrium.exact_kl_profile(policy, base, prefix_policy=base)
        assert float(own[0]) == pytest.approx(float(from_base[0]), rel=1e-14)
        assert abs(float(own[2]) - float(from_base[2])) > 1e-6


def test_kl_profile_rejects_mismatched_policies():
    base, _ = make_world(0, 1)
    other = TabularPolicy.random(jax.random.key(0), V, T + 1)
    with pytest.raises(ValueError, match="base_policy"):
        equilibrium.exact_kl_profile(base, other)
    with pytest.raises(ValueError, match="prefix_policy"):
        equilibrium.exact_kl_profile(base, base, prefix_policy=other)
    with pytest.raises(ValueError, match="batch_size"):
        equilibrium.exact_kl_profile(base, base, batch_size=0)


# Small-lambda predictions against exact optima ------------------------------------


def test_predictions_reduce_to_info_for_tabular_model():
    # For per-prefix softmax, G_t^T F_t^+ G_t = I_t exactly, and the shared
    # formula reduces to the decoupled one.
    with jax.enable_x64(True):
        base, harm = make_world(12, 2)
        harm_values = harm(enumerate_responses(V, T))
        mask = jnp.array([1.0, 0.0, 0.0])
        prefix_dist = jnp.full(V**T, 1.0 / V**T)
        harm_gradient, recovery_gradient, fisher = score_quantities(
            base.replace_params, base.table, base.table, harm_values, mask, prefix_dist)
        expected = theory.predicted_kl_decoupled(0.3, harm_information(base, harm_values))
        np.testing.assert_allclose(
            theory.predicted_kl_shared(0.3, harm_gradient.sum(0), fisher), expected,
            rtol=1e-8, atol=1e-16)
        np.testing.assert_allclose(
            theory.predicted_kl_deep(0.3, 0.0, 0.9, harm_gradient, recovery_gradient,
                                     fisher), expected, rtol=1e-8, atol=1e-16)


def test_shared_parameter_equilibrium_matches_prediction():
    with jax.enable_x64(True):
        base, harm = make_world(13, 1)
        harm_values = harm(enumerate_responses(V, T))
        num_params = 3
        directions = jax.random.normal(jax.random.key(14), base.table.shape + (num_params,),
                                       jnp.float64)

        def make_policy(theta):
            return base.replace_params(base.table + directions @ theta)

        lam = 1e-3
        objective = lambda theta: standard_objective(make_policy(theta), base,
                                                     harm_values, lam)
        theta = jnp.zeros(num_params)
        for _ in range(20):
            theta = theta - jnp.linalg.solve(jax.hessian(objective)(theta),
                                             jax.grad(objective)(theta))
        assert float(jnp.abs(jax.grad(objective)(theta)).max()) < 1e-15

        harm_gradient, _, fisher = score_quantities(
            make_policy, jnp.zeros(num_params), jnp.zeros(num_params), harm_values,
            jnp.zeros(V), jnp.zeros(V**T))
        predicted = theory.predicted_kl_shared(lam, harm_gradient.sum(0), fisher)
        profile = equilibrium.exact_kl_profile(make_policy(theta), base)
        np.testing.assert_allclose(profile, predicted, rtol=1e-2)
        # Shared parameters move positions beyond the horizon incidentally.
        assert float(profile[2]) > 1e-3 * float(profile[0])


def test_deep_equilibrium_matches_small_lambda_prediction():
    with jax.enable_x64(True):
        base, harm = make_world(15, 1)
        harm_values = harm(enumerate_responses(V, T))
        prefix_dist = jax.random.dirichlet(jax.random.key(16), jnp.ones(V**T))
        gamma = 0.8
        harm_gradient, recovery_gradient, fisher = score_quantities(
            base.replace_params, base.table, base.table, harm_values,
            jnp.array([1.0, 0.0, 0.0]), prefix_dist)
        errors = []
        for strength in [5e-4, 2.5e-4]:
            result = equilibrium.optimize_deep_objective(
                base, base, harm, strength, strength, gamma, prefix_dist, [0],
                steps=300, warmup_steps=0)
            predicted = theory.predicted_kl_deep(strength, strength, gamma, harm_gradient,
                                                 recovery_gradient, fisher)
            profile = equilibrium.exact_kl_profile(result.policy, base)
            errors.append(np.abs(np.asarray(profile / predicted) - 1))
        # The relative error of the prediction is O(lam + mu): small, and it
        # halves when lam and mu do.
        assert np.all(errors[1] < 1e-2), errors[1]
        np.testing.assert_allclose(errors[1], errors[0] / 2, rtol=0.1)


# The deep objective: recovery beyond the horizon -----------------------------------


def recovery_tolerance(result, base, harm, lam, mu, gamma, prefix_dist, tokens,
                       report):
    """Bound on |found - stationary| recovery implied by the final gradient.

    With every other conditional fixed, dH_deep/dz_{u,v} = P(u) p_v r_v, where
    p = P(. | u) and r_v = log(p_v / p*_v) - (a constant) measures how far p is
    from the stationary conditional p*. So |r_v| = |g_v| / (P(u) p_v), the
    ratio p_v / p*_v lies within exp(+-2 m) with m = max_v |r_v|, and
    |P(R | u) - P*(R | u)| <= min(P*(R), 1 - P*(R)) * expm1(2 m).
    """
    policy = result.policy
    gradient = jax.grad(lambda table: equilibrium.deep_objective(
        TabularPolicy(table, V, T), base, harm, lam, mu, gamma, prefix_dist,
        tokens))(policy.table)
    log_probs = jax.nn.log_softmax(policy.table, -1)
    level = jnp.zeros(1)
    node_log_prob = []
    for t in range(T):
        node_log_prob.append(level)
        rows = log_probs[(V**t - 1) // (V - 1):(V**(t + 1) - 1) // (V - 1)]
        level = (level[:, None] + rows).reshape(-1)
    node_log_prob = jnp.concatenate(node_log_prob)
    residual = jnp.abs(gradient) * jnp.exp(-node_log_prob[:, None] - log_probs)
    worst = residual.max(-1)[report.node]
    stationary = report.stationary
    return jnp.minimum(stationary, 1 - stationary) * jnp.expm1(2 * worst)


@pytest.fixture(scope="module")
def deep_optimum():
    """A well-conditioned deep problem, its optimum and the recovery report.

    Q is the base distribution and mu is moderate, so no prefix probability
    underflows. Returns the report and the per-node tolerance of
    `recovery_tolerance`.
    """
    with jax.enable_x64(True):
        base, harm = make_world(1, 1)
        lam, mu, gamma, tokens = 0.5, 0.5, 0.8, [0]
        prefix_dist = response_probs(base)
        result = equilibrium.optimize_deep_objective(
            base, base, harm, lam, mu, gamma, prefix_dist, tokens, steps=500,
            tolerance=1e-13)
        report = equilibrium.recovery_report(result.policy, base, mu, gamma,
                                             prefix_dist, tokens, horizon=1)
        tolerance = recovery_tolerance(result, base, harm, lam, mu, gamma, prefix_dist,
                                       tokens, report)
    # numpy keeps float64 outside the enable_x64 context.
    return jax.tree.map(np.asarray, report), np.asarray(tolerance)


def test_deep_optimum_is_stationary_beyond_horizon(deep_optimum):
    report, tolerance = deep_optimum
    # 1e-12 covers float64 rounding in the compared probabilities.
    gap = np.abs(report.recovery - report.stationary)
    assert np.all(gap <= tolerance + 1e-12), (gap, tolerance)

    last = report.position == T - 1
    gibbs_gap = np.abs(report.recovery - report.gibbs)[last]
    assert np.all(gibbs_gap <= tolerance[last] + 1e-12), (gibbs_gap, tolerance[last])


def test_gibbs_form_misses_continuation_cost(deep_optimum):
    # Before the last position, recovering and not recovering lead to
    # different future KL, which the per-prefix form sigmoid(logit(p0) + beta)
    # leaves out. So the optimum differs from that form by far more than the
    # convergence tolerance.
    report, tolerance = deep_optimum
    middle = report.position == 1
    gibbs_gap = np.abs(report.recovery - report.gibbs)[middle]
    assert gibbs_gap.max() > 100 * (tolerance[middle].max() + 1e-12)
    last = report.position == T - 1
    np.testing.assert_array_equal(report.gibbs[last], report.stationary[last])


def test_deep_optimum_without_penalty_is_gibbs_equilibrium():
    with jax.enable_x64(True):
        base, harm = make_world(2, 2)
        result = equilibrium.optimize_deep_objective(
            base, base, harm, 1.5, 0.0, 0.9, jnp.full(V**T, 1.0 / V**T), [0], steps=300,
            tolerance=1e-14)
        expected = equilibrium.exact_equilibrium(base, harm, 1.5)
        np.testing.assert_allclose(response_probs(result.policy),
                                   response_probs(expected), atol=1e-10)


def test_deep_objective_accepts_node_weights():
    with jax.enable_x64(True):
        base, harm = make_world(3, 1)
        policy = TabularPolicy.random(jax.random.key(17), V, T, dtype=jnp.float64)
        prefix_dist = jax.random.dirichlet(jax.random.key(18), jnp.ones(V**T))
        node_weights = jnp.concatenate([prefix_dist.reshape(V**t, -1).sum(1)
                                        for t in range(T)])
        args = (harm, 0.4, 1.3, 0.7)
        np.testing.assert_allclose(
            equilibrium.deep_objective(policy, base, *args, prefix_dist, [1, 2]),
            equilibrium.deep_objective(policy, base, *args, node_weights, [1, 2]),
            rtol=1e-14)


BAD_DEEP_INPUTS = [
    ({"recovery_tokens": [0, 1, 2]}, "whole vocabulary"),
    ({"recovery_tokens": []}, "recovery_tokens"),
    ({"recovery_tokens": [3]}, "recovery_tokens"),
    ({"prefix_dist": jnp.ones(5)}, "prefix_dist"),
    ({"prefix_dist": -jnp.full(V**T, 1.0 / V**T)}, "prefix_dist"),
    ({"prefix_dist": jnp.ones(V**T)}, "sum to 1"),
    ({"gamma": 0.0}, "gamma"),
    ({"mu": -1.0}, "mu"),
    ({"lam": float("nan")}, "lam"),
]


@pytest.mark.parametrize("change,message", BAD_DEEP_INPUTS)
def test_deep_objective_rejects_bad_inputs(change, message):
    base, harm = make_world(0, 1)
    arguments = dict(policy=base, base_policy=base, harm=harm, lam=1.0, mu=1.0,
                     gamma=0.9, prefix_dist=jnp.full(V**T, 1.0 / V**T),
                     recovery_tokens=[0])
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        equilibrium.deep_objective(**arguments)


def test_deep_functions_reject_bad_policies():
    base, harm = make_world(0, 1)
    uniform = jnp.full(V**T, 1.0 / V**T)
    with pytest.raises(TypeError, match="TabularPolicy"):
        equilibrium.optimize_deep_objective(BigramPolicy(jnp.zeros((T, V + 1, V))), base,
                                            harm, 1.0, 1.0, 0.9, uniform, [0])
    infinite = base.replace_params(base.table.at[0, 0].set(-jnp.inf))
    with pytest.raises(ValueError, match="non-finite"):
        equilibrium.optimize_deep_objective(base, infinite, harm, 1.0, 1.0, 0.9,
                                            uniform, [0])
    with pytest.raises(ValueError, match="steps"):
        equilibrium.optimize_deep_objective(base, base, harm, 1.0, 1.0, 0.9, uniform,
                                            [0], steps=0)
    with pytest.raises(ValueError, match="horizon"):
        equilibrium.recovery_report(base, base, 1.0, 0.9, uniform, [0], horizon=T + 1)
