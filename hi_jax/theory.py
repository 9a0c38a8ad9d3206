"""Closed forms of the theory: Gibbs recovery, robustness bounds, equilibrium KL.

Positions are 0-based, as everywhere in hi_jax: position t is preceded by t
response tokens, and the recovery penalty of the deep objective weights
position t by mu * gamma**t (gamma**(t - 1) in 1-based notation). A harm
with horizon k reads y_0 .. y_{k-1}, so positions t >= k lie beyond it.

Every function validates concrete inputs eagerly and raises ValueError naming
the argument, the value and the allowed range. Traced inputs (under jit or
vmap) skip the value checks, so out-of-range values there produce NaN or inf
instead of an error. All functions are jittable and vmappable. Functions of
probabilities work in log-odds so that probabilities down to 1e-12 stay
accurate.

References:
  Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Input validation -----------------------------------------------------------


def _concrete(value) -> np.ndarray | None:
    """Returns the value as a numpy array, or None when it is traced."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def _raise_first_bad(name: str, values: np.ndarray, ok: np.ndarray,
                     allowed: str) -> None:
    if ok.all():
        return
    index = np.unravel_index(int(np.argmin(ok)), ok.shape) if ok.ndim else ()
    where = f" at index {tuple(int(i) for i in index)}" if index else ""
    raise ValueError(f"{name} must be {allowed}; got {values[index].item()!r}{where}")


def _check_probability(name: str, value) -> None:
    values = _concrete(value)
    if values is not None:
        _raise_first_bad(name, values, (values > 0) & (values < 1),
                         "a probability in the open interval (0, 1)")


def _check_nonnegative(name: str, value) -> None:
    values = _concrete(value)
    if values is not None:
        _raise_first_bad(name, values, np.isfinite(values) & (values >= 0),
                         "finite and >= 0")


def _check_finite(name: str, value) -> None:
    values = _concrete(value)
    if values is not None:
        _raise_first_bad(name, values, np.isfinite(values), "finite")


def _check_discount(name: str, value) -> None:
    values = _concrete(value)
    if values is not None:
        _raise_first_bad(name, values, (values > 0) & (values <= 1),
                         "in the interval (0, 1]")


def _check_length(name: str, value, minimum: int) -> None:
    values = _concrete(value)
    if values is None:
        return
    if not np.issubdtype(values.dtype, np.integer) or values.dtype == bool:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r} "
                         f"of dtype {values.dtype}")
    _raise_first_bad(name, values, values >= minimum, f"an integer >= {minimum}")


def _static_length(name: str, value, minimum: int) -> int:
    """Returns a length that sets an array size, so it must be a concrete integer."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} sets the number of positions and must be a concrete Python "
            "integer; under jax.jit pass it through static_argnames")
    _check_length(name, value, minimum)
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar integer; got shape {np.shape(value)}")
    return int(value)


def _as_float(value) -> jax.Array:
    """Converts the value to a floating JAX array (integers become the default float)."""
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        array = array.astype(jnp.result_type(float))
    return array


def _promote(*arrays: jax.Array) -> list[jax.Array]:
    """Casts arrays to their common dtype and broadcasts them together."""
    dtype = jnp.result_type(*arrays)
    return list(jnp.broadcast_arrays(*[a.astype(dtype) for a in arrays]))


def _logit(p: jax.Array) -> jax.Array:
    return jnp.log(p) - jnp.log1p(-p)


# Gibbs recovery --------------------------------------------------------------


def _bernoulli_tilt_kl(p0: jax.Array, log_odds: jax.Array,
                       beta: jax.Array) -> jax.Array:
    """Computes KL(Bernoulli(sigmoid(a + beta)) || Bernoulli(p0)) with a = logit(p0).

    Two formulas cover the range without cancellation:
      * for |beta| below a dtype-dependent switch, the cumulant series
        KL = sum_{n>=2} (n - 1) kappa_n beta**n / n!, where kappa_n are the
        cumulants of Bernoulli(p0), kept up to n = 6;
      * otherwise the Bregman form of softplus with b = a + beta,
        KL = softplus(a) - softplus(b) + beta * sigmoid(b), rewritten through
        softplus(x) = x + softplus(-x) as
        softplus(-a) - softplus(-b) - beta * sigmoid(-b) when b > 0, so no
        term grows with beta.
    The series truncation error is about beta**5 / 210 relative, and the
    rounding error of the Bregman form is about 2 * eps / beta**2 relative.
    The switch (420 * eps)**(1/7) balances the two, so it is about 0.014 in
    float64 and 0.24 in float32.
    """
    dtype = jnp.result_type(log_odds, beta)
    switch = (420.0 * float(jnp.finfo(dtype).eps)) ** (1.0 / 7.0)
    small = jnp.abs(beta) < switch

    # Cumulant series. Beta is zeroed where unused so that no branch overflows.
    x = jnp.where(small, beta, 0.0)
    p = p0
    q = 1.0 - p0
    variance = p * q
    kappa3 = variance * (1.0 - 2.0 * p)
    kappa4 = variance * (1.0 - 6.0 * p * q)
    kappa5 = kappa3 * (1.0 - 12.0 * p * q)
    kappa6 = variance * (1.0 - 30.0 * variance + 120.0 * variance**2)
    series = x**2 * (variance / 2.0 + x * (kappa3 / 3.0 + x * (
        kappa4 / 8.0 + x * (kappa5 / 30.0 + x * kappa6 / 144.0))))

    # Bregman form of softplus.
    y = jnp.where(small, 1.0, beta)
    b = log_odds + y
    negative_side = (jax.nn.softplus(log_odds) - jax.nn.softplus(b)
                     + y * jax.nn.sigmoid(b))
    positive_side = (jax.nn.softplus(-log_odds) - jax.nn.softplus(-b)
                     - y * jax.nn.sigmoid(-b))
    bregman = jnp.where(b > 0, positive_side, negative_side)

    # Rounding can leave a tiny negative value where the true KL is ~0.
    return jnp.maximum(jnp.where(small, series, bregman), 0.0)


def gibbs_recovery(p0, beta) -> tuple[jax.Array, jax.Array]:
    """Solves the per-prefix recovery problem in closed form.

    The problem: given a next-token distribution P0 over the vocabulary whose
    recovery set R has probability P0(R) = p0, find

        P* = argmin_P  beta * (1 - P(R)) + KL(P || P0)

    over all distributions P on the vocabulary. Setting the derivative of the
    Lagrangian to zero gives the Gibbs measure
    P*(v) = P0(v) * exp(beta * 1[v in R]) / Z with Z = 1 - p0 + p0 * e**beta,
    which is the unique minimiser because KL is strictly convex. The tilt is
    constant on R and on its complement, so only p0 matters:

        P*(R) = p0 * e**beta / Z = sigmoid(logit(p0) + beta),
        KL(P* || P0) = sum_v P*(v) * (beta * 1[v in R] - log Z)
                     = beta * P*(R) - log Z,

    which equals the KL between Bernoulli(P*(R)) and Bernoulli(p0). For the
    deep objective beyond the harm horizon, beta = mu * gamma**t at position
    t, times an importance weight when prefixes come from another
    distribution (see `hi_jax.equilibrium.recovery_report`).

    Args:
      p0: float [...], base recovery probability P0(R) in (0, 1).
      beta: float [...], broadcastable with p0, finite; the penalty on
        recovery failure. Negative beta penalises recovery instead.

    Returns:
      (recovery, kl), both float [broadcast shape]: P*(R) and KL(P* || P0)
      in nats. As beta -> +inf, recovery -> 1 and kl -> -log(p0). As
      beta -> -inf, recovery -> 0 and kl -> -log(1 - p0).

    Raises:
      ValueError: if a concrete p0 is outside (0, 1) or beta is not finite.

    References:
      Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
    """
    _check_probability("p0", p0)
    _check_finite("beta", beta)
    p0 = _as_float(p0)
    beta = _as_float(beta)
    p0, beta = _promote(p0, beta)
    log_odds = _logit(p0)
    recovery = jax.nn.sigmoid(log_odds + beta)
    kl = _bernoulli_tilt_kl(p0, log_odds, beta)
    return recovery, kl


# Robustness --------------------------------------------------------------------


def recovery_guarantee(p_min, mu, gamma, response_length) -> jax.Array:
    """Returns the guaranteed recovery probability of the deep optimum at depth T.

    If the base model recovers with probability at least p_min after every
    prefix, the per-prefix Gibbs solution recovers at position t with
    probability sigmoid(logit(p0) + mu * gamma**t) >= sigmoid(logit(p_min)
    + mu * gamma**t). The weight gamma**t is smallest at the last position
    t = T - 1, so every position 0 .. T - 1 recovers with probability at least

        epsilon* = sigmoid(logit(p_min) + mu * gamma**(T - 1)).

    Args:
      p_min: float [...], lower bound on base recovery, in (0, 1).
      mu: float [...], recovery penalty strength, finite and >= 0.
      gamma: float [...], discount in (0, 1].
      response_length: int [...], the depth T >= 1.

    Returns:
      float [broadcast shape], epsilon* in (0, 1).

    Raises:
      ValueError: on concrete arguments outside these ranges.

    References:
      Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
    """
    _check_probability("p_min", p_min)
    _check_nonnegative("mu", mu)
    _check_discount("gamma", gamma)
    _check_length("response_length", response_length, 1)
    p_min, mu, gamma = _promote(_as_float(p_min), _as_float(mu), _as_float(gamma))
    exponent = jnp.asarray(response_length) - 1
    return jax.nn.sigmoid(_logit(p_min) + mu * gamma**exponent)


def recovery_kl_bound(p_min, mu, gamma, horizon, response_length) -> jax.Array:
    """Returns the bound on the total KL of the deep optimum beyond the horizon.

    At a position t >= k beyond the harm horizon, with beta_t = mu * gamma**t,
    the per-prefix Gibbs solution costs KL = beta_t * P*(R) - log Z_t with
    Z_t = 1 - p0 + p0 * e**beta_t. Using P*(R) <= 1 and the fact that Z_t
    grows with p0 >= p_min gives the bound

        sum_{t=k}^{T-1} [beta_t - log(1 - p_min + p_min * e**beta_t)]
          = sum_{t=k}^{T-1} -log(p_min + (1 - p_min) * e**(-beta_t)).

    Each term is at most -log(p_min). The per-position Gibbs KL evaluated at
    p0 = p_min is not a bound: that KL is not monotone in p0 (for beta = 3
    it is 0.33 nats at p0 = 0.01 and 1.00 nats at p0 = 0.1).

    Args:
      p_min: float [...], lower bound on base recovery, in (0, 1).
      mu: float [...], recovery penalty strength, finite and >= 0.
      gamma: float [...], discount in (0, 1].
      horizon: int [...], the harm horizon k, 0 <= k <= T; may be traced.
      response_length: the number of positions T >= 1 as a concrete Python
        integer (it sets an array size; under jit make it static).

    Returns:
      float [broadcast shape], the bound in nats; 0 when k = T.

    Raises:
      ValueError: on concrete arguments outside these ranges, or a traced
        response_length.

    References:
      Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
    """
    _check_probability("p_min", p_min)
    _check_nonnegative("mu", mu)
    _check_discount("gamma", gamma)
    length = _static_length("response_length", response_length, 1)
    _check_length("horizon", horizon, 0)
    horizon_values = _concrete(horizon)
    if horizon_values is not None and (horizon_values > length).any():
        raise ValueError(f"horizon must be an integer in [0, response_length="
                         f"{length}]; got {horizon!r}")
    p_min, mu, gamma = _promote(_as_float(p_min), _as_float(mu), _as_float(gamma))
    positions = jnp.arange(length)
    beta = mu[..., None] * gamma[..., None] ** positions
    p_min = p_min[..., None]
    # -log(p_min + (1 - p_min) e^-beta): log1p is exact near beta = 0, and
    # logaddexp avoids the cancellation in 1 - (1 - p_min) for large beta.
    near_zero = -jnp.log1p((1.0 - p_min) * jnp.expm1(-jnp.minimum(beta, 1.0)))
    far = -jnp.logaddexp(jnp.log(p_min), jnp.log1p(-p_min) - beta)
    per_position = jnp.where(beta < 1.0, near_zero, far)
    beyond = positions >= jnp.asarray(horizon)[..., None]
    return jnp.where(beyond, per_position, 0.0).sum(axis=-1)


def attack_prefix_length(delta, p_min, mu, gamma) -> jax.Array:
    """Returns the depth t_attack up to which the deep optimum keeps recovery >= delta.

    The guaranteed recovery at position t is sigmoid(logit(p_min) +
    mu * gamma**t). It is at least delta iff mu * gamma**t >= d with
    d = logit(delta) - logit(p_min), which for gamma < 1 and d > 0 holds iff
    t + 1 <= t_attack, where

        t_attack = 1 + (log(mu) - log(d)) / log(1 / gamma).

    In terms of `recovery_guarantee`: recovery_guarantee(p_min, mu, gamma, T)
    >= delta iff T <= t_attack. An attacker who prefills L tokens faces
    position L, so the shortest prefill that pushes the guaranteed recovery
    below delta has floor(t_attack) tokens (for t_attack >= 0). With 1-based
    positions, t_attack is the index of the last position at which recovery
    is still guaranteed. "Why Is RLHF Alignment Shallow?" calls this
    quantity the minimum attack prefix length.

    Special cases, all consistent with the rule T <= t_attack:
      * delta <= p_min: returns +inf. The base floor p_min already meets
        delta, and the penalty only raises recovery, so no prefix pushes the
        guarantee below delta (the formula would take the log of d <= 0).
      * gamma = 1 and mu >= d: returns +inf, because the penalty mu is the
        same at every position and is enough everywhere.
      * gamma = 1 and mu < d, or mu = 0 with d > 0: returns -inf, because
        recovery is below delta at every position, including position 0.

    Args:
      delta: float [...], target recovery probability in (0, 1).
      p_min: float [...], lower bound on base recovery, in (0, 1).
      mu: float [...], recovery penalty strength, finite and >= 0.
      gamma: float [...], discount in (0, 1].

    Returns:
      float [broadcast shape], t_attack; may be +inf or -inf as above.

    Raises:
      ValueError: on concrete arguments outside these ranges.

    References:
      Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
    """
    _check_probability("delta", delta)
    _check_probability("p_min", p_min)
    _check_nonnegative("mu", mu)
    _check_discount("gamma", gamma)
    delta, p_min, mu, gamma = _promote(_as_float(delta), _as_float(p_min),
                                       _as_float(mu), _as_float(gamma))
    gap = _logit(delta) - _logit(p_min)
    inf = jnp.asarray(jnp.inf, gap.dtype)

    # Safe operands keep every branch finite, and jnp.where picks the valid one.
    finite_case = (gap > 0) & (mu > 0) & (gamma < 1)
    safe_gap = jnp.where(finite_case, gap, 1.0)
    safe_mu = jnp.where(finite_case, mu, 1.0)
    safe_gamma = jnp.where(finite_case, gamma, 0.5)
    finite_value = 1.0 + (jnp.log(safe_mu) - jnp.log(safe_gap)) / -jnp.log(safe_gamma)

    undiscounted = jnp.where(mu >= gap, inf, -inf)
    value = jnp.where(gamma < 1, jnp.where(mu > 0, finite_value, -inf), undiscounted)
    return jnp.where(gap <= 0, inf, value)


# Small-lambda equilibrium predictions ---------------------------------------


def predicted_kl_decoupled(lam, harm_information) -> jax.Array:
    """Predicts the per-position equilibrium KL of a decoupled (tabular) model.

    For a model with separate softmax logits for every prefix, the minimiser
    of lam * E_P[Harm] + KL(P || P_base) is P_base * exp(-lam * Harm) / Z,
    and its per-position KL is

        D_KL^(t) = (lam**2 / 2) * I_t + O(lam**3),

    where I_t = E_{y<t}[Var_{y_t | y<t}(h_t)] is the harm information under
    P_base. The constant 1/2 is exact here because, per prefix, the score
    Fisher of a softmax maps h_t to Cov(h_t, score), so
    G_t^T F_t^+ G_t = I_t.

    Args:
      lam: float [...], harm weight, finite and >= 0.
      harm_information: float [..., T], I_t, finite. Negative Monte Carlo
        estimates pass through unchanged.

    Returns:
      float [..., T], the predicted D_KL^(t) in nats.

    References:
      Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
    """
    _check_nonnegative("lam", lam)
    _check_finite("harm_information", harm_information)
    lam = _as_float(lam)
    return 0.5 * lam[..., None] ** 2 * _as_float(harm_information)


def _check_matrix_shapes(gradient_name: str, gradient_shape: tuple,
                         fisher_shape: tuple) -> None:
    if len(fisher_shape) != 3 or fisher_shape[1] != fisher_shape[2]:
        raise ValueError(f"fisher_per_position must have shape [T, P, P]; got "
                         f"{fisher_shape}")
    if gradient_shape[-1] != fisher_shape[-1]:
        raise ValueError(
            f"{gradient_name} has P={gradient_shape[-1]} parameters but "
            f"fisher_per_position has P={fisher_shape[-1]}; shapes {gradient_shape} "
            f"and {fisher_shape}")


def predicted_kl_deep(lam, mu, gamma, harm_gradient, recovery_gradient,
                      fisher_per_position) -> jax.Array:
    """Predicts the per-position KL at the optimum of the deep objective.

    For per-position (decoupled) parameters and small lam and mu, the
    minimiser of
        lam * E_P[Harm] + KL(P || P_base)
          + mu * E_{y ~ Q}[sum_t gamma**t * (1 - P(y_t in R | y<t))]
    has

        D_KL^(t) = 1/2 * v_t^T F_t^+ v_t + O((lam + mu)**3),
        v_t = lam * G_t + mu * gamma**t * G~_t,

    with, all at the base parameters: G_t = E_{y<t}[Cov_{y_t|y<t}(h_t,
    grad log P(y_t | y<t))] the harm gradient at position t,
    G~_t = -E_{y<t ~ Q}[Cov_{y_t|y<t}(1[y_t in R], grad log P(y_t | y<t))]
    the recovery gradient, and F_t = E_{y<t}[Fisher of P(. | y<t)]. F_t^+ is
    the Moore-Penrose pseudo-inverse (`jnp.linalg.pinv`, hermitian): F_t is
    singular because shifting all logits of a prefix changes nothing and
    because parameters of other positions do not enter it. The pseudo-inverse
    is exact when v_t lies in the range of F_t, which holds when every
    prefix that Q weights has positive base probability.

    Args:
      lam: float scalar, harm weight, finite and >= 0.
      mu: float scalar, recovery penalty strength, finite and >= 0.
      gamma: float scalar, discount in (0, 1].
      harm_gradient: float [T, P], G_t.
      recovery_gradient: float [T, P], G~_t.
      fisher_per_position: float [T, P, P], F_t.

    Returns:
      float [T], the predicted D_KL^(t) in nats.

    References:
      Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
    """
    _check_nonnegative("lam", lam)
    _check_nonnegative("mu", mu)
    _check_discount("gamma", gamma)
    harm_gradient = _as_float(harm_gradient)
    recovery_gradient = _as_float(recovery_gradient)
    fisher = _as_float(fisher_per_position)
    _check_matrix_shapes("harm_gradient", harm_gradient.shape, fisher.shape)
    if harm_gradient.shape != recovery_gradient.shape or harm_gradient.ndim != 2:
        raise ValueError(
            "harm_gradient and recovery_gradient must both have shape [T, P]; got "
            f"{harm_gradient.shape} and {recovery_gradient.shape}")
    if harm_gradient.shape[0] != fisher.shape[0]:
        raise ValueError(
            f"harm_gradient has T={harm_gradient.shape[0]} positions but "
            f"fisher_per_position has T={fisher.shape[0]}")
    positions = jnp.arange(harm_gradient.shape[0])
    weight = _as_float(mu) * _as_float(gamma) ** positions
    direction = lam * harm_gradient + weight[:, None] * recovery_gradient
    solved = jnp.einsum("tpq,tq->tp", jnp.linalg.pinv(fisher, hermitian=True),
                        direction)
    return 0.5 * jnp.einsum("tp,tp->t", direction, solved)


def predicted_kl_shared(lam, total_gradient, fisher_per_position) -> jax.Array:
    """Predicts the per-position equilibrium KL of a shared-parameter model.

    With parameters shared across positions, the first-order condition of
    lam * E_P[Harm] + KL(P || P_base) couples all positions, and for small
    lam the optimum moves by theta* - theta_base = -lam * F_tot^+ g with
    g = sum_t G_t = grad E[Harm] and F_tot = sum_t F_t. Its KL at position t is

        D_KL^(t) = (lam**2 / 2) * g^T F_tot^+ F_t F_tot^+ g + O(lam**3),

    which can be positive beyond the harm horizon (an incidental change).
    F_tot^+ is the Moore-Penrose pseudo-inverse (`jnp.linalg.pinv`,
    hermitian), with no ridge. F_tot is singular for softmax models (shifting
    all logits of a prefix changes nothing), and the pseudo-inverse is exact
    there: g and every F_t vanish on the null space of F_tot, because a
    direction x with x^T F_tot x = 0 has score . x = 0 on every prefix, so
    g . x = E[Harm * score . x] = 0.

    Args:
      lam: float scalar, harm weight, finite and >= 0.
      total_gradient: float [P], g = grad_theta E[Harm] at the base.
      fisher_per_position: float [T, P, P], F_t = E_{y<t}[Fisher of
        P(. | y<t)] at the base.

    Returns:
      float [T], the predicted D_KL^(t) in nats.

    References:
      Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
    """
    _check_nonnegative("lam", lam)
    total_gradient = _as_float(total_gradient)
    fisher = _as_float(fisher_per_position)
    if total_gradient.ndim != 1:
        raise ValueError(f"total_gradient must have shape [P]; got {total_gradient.shape}")
    _check_matrix_shapes("total_gradient", total_gradient.shape, fisher.shape)
    shift = jnp.linalg.pinv(fisher.sum(axis=0), hermitian=True) @ total_gradient
    return 0.5 * _as_float(lam) ** 2 * jnp.einsum("p,tpq,q->t", shift, fisher, shift)
