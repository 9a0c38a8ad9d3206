"""Tests of the closed forms in hi_jax.theory against direct computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hi_jax import theory


def _direct_tilt(base_probs, recovery_mask, beta):
    """P* = P0 * exp(beta * 1_R) / Z and KL(P* || P0), summed term by term."""
    tilted = base_probs * np.exp(beta * recovery_mask)
    tilted = tilted / tilted.sum()
    return tilted, float(np.sum(tilted * np.log(tilted / base_probs)))


# gibbs_recovery -------------------------------------------------------------


def _recovery_problem(logits, base_probs, recovery_mask, beta):
    """beta * (1 - P(R)) + KL(P || P0) for P = softmax(logits)."""
    probs = jax.nn.softmax(logits)
    kl = jnp.sum(probs * (jnp.log(probs) - jnp.log(base_probs)))
    return beta * (1.0 - probs @ recovery_mask) + kl


@jax.jit
def _minimize_recovery_problem(base_probs, recovery_mask, beta):
    """Minimises `_recovery_problem` over logits with 100 L-BFGS steps."""
    def objective(logits):
        return _recovery_problem(logits, base_probs, recovery_mask, beta)

    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(_, carry):
        logits, state = carry
        value, grad = value_and_grad(logits, state=state)
        updates, state = optimizer.update(grad, state, logits, value=value, grad=grad,
                                          value_fn=objective)
        return optax.apply_updates(logits, updates), state

    logits = jnp.log(base_probs)
    return jax.lax.fori_loop(0, 100, step, (logits, optimizer.init(logits)))[0]


@pytest.mark.parametrize("beta", [-2.0, 0.5, 3.0])
def test_gibbs_recovery_is_numerical_minimum(beta):
    with jax.enable_x64(True):
        base_probs = jnp.array([0.1, 0.35, 0.05, 0.5])
        recovery_mask = jnp.array([1.0, 0.0, 1.0, 0.0])
        p0 = float(base_probs @ recovery_mask)
        logits = _minimize_recovery_problem(base_probs, recovery_mask, jnp.asarray(beta))
        minimum = float(_recovery_problem(logits, base_probs, recovery_mask, beta))
        numerical_recovery = float(jax.nn.softmax(logits) @ recovery_mask)
        numerical_kl = minimum - beta * (1.0 - numerical_recovery)

        recovery, kl = theory.gibbs_recovery(p0, beta)
        assert float(recovery) == pytest.approx(numerical_recovery, abs=1e-9)
        assert float(kl) == pytest.approx(numerical_kl, abs=1e-9)
        assert minimum >= beta * (1 - float(recovery)) + float(kl) - 1e-12


@pytest.mark.parametrize("beta", [-30.0, -1.0, 1e-3, 0.7, 5.0, 30.0])
def test_gibbs_kl_equals_direct_kl(beta):
    with jax.enable_x64(True):
        base_probs = np.array([0.02, 0.3, 0.08, 0.6])
        recovery_mask = np.array([1.0, 0.0, 1.0, 0.0])
        tilted, direct_kl = _direct_tilt(base_probs, recovery_mask, beta)
        recovery, kl = theory.gibbs_recovery(base_probs @ recovery_mask, beta)
        assert float(recovery) == pytest.approx(tilted @ recovery_mask, rel=1e-12)
        assert float(kl) == pytest.approx(direct_kl, rel=1e-9)


def test_gibbs_recovery_at_tiny_p0_and_large_beta():
    with jax.enable_x64(True):
        p0 = 1e-12
        recovery, kl = theory.gibbs_recovery(p0, 0.0)
        assert float(recovery) == pytest.approx(p0, rel=1e-12)
        assert float(kl) == 0.0

        recovery, kl = theory.gibbs_recovery(p0, 1e3)
        assert float(recovery) == 1.0
        assert float(kl) == pytest.approx(-math.log(p0), rel=1e-12)

        recovery, kl = theory.gibbs_recovery(p0, -1e3)
        assert 0.0 <= float(recovery) < 1e-300
        assert float(kl) == pytest.approx(-math.log1p(-p0), rel=1e-9)

        recovery, kl = theory.gibbs_recovery(1.0 - 1e-12, -1e3)
        assert float(recovery) == 0.0
        assert float(kl) == pytest.approx(-math.log(1e-12), rel=1e-4)

        recovery, kl = theory.gibbs_recovery(p0, 20.0)
        expected_recovery = p0 * math.exp(20.0) / (1 - p0 + p0 * math.exp(20.0))
        assert float(recovery) == pytest.approx(expected_recovery, rel=1e-12)


@pytest.mark.parametrize("x64", [False, True])
def test_gibbs_kl_small_beta_is_quadratic(x64):
    # KL = p0 (1 - p0) beta**2 / 2 + O(beta**3) without cancellation.
    with jax.enable_x64(x64):
        for p0 in [1e-12, 0.3]:
            for beta in [1e-8, 1e-4]:
                _, kl = theory.gibbs_recovery(p0, beta)
                expected = p0 * (1 - p0) * beta**2 / 2
                assert float(kl) == pytest.approx(expected, rel=1e-3)


def test_gibbs_recovery_float32_outputs_finite():
    p0 = jnp.array([1e-12, 1e-6, 0.5, 0.999], jnp.float32)
    for beta in [-1e4, -50.0, 0.0, 1e-9, 50.0, 1e4]:
        recovery, kl = theory.gibbs_recovery(p0, beta)
        assert recovery.dtype == jnp.float32
        assert bool(jnp.isfinite(recovery).all())
        assert bool(jnp.isfinite(kl).all())
        assert bool((kl >= 0).all())


# Robustness closed forms ----------------------------------------------------


def test_recovery_guarantee_is_worst_position_gibbs():
    with jax.enable_x64(True):
        p_min, mu, gamma, length = 0.01, 5.0, 0.9, 6
        per_position = [theory.gibbs_recovery(p_min, mu * gamma**t)[0]
                        for t in range(length)]
        guarantee = theory.recovery_guarantee(p_min, mu, gamma, length)
        assert float(guarantee) == pytest.approx(float(min(per_position)), rel=1e-14)
        logit = math.log(p_min / (1 - p_min))
        expected = 1 / (1 + math.exp(-(logit + mu * gamma**(length - 1))))
        assert float(guarantee) == pytest.approx(expected, rel=1e-14)


def test_recovery_guarantee_extremes():
    with jax.enable_x64(True):
        assert float(theory.recovery_guarantee(1e-12, 0.0, 0.5, 3)) == pytest.approx(
            1e-12, rel=1e-12)
        assert float(theory.recovery_guarantee(1e-12, 1e4, 1.0, 3)) == 1.0
    assert bool(jnp.isfinite(theory.recovery_guarantee(1e-12, 1e4, 0.99, 1000)))


ATTACK_CASES = [
    # delta, p_min, mu, gamma
    (0.5, 0.01, 10.0, 0.8),
    (0.9, 1e-6, 50.0, 0.95),
    (0.2, 1e-12, 100.0, 0.5),
    (0.5, 0.3, 0.9, 0.7),
]


@pytest.mark.parametrize("delta,p_min,mu,gamma", ATTACK_CASES)
def test_attack_prefix_length_matches_guarantee(delta, p_min, mu, gamma):
    with jax.enable_x64(True):
        t_attack = float(theory.attack_prefix_length(delta, p_min, mu, gamma))
        assert math.isfinite(t_attack)
        assert t_attack >= 1
        # At the continuous depth the guarantee equals delta exactly.
        logit = math.log(p_min / (1 - p_min))
        boundary = 1 / (1 + math.exp(-(logit + mu * gamma**(t_attack - 1))))
        assert boundary == pytest.approx(delta, rel=1e-12)
        deepest_safe = math.floor(t_attack)
        assert float(theory.recovery_guarantee(p_min, mu, gamma, deepest_safe)) >= delta
        first_broken = math.ceil(t_attack) if t_attack % 1 else deepest_safe + 1
        assert float(theory.recovery_guarantee(p_min, mu, gamma, first_broken)) < delta


def test_attack_prefix_length_infinite_cases():
    with jax.enable_x64(True):
        gap = math.log(0.5 / 0.5) - math.log(0.01 / 0.99)
        # gamma = 1 and mu >= logit(delta) - logit(p_min): no prefix suffices.
        assert float(theory.attack_prefix_length(0.5, 0.01, gap, 1.0)) == math.inf
        assert float(theory.recovery_guarantee(0.01, gap, 1.0, 10**6)) >= 0.5 - 1e-15
        # delta <= p_min: the base floor already meets delta.
        assert float(theory.attack_prefix_length(0.005, 0.01, 0.0, 0.5)) == math.inf
        assert float(theory.attack_prefix_length(0.01, 0.01, 1.0, 0.5)) == math.inf
        # Recovery is below delta even at position 0.
        assert float(theory.attack_prefix_length(0.5, 0.01, 0.9 * gap, 1.0)) == -math.inf
        assert float(theory.recovery_guarantee(0.01, 0.9 * gap, 1.0, 1)) < 0.5
        assert float(theory.attack_prefix_length(0.5, 0.01, 0.0, 0.5)) == -math.inf


def test_recovery_kl_bound_is_stated_sum():
    with jax.enable_x64(True):
        p_min, mu, gamma, horizon, length = 0.01, 3.0, 0.9, 1, 5
        expected = sum(mu * gamma**t - math.log(1 - p_min + p_min * math.exp(mu * gamma**t))
                       for t in range(horizon, length))
        bound = theory.recovery_kl_bound(p_min, mu, gamma, horizon, length)
        assert float(bound) == pytest.approx(expected, rel=1e-13)


def test_recovery_kl_bound_covers_every_p0():
    with jax.enable_x64(True):
        p_min, mu, gamma, horizon, length = 0.01, 3.0, 0.9, 2, 8
        bound = float(theory.recovery_kl_bound(p_min, mu, gamma, horizon, length))
        rng = np.random.default_rng(0)
        beta = mu * gamma ** np.arange(horizon, length)
        for _ in range(200):
            p0 = rng.uniform(p_min, 1.0, size=beta.shape)
            total = float(theory.gibbs_recovery(p0, beta)[1].sum())
            assert total <= bound
        # The Gibbs KL at p0 = p_min alone would not bound it: KL is not
        # monotone in p0.
        kl_at_p_min = float(theory.gibbs_recovery(p_min, 3.0)[1])
        kl_at_larger_p0 = float(theory.gibbs_recovery(0.1, 3.0)[1])
        assert kl_at_larger_p0 > kl_at_p_min


def test_recovery_kl_bound_limits():
    with jax.enable_x64(True):
        assert float(theory.recovery_kl_bound(0.01, 3.0, 0.9, 4, 4)) == 0.0
        assert float(theory.recovery_kl_bound(0.01, 0.0, 0.9, 0, 4)) == 0.0
        saturated = theory.recovery_kl_bound(1e-12, 1e6, 1.0, 1, 4)
        assert float(saturated) == pytest.approx(3 * -math.log(1e-12), rel=1e-12)


# Equilibrium predictions ----------------------------------------------------


def test_predicted_kl_decoupled_formula():
    info = jnp.array([0.2, 0.05, 0.0])
    np.testing.assert_allclose(theory.predicted_kl_decoupled(0.1, info),
                               0.005 * np.array([0.2, 0.05, 0.0]), rtol=1e-6)


def test_predicted_kl_shared_block_diagonal():
    # With F_t on disjoint parameter blocks, F_tot^+ F_t F_tot^+ = F_t^+ on
    # block t, so the shared prediction is (lam**2 / 2) g_t^T F_t^-1 g_t.
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        blocks = []
        for _ in range(3):
            a = rng.normal(size=(2, 2))
            blocks.append(a @ a.T + 0.1 * np.eye(2))
        fisher = np.zeros((3, 6, 6))
        for t, block in enumerate(blocks):
            fisher[t, 2 * t:2 * t + 2, 2 * t:2 * t + 2] = block
        gradient = rng.normal(size=6)
        lam = 0.3
        expected = [lam**2 / 2 * gradient[2 * t:2 * t + 2]
                    @ np.linalg.solve(blocks[t], gradient[2 * t:2 * t + 2])
                    for t in range(3)]
        np.testing.assert_allclose(theory.predicted_kl_shared(lam, gradient, fisher),
                                   expected, rtol=1e-10)
        # The decoupled deep prediction with mu = 0 agrees.
        per_position = np.zeros((3, 6))
        for t in range(3):
            per_position[t, 2 * t:2 * t + 2] = gradient[2 * t:2 * t + 2]
        deep = theory.predicted_kl_deep(lam, 0.0, 1.0, per_position,
                                        np.zeros_like(per_position), fisher)
        np.testing.assert_allclose(deep, expected, rtol=1e-10)


def test_predicted_kl_shared_ignores_null_directions():
    # Appending a parameter that no position depends on leaves F_tot singular;
    # the pseudo-inverse gives the same prediction.
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        scores = rng.normal(size=(2, 4, 3))
        fisher = np.einsum("tnp,tnq->tpq", scores, scores)
        gradient = rng.normal(size=3)
        padded_fisher = np.zeros((2, 4, 4))
        padded_fisher[:, :3, :3] = fisher
        padded_gradient = np.append(gradient, 0.0)
        np.testing.assert_allclose(
            theory.predicted_kl_shared(0.2, padded_gradient, padded_fisher),
            theory.predicted_kl_shared(0.2, gradient, fisher), rtol=1e-10)


def test_predicted_kl_deep_discounts_recovery():
    with jax.enable_x64(True):
        fisher = np.stack([np.eye(2)] * 3)
        recovery_gradient = np.ones((3, 2))
        mu, gamma = 0.5, 0.8
        deep = theory.predicted_kl_deep(0.0, mu, gamma, np.zeros((3, 2)),
                                        recovery_gradient, fisher)
        expected = [mu**2 * gamma**(2 * t) / 2 * 2.0 for t in range(3)]
        np.testing.assert_allclose(deep, expected, rtol=1e-12)


# jit and vmap ---------------------------------------------------------------


def _first(output):
    return output[0] if isinstance(output, tuple) else output


SCALAR_FUNCTIONS = [
    (lambda p, b: theory.gibbs_recovery(p, b)[0], (jnp.array([1e-12, 0.2, 0.9]),
                                                   jnp.array([3.0, -1.0, 0.001]))),
    (lambda p, b: theory.gibbs_recovery(p, b)[1], (jnp.array([1e-12, 0.2, 0.9]),
                                                   jnp.array([3.0, -1.0, 0.001]))),
    (lambda p, mu: theory.recovery_guarantee(p, mu, 0.9, 4),
     (jnp.array([1e-12, 0.2, 0.9]), jnp.array([0.0, 1.0, 10.0]))),
    (lambda p, mu: theory.recovery_kl_bound(p, mu, 0.9, 1, 4),
     (jnp.array([1e-12, 0.2, 0.9]), jnp.array([0.0, 1.0, 10.0]))),
    (lambda d, mu: theory.attack_prefix_length(d, 0.01, mu, 0.8),
     (jnp.array([0.5, 0.005, 0.9]), jnp.array([10.0, 1.0, 0.0]))),
    (lambda lam, scale: theory.predicted_kl_decoupled(lam, scale * jnp.ones(3)),
     (jnp.array([0.0, 0.1, 1.0]), jnp.array([1.0, 2.0, 3.0]))),
    (lambda lam, scale: theory.predicted_kl_shared(
        lam, scale * jnp.ones(2), jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])),
     (jnp.array([0.0, 0.1, 1.0]), jnp.array([1.0, 2.0, 3.0]))),
    (lambda lam, mu: theory.predicted_kl_deep(
        lam, mu, 0.9, jnp.ones((2, 2)), -jnp.ones((2, 2)),
        jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])),
     (jnp.array([0.0, 0.1, 1.0]), jnp.array([1.0, 2.0, 3.0]))),
]


@pytest.mark.parametrize("function,batch", SCALAR_FUNCTIONS)
def test_function_under_jit_and_vmap(function, batch):
    eager = [np.asarray(function(*(x[i] for x in batch))) for i in range(3)]
    jitted = [np.asarray(jax.jit(function)(*(x[i] for x in batch))) for i in range(3)]
    vmapped = np.asarray(jax.vmap(function)(*batch))
    for i in range(3):
        np.testing.assert_allclose(jitted[i], eager[i], rtol=1e-6)
        np.testing.assert_allclose(vmapped[i], eager[i], rtol=1e-6)


def test_recovery_guarantee_traced_length():
    lengths = jnp.array([1, 3, 5])
    vmapped = jax.vmap(lambda n: theory.recovery_guarantee(0.1, 2.0, 0.5, n))(lengths)
    for i, n in enumerate([1, 3, 5]):
        assert float(vmapped[i]) == pytest.approx(
            float(theory.recovery_guarantee(0.1, 2.0, 0.5, n)), rel=1e-6)


def test_recovery_kl_bound_static_length_under_jit():
    jitted = jax.jit(theory.recovery_kl_bound, static_argnames="response_length")
    assert float(jitted(0.01, 3.0, 0.9, 1, response_length=5)) == pytest.approx(
        float(theory.recovery_kl_bound(0.01, 3.0, 0.9, 1, 5)), rel=1e-6)
    with pytest.raises(ValueError, match="response_length"):
        jax.jit(theory.recovery_kl_bound)(0.01, 3.0, 0.9, 1, 5)


# Input validation -----------------------------------------------------------

BAD_INPUTS = [
    (theory.gibbs_recovery, (0.0, 1.0), "p0"),
    (theory.gibbs_recovery, (1.0, 1.0), "p0"),
    (theory.gibbs_recovery, (np.array([0.2, 1.5]), 1.0), "p0"),
    (theory.gibbs_recovery, (float("nan"), 1.0), "p0"),
    (theory.gibbs_recovery, (0.5, float("inf")), "beta"),
    (theory.recovery_guarantee, (0.0, 1.0, 0.9, 3), "p_min"),
    (theory.recovery_guarantee, (0.1, -1.0, 0.9, 3), "mu"),
    (theory.recovery_guarantee, (0.1, float("inf"), 0.9, 3), "mu"),
    (theory.recovery_guarantee, (0.1, 1.0, 0.0, 3), "gamma"),
    (theory.recovery_guarantee, (0.1, 1.0, 1.5, 3), "gamma"),
    (theory.recovery_guarantee, (0.1, 1.0, 0.9, 0), "response_length"),
    (theory.recovery_guarantee, (0.1, 1.0, 0.9, 2.5), "response_length"),
    (theory.recovery_kl_bound, (0.1, 1.0, 0.9, 4, 3), "horizon"),
    (theory.recovery_kl_bound, (0.1, 1.0, 0.9, -1, 3), "horizon"),
    (theory.recovery_kl_bound, (0.1, 1.0, 0.9, 1, 0), "response_length"),
    (theory.recovery_kl_bound, (1.2, 1.0, 0.9, 1, 3), "p_min"),
    (theory.attack_prefix_length, (1.0, 0.1, 1.0, 0.9), "delta"),
    (theory.attack_prefix_length, (0.5, 0.0, 1.0, 0.9), "p_min"),
    (theory.attack_prefix_length, (0.5, 0.1, -2.0, 0.9), "mu"),
    (theory.attack_prefix_length, (0.5, 0.1, 1.0, -0.5), "gamma"),
    (theory.predicted_kl_decoupled, (-0.1, np.ones(3)), "lam"),
    (theory.predicted_kl_decoupled, (0.1, np.array([1.0, np.nan])), "harm_information"),
    (theory.predicted_kl_shared, (-1.0, np.ones(2), np.stack([np.eye(2)] * 3)), "lam"),
    (theory.predicted_kl_shared, (0.1, np.ones(3), np.stack([np.eye(2)] * 3)),
     "total_gradient"),
    (theory.predicted_kl_shared, (0.1, np.ones(2), np.eye(2)), "fisher_per_position"),
    (theory.predicted_kl_deep, (0.1, -1.0, 0.9, np.ones((3, 2)), np.ones((3, 2)),
                                np.stack([np.eye(2)] * 3)), "mu"),
    (theory.predicted_kl_deep, (0.1, 1.0, 0.9, np.ones((3, 2)), np.ones((2, 2)),
                                np.stack([np.eye(2)] * 3)), "recovery_gradient"),
]


@pytest.mark.parametrize("function,args,name", BAD_INPUTS)
def test_bad_input_raises_naming_argument(function, args, name):
    with pytest.raises(ValueError, match=name):
        function(*args)


def test_error_message_states_value_and_range():
    with pytest.raises(ValueError, match=r"p0 must be a probability in the open "
                       r"interval \(0, 1\); got 1.5 at index \(1,\)"):
        theory.gibbs_recovery(np.array([0.2, 1.5]), 1.0)
    with pytest.raises(ValueError, match=r"gamma must be in the interval \(0, 1\]; "
                       r"got 0.0"):
        theory.recovery_guarantee(0.1, 1.0, 0.0, 3)
