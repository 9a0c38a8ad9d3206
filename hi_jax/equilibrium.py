"""Exact optima of the alignment objectives, by enumeration of all responses.

The standard objective of a policy P against a base policy P_base is

    H(P) = lam * E_P[Harm] + KL(P || P_base),

and the deep objective adds a recovery penalty on a prefix distribution Q
and a recovery token set R:

    H_deep(P) = H(P) + mu * E_{y ~ Q}[sum_t gamma**t * (1 - P(y_t in R | y<t))].

For a tabular policy (one softmax per prefix, `TabularPolicy`) the optimum
of H is the sequence-level Gibbs measure and has a closed form
(`exact_equilibrium`). The deep objective has no closed form over the whole
tree, so `optimize_deep_objective` minimises it with exact gradients and
`recovery_report` compares the result with the per-prefix Gibbs solution.
Positions are 0-based, and every function here enumerates all V**T responses.

References:
  Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hi_jax.exact import enumerate_responses
from hi_jax.harms import as_harm, check_harm_on
from hi_jax.policy import Policy, TabularPolicy, check_tokens
from hi_jax.theory import _check_discount, _check_length, _check_nonnegative

# Largest deviation of sum(prefix_dist) from 1 accepted for a distribution
# over responses. It covers float32 rounding of a normalised vector.
_DISTRIBUTION_SUM_TOLERANCE = 1e-5


# Validation and tree bookkeeping ---------------------------------------------


def _check_tabular(name: str, policy) -> None:
    if not isinstance(policy, TabularPolicy):
        raise TypeError(f"{name} must be a TabularPolicy; got {type(policy).__name__}")


def _check_same_shape(name: str, policy: Policy, reference: Policy,
                      reference_name: str) -> None:
    if (policy.vocab_size, policy.response_length) != (
            reference.vocab_size, reference.response_length):
        raise ValueError(
            f"{name} has V={policy.vocab_size}, T={policy.response_length} but "
            f"{reference_name} has V={reference.vocab_size}, "
            f"T={reference.response_length}; they must match")


def _check_finite_table(name: str, policy: TabularPolicy) -> None:
    if not bool(jnp.isfinite(policy.table).all()):
        raise ValueError(f"{name} has non-finite logits; the deep objective needs "
                         "every prefix to give every token a positive probability")


def _level_sizes(vocab_size: int, response_length: int) -> list[int]:
    """Returns the number of prefix nodes at each depth t = 0 .. T - 1: V**t."""
    return [vocab_size**t for t in range(response_length)]


def _node_depths(vocab_size: int, response_length: int) -> np.ndarray:
    """Returns the depth (position) of every table row: int [S]."""
    sizes = _level_sizes(vocab_size, response_length)
    return np.repeat(np.arange(response_length), sizes)


def _prefix_log_probs(log_probs: jax.Array, vocab_size: int,
                      response_length: int) -> tuple[jax.Array, jax.Array]:
    """Computes the log-probability of every prefix node and every full response.

    Args:
      log_probs: float [S, V], log P(v | node) in table row order.

    Returns:
      (float [S] log P(node), float [V**T] log P(y) in lexicographic order).
      The children of row i at depth t are rows i * V + v of depth t + 1.
    """
    level = jnp.zeros((1,), log_probs.dtype)
    levels = []
    start = 0
    for size in _level_sizes(vocab_size, response_length):
        levels.append(level)
        rows = log_probs[start:start + size]
        level = (level[:, None] + rows).reshape(-1)
        start += size
    return jnp.concatenate(levels), level


def _node_kl(log_probs: jax.Array, base_log_probs: jax.Array) -> jax.Array:
    """Computes KL(P(. | node) || P_base(. | node)) per row: float [...]."""
    probs = jnp.exp(log_probs)
    terms = jnp.where(probs > 0, probs * (log_probs - base_log_probs), 0.0)
    return terms.sum(axis=-1)


def _recovery_mask(recovery_tokens, vocab_size: int) -> np.ndarray:
    """Returns the bool [V] mask of R, a proper non-empty subset of the vocabulary."""
    tokens = np.asarray(recovery_tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError("recovery_tokens must be a non-empty 1-D sequence of token "
                         f"ids; got shape {tokens.shape}")
    check_tokens("recovery_tokens", tokens, vocab_size)
    mask = np.zeros(vocab_size, dtype=bool)
    mask[tokens] = True
    if mask.all():
        raise ValueError(
            f"recovery_tokens cover the whole vocabulary of {vocab_size} tokens, so "
            "recovery never fails; R must leave at least one token out")
    return mask


def _node_weights(prefix_dist, vocab_size: int, response_length: int,
                  dtype) -> jax.Array:
    """Returns the recovery weight q(node) of every table row: float [S].

    `prefix_dist` is either a distribution over all V**T responses (its
    prefix marginals give q, so each depth sums to 1) or the weights q of the
    S prefix nodes directly, in table row order.
    """
    weights = np.asarray(prefix_dist, dtype=np.float64)
    num_responses = vocab_size**response_length
    num_nodes = sum(_level_sizes(vocab_size, response_length))
    if weights.ndim != 1 or weights.shape[0] not in (num_responses, num_nodes):
        raise ValueError(
            f"prefix_dist must have shape [V**T]=[{num_responses}] (a distribution "
            f"over responses) or [S]=[{num_nodes}] (weights of the prefix nodes); "
            f"got shape {weights.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("prefix_dist must be finite and >= 0; got minimum "
                         f"{np.nanmin(weights)} and {int((~np.isfinite(weights)).sum())} "
                         "non-finite entries")
    if weights.shape[0] == num_nodes:
        return jnp.asarray(weights, dtype)
    total = weights.sum()
    if abs(total - 1.0) > _DISTRIBUTION_SUM_TOLERANCE:
        raise ValueError(f"prefix_dist over responses must sum to 1; got sum {total}")
    marginals = []
    for t in range(response_length):
        marginals.append(weights.reshape(vocab_size**t, -1).sum(axis=1))
    return jnp.asarray(np.concatenate(marginals), dtype)


def _harm_values(harm, vocab_size: int, response_length: int, dtype) -> jax.Array:
    """Evaluates and validates the harm of all responses in lexicographic order.

    Returns:
      float [V**T].
    """
    responses = enumerate_responses(vocab_size, response_length)
    return check_harm_on(as_harm(harm), responses).astype(dtype)


def _log_odds(log_probs: jax.Array, mask: np.ndarray) -> jax.Array:
    """Computes logit(P(R)) from log-probabilities [..., V]: float [...]."""
    masked = jnp.where(mask, log_probs, -jnp.inf)
    unmasked = jnp.where(mask, -jnp.inf, log_probs)
    return (jax.scipy.special.logsumexp(masked, axis=-1)
            - jax.scipy.special.logsumexp(unmasked, axis=-1))


# The standard objective: closed-form Gibbs equilibrium ------------------------


def exact_equilibrium(policy: TabularPolicy, harm, lam) -> TabularPolicy:
    """Returns the minimiser of lam * E_P[Harm] + KL(P || P_base) over tabular policies.

    The minimiser over all distributions on responses is the Gibbs measure
    P*(y) = P_base(y) * exp(-lam * Harm(y)) / Z, and a tabular policy can
    represent it exactly. Its conditionals come from a backward recursion of
    log-partition functions over the prefix tree, in log space:

        log Z(y) = -lam * Harm(y)                          for full responses,
        log Z(u) = logsumexp_v [log P_base(v | u) + log Z(u v)],
        log P*(v | u) = log P_base(v | u) + log Z(u v) - log Z(u).

    Beyond a harm horizon k, log Z(u v) does not depend on v, so P* equals
    P_base at every position t >= k (up to rounding).

    Args:
      policy: the base policy P_base, a TabularPolicy with V**T responses
        within the enumeration limit.
      harm: callable from int [B, T] responses to float [B] in [0, 1],
        evaluated on all V**T responses.
      lam: float scalar, harm weight, finite and >= 0.

    Returns:
      TabularPolicy whose logits are log P*(v | u) (normalised per row), in
      the dtype of `policy.table`.

    Raises:
      TypeError: if `policy` is not a TabularPolicy.
      ValueError: if lam is out of range or the harm returns values outside
        [0, 1].

    References:
      Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
    """
    _check_tabular("policy", policy)
    _check_nonnegative("lam", lam)
    V, T = policy.vocab_size, policy.response_length
    dtype = policy.table.dtype
    harm_values = _harm_values(harm, V, T, dtype)

    base_tables = [jax.nn.log_softmax(table, axis=-1) for table in policy.logit_tables()]
    log_partition = (-lam * harm_values).reshape((V,) * T)
    tables = [None] * T
    for t in reversed(range(T)):
        joint = base_tables[t] + log_partition
        log_partition = jax.scipy.special.logsumexp(joint, axis=-1)
        tables[t] = joint - log_partition[..., None]
    return TabularPolicy.from_logits(tables)


# KL profile of any policy ----------------------------------------------------


def _weighted_kl_sum(policy: Policy, base_policy: Policy, prefix_policy: Policy,
                     responses: jax.Array) -> jax.Array:
    log_probs = policy.log_probs(responses)
    base_log_probs = base_policy.log_probs(responses)
    weights = jnp.exp(prefix_policy.sequence_log_prob(responses))
    return jnp.einsum("b,bt->t", weights, _node_kl(log_probs, base_log_probs))


def exact_kl_profile(policy: Policy, base_policy: Policy,
                     prefix_policy: Policy | None = None,
                     batch_size: int | None = None) -> jax.Array:
    """Computes the per-position KL profile exactly by enumeration.

        D_KL^(t) = E_{y<t ~ P_prefix}[KL(P(. | y<t) || P_base(. | y<t))]

    for t = 0 .. T - 1. Because the conditional at position t of a response
    depends only on its first t tokens, the expectation over prefixes equals
    sum_y P_prefix(y) * KL_t(y) over all V**T full responses y, which works
    for any `Policy` through `log_probs`.

    Args:
      policy: the policy P.
      base_policy: the reference P_base, with the same V and T.
      prefix_policy: the policy that draws the prefixes; `policy` if None.
      batch_size: responses per `log_probs` call; all V**T at once if None.

    Returns:
      float [T], D_KL^(t) in nats. Entries are +inf where P gives positive
      probability to a token that P_base excludes.

    Raises:
      ValueError: if the policies differ in V or T, or V**T exceeds the
        enumeration limit.
    """
    prefix_policy = policy if prefix_policy is None else prefix_policy
    _check_same_shape("base_policy", base_policy, policy, "policy")
    _check_same_shape("prefix_policy", prefix_policy, policy, "policy")
    responses = enumerate_responses(policy.vocab_size, policy.response_length)
    num = responses.shape[0]
    if batch_size is None:
        batch_size = num
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    total = 0.0
    for start in range(0, num, batch_size):
        chunk = responses[start:start + batch_size]
        total = total + _weighted_kl_sum(policy, base_policy, prefix_policy, chunk)
    return total


# The deep objective -----------------------------------------------------------


class _DeepProblem(NamedTuple):
    """Arrays that define H_deep for one base policy, harm and Q."""
    base_log_probs: jax.Array  # float [S, V]
    harm_values: jax.Array  # float [V**T]
    lam: jax.Array  # float scalar
    penalty: jax.Array  # float [S], mu * gamma**t * q(node)
    recovery_mask: np.ndarray  # bool [V]


def _build_deep_problem(policy, base_policy, harm, lam, mu, gamma, prefix_dist,
                        recovery_tokens) -> _DeepProblem:
    _check_tabular("policy", policy)
    _check_tabular("base_policy", base_policy)
    _check_same_shape("base_policy", base_policy, policy, "policy")
    _check_finite_table("base_policy", base_policy)
    _check_nonnegative("lam", lam)
    _check_nonnegative("mu", mu)
    _check_discount("gamma", gamma)
    V, T = policy.vocab_size, policy.response_length
    dtype = policy.table.dtype
    weights = _node_weights(prefix_dist, V, T, dtype)
    depths = jnp.asarray(_node_depths(V, T))
    penalty = jnp.asarray(mu, dtype) * jnp.asarray(gamma, dtype) ** depths * weights
    return _DeepProblem(
        base_log_probs=jax.nn.log_softmax(base_policy.table.astype(dtype), axis=-1),
        harm_values=_harm_values(harm, V, T, dtype),
        lam=jnp.asarray(lam, dtype),
        penalty=penalty,
        recovery_mask=_recovery_mask(recovery_tokens, V),
    )


def _deep_objective_value(table: jax.Array, problem: _DeepProblem, vocab_size: int,
                          response_length: int) -> jax.Array:
    log_probs = jax.nn.log_softmax(table, axis=-1)
    node_log_prob, response_log_prob = _prefix_log_probs(
        log_probs, vocab_size, response_length)
    node_prob = jnp.exp(node_log_prob)
    expected_harm = jnp.exp(response_log_prob) @ problem.harm_values
    kl = node_prob @ _node_kl(log_probs, problem.base_log_probs)
    # 1 - P(R | node) summed over the complement of R, to avoid cancellation.
    failure = jnp.where(problem.recovery_mask, 0.0, jnp.exp(log_probs)).sum(axis=-1)
    return problem.lam * expected_harm + kl + problem.penalty @ failure


def deep_objective(policy: TabularPolicy, base_policy: TabularPolicy, harm, lam, mu,
                   gamma, prefix_dist, recovery_tokens) -> jax.Array:
    """Evaluates the deep objective exactly for a tabular policy.

        H_deep(P) = lam * E_P[Harm] + KL(P || P_base)
                    + mu * sum_u gamma**t(u) * q(u) * (1 - P(R | u)),

    where u runs over all prefix nodes, t(u) is the length of u and q(u) is
    the weight Q gives the prefix u (for Q over responses, the probability
    that a response from Q starts with u). With mu = 0 this is the standard
    objective H.

    Args:
      policy: TabularPolicy P.
      base_policy: TabularPolicy P_base with finite logits and the same V, T.
      harm: callable from int [B, T] to float [B] in [0, 1].
      lam: harm weight, finite and >= 0.
      mu: recovery penalty strength, finite and >= 0.
      gamma: discount in (0, 1].
      prefix_dist: float [V**T], Q as a distribution over responses; or
        float [S], the node weights q(u) in table row order
        (S = (V**T - 1) / (V - 1)).
      recovery_tokens: int [|R|], the recovery token set R, a proper
        non-empty subset of the vocabulary.

    Returns:
      float scalar, H_deep(P) in nats.

    References:
      Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
    """
    problem = _build_deep_problem(policy, base_policy, harm, lam, mu, gamma,
                                  prefix_dist, recovery_tokens)
    return _deep_objective_value(policy.table, problem, policy.vocab_size,
                                 policy.response_length)


class DeepOptimum(NamedTuple):
    """Result of `optimize_deep_objective`.

    Attributes:
      policy: the optimised TabularPolicy.
      objective: float scalar, H_deep at `policy`.
      gradient_max: float scalar, max |dH_deep / d logit| over the table at
        `policy`; the stationarity residual the optimiser reached.
      num_steps: int scalar, L-BFGS iterations run after the warm-up.
    """
    policy: TabularPolicy
    objective: jax.Array
    gradient_max: jax.Array
    num_steps: jax.Array


def optimize_deep_objective(policy: TabularPolicy, base_policy: TabularPolicy, harm,
                            lam, mu, gamma, prefix_dist, recovery_tokens,
                            steps: int = 500, learning_rate: float = 0.05,
                            warmup_steps: int = 1000,
                            tolerance: float = 0.0) -> DeepOptimum:
    """Minimises the deep objective over a tabular policy's logits.

    H_deep is defined as in `deep_objective` and evaluated exactly by
    enumeration, so its gradient is exact. The optimiser runs `warmup_steps`
    of `optax.adam` and then up to `steps` of `optax.lbfgs` with its zoom
    line search. Unlike the standard objective, H_deep has no closed-form
    optimum over the whole prefix tree. The recovery term weights prefix u by
    q(u) rather than by P(u), so the optimal conditional at u depends on the
    optimised probability of reaching u. Prefixes that Q weights but the
    optimum avoids therefore get extreme recovery (see `recovery_report`).

    NOTE: H_deep is not convex in the logits. On random V=3, T=3 tabular
    worlds, L-BFGS started at the base policy often stopped in a worse
    stationary point (objective up to 2.5% higher) where some prefix
    probabilities had underflowed and their gradients vanished. An Adam
    warm-up of 1000 steps reached the lowest objective found in all eight
    cases tried. The result is still a local minimum only.

    Args:
      policy: TabularPolicy with finite logits; the starting point.
      base_policy: TabularPolicy P_base with finite logits and the same V, T.
      harm, lam, mu, gamma, prefix_dist, recovery_tokens: as in
        `deep_objective`.
      steps: maximum number of L-BFGS iterations, >= 1.
      learning_rate: Adam learning rate of the warm-up, > 0, or an optax
        schedule.
      warmup_steps: number of Adam iterations before L-BFGS, >= 0.
      tolerance: L-BFGS stops once max |gradient| <= tolerance; with 0 it
        runs all `steps` unless the objective becomes non-finite.

    Returns:
      DeepOptimum with the optimised policy (in the dtype of `policy.table`;
      use float64 for tight convergence), its objective and gradient.

    Raises:
      TypeError: if a policy is not a TabularPolicy.
      ValueError: on invalid weights, token sets, tables, Q or step counts.
    """
    problem = _build_deep_problem(policy, base_policy, harm, lam, mu, gamma,
                                  prefix_dist, recovery_tokens)
    _check_finite_table("policy", policy)
    _check_length("steps", steps, 1)
    _check_length("warmup_steps", warmup_steps, 0)
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0 or an optax schedule; got "
                         f"{learning_rate!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0; got {tolerance!r}")
    V, T = policy.vocab_size, policy.response_length

    def value_fn(table):
        return _deep_objective_value(table, problem, V, T)

    table = _run_adam(value_fn, policy.table, int(warmup_steps), learning_rate)
    table, num_steps = _run_lbfgs(value_fn, table, int(steps), tolerance)
    objective, gradient = jax.value_and_grad(value_fn)(table)
    return DeepOptimum(TabularPolicy(table, V, T), objective,
                       jnp.max(jnp.abs(gradient)), num_steps)


def _run_adam(value_fn, table, steps, learning_rate):
    optimizer = optax.adam(learning_rate)

    def step(_, carry):
        params, state = carry
        updates, state = optimizer.update(jax.grad(value_fn)(params), state)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def run(params):
        return jax.lax.fori_loop(0, steps, step, (params, optimizer.init(params)))[0]

    return run(table)


def _run_lbfgs(value_fn, table, steps, tolerance):
    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    # The carry keeps the best iterate, because once the gradient reaches
    # rounding level the L-BFGS curvature pairs become noise and a step can
    # diverge or return NaN.
    def step(carry):
        params, state, best_params, best_value, _ = carry
        value, grad = value_and_grad(params, state=state)
        improved = value < best_value
        best_params = jnp.where(improved, params, best_params)
        best_value = jnp.where(improved, value, best_value)
        updates, state = optimizer.update(grad, state, params, value=value, grad=grad,
                                          value_fn=value_fn)
        finished = ~jnp.isfinite(value) | (jnp.max(jnp.abs(grad)) <= tolerance)
        return optax.apply_updates(params, updates), state, best_params, best_value, finished

    def keep_going(carry):
        _, state, _, _, finished = carry
        return (optax.tree.get(state, "count") < steps) & ~finished

    @jax.jit
    def run(params):
        start = (params, optimizer.init(params), params,
                 jnp.asarray(jnp.inf, params.dtype), jnp.asarray(False))
        _, state, best, _, _ = jax.lax.while_loop(keep_going, step, start)
        return best, optax.tree.get(state, "count")

    return run(table)


# Recovery beyond the horizon --------------------------------------------------


class RecoveryReport(NamedTuple):
    """Recovery probabilities at prefix nodes beyond the harm horizon.

    All fields have shape [N], one entry per prefix node u at a depth
    t >= horizon, in table row order.

    Attributes:
      node: int, the row of u in the policy table.
      position: int, t, the length of u.
      recovery: P(R | u) of the policy.
      base_recovery: p0 = P_base(R | u).
      beta: the importance-weighted penalty mu * gamma**t * q(u) / P(u).
      gibbs: the per-prefix Gibbs form sigmoid(logit(p0) + beta).
      stationary: the recovery that minimises H_deep at u when every other
        conditional of the policy is held fixed (see `recovery_report`).
    """
    node: jax.Array
    position: jax.Array
    recovery: jax.Array
    base_recovery: jax.Array
    beta: jax.Array
    gibbs: jax.Array
    stationary: jax.Array


def recovery_report(policy: TabularPolicy, base_policy: TabularPolicy, mu, gamma,
                    prefix_dist, recovery_tokens, horizon: int) -> RecoveryReport:
    """Compares a policy's recovery beyond the horizon with the Gibbs forms.

    Write H_deep as a function of the conditional p = P(. | u) at one prefix u
    of length t, with every other conditional held fixed. The KL term
    contributes P(u) * [KL(p || P_base(. | u)) + sum_v p_v K(u v)], where
    K(w) is the expected KL of the policy's conditionals at w and below. The
    recovery term contributes -mu * gamma**t * q(u) * p(R), which, unlike
    the KL term, does not scale with P(u). Beyond the horizon the harm of
    u v does not depend on v. Dividing by P(u) leaves the problem

        min_p  beta * (1 - p(R)) + KL(p || P_base(. | u)) + sum_v p_v K(u v),
        beta = mu * gamma**t * q(u) / P(u),

    so the importance weight q(u) / P(u) appears because the penalty is an
    expectation under Q while the KL is an expectation under P. Its
    minimiser is P_base(v | u) * exp(beta * 1[v in R] - K(u v)) / Z, whose
    mass on R is `stationary`. At an optimum of H_deep every node satisfies
    it. `gibbs` is the per-prefix Gibbs form sigmoid(logit(p0) + beta),
    which drops the continuation cost K(u v). The two agree at the last
    position t = T - 1, where K = 0. At earlier positions they differ when
    recovering and not recovering lead to different future KL.

    Args:
      policy: TabularPolicy, typically from `optimize_deep_objective`.
      base_policy: TabularPolicy P_base with finite logits and the same V, T.
      mu, gamma, prefix_dist, recovery_tokens: as in `deep_objective`.
      horizon: the harm horizon k, an integer in [0, T]; nodes of depth
        t >= k are reported.

    Returns:
      RecoveryReport with one entry per node of depth >= horizon.

    References:
      Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
    """
    _check_tabular("policy", policy)
    _check_tabular("base_policy", base_policy)
    _check_same_shape("base_policy", base_policy, policy, "policy")
    _check_finite_table("base_policy", base_policy)
    _check_nonnegative("mu", mu)
    _check_discount("gamma", gamma)
    V, T = policy.vocab_size, policy.response_length
    _check_length("horizon", horizon, 0)
    if int(horizon) > T:
        raise ValueError(f"horizon must be an integer in [0, T={T}]; got {horizon!r}")
    dtype = policy.table.dtype
    weights = _node_weights(prefix_dist, V, T, dtype)
    mask = _recovery_mask(recovery_tokens, V)

    log_probs = jax.nn.log_softmax(policy.table, axis=-1)
    base_log_probs = jax.nn.log_softmax(base_policy.table.astype(dtype), axis=-1)
    node_log_prob, _ = _prefix_log_probs(log_probs, V, T)
    continuation = _continuation_kl(log_probs, _node_kl(log_probs, base_log_probs), V, T)

    depths = _node_depths(V, T)
    # log beta = log(mu * gamma**t) + log q(u) - log P(u), and beta = 0 where q(u) = 0.
    positive = (weights > 0) & (mu > 0)
    log_beta = (jnp.log(jnp.where(positive, mu, 1.0))
                + jnp.asarray(depths, dtype) * jnp.log(jnp.asarray(gamma, dtype))
                + jnp.log(jnp.where(positive, weights, 1.0)) - node_log_prob)
    beta = jnp.where(positive, jnp.exp(log_beta), 0.0)

    base_odds = _log_odds(base_log_probs, mask)
    # beta can overflow to inf where P(u) underflows, and inf * 0 would be NaN.
    tilted = base_log_probs + jnp.where(mask, beta[:, None], 0.0) - continuation
    rows = np.flatnonzero(depths >= int(horizon))
    return RecoveryReport(
        node=jnp.asarray(rows),
        position=jnp.asarray(depths[rows]),
        recovery=jax.nn.sigmoid(_log_odds(log_probs, mask))[rows],
        base_recovery=jax.nn.sigmoid(base_odds)[rows],
        beta=beta[rows],
        gibbs=jax.nn.sigmoid(base_odds + beta)[rows],
        stationary=jax.nn.sigmoid(_log_odds(tilted, mask))[rows],
    )


def _continuation_kl(log_probs: jax.Array, node_kl: jax.Array, vocab_size: int,
                     response_length: int) -> jax.Array:
    """Computes K(u v) for every node u and token v: float [S, V].

    K(w) = KL at w + sum_v P(v | w) * K(w v) is the expected KL of the
    conditionals at and below w, with K = 0 for full responses.
    """
    sizes = _level_sizes(vocab_size, response_length)
    starts = np.cumsum([0] + sizes)
    probs = jnp.exp(log_probs)
    child_cost = jnp.zeros((sizes[-1], vocab_size), log_probs.dtype)
    blocks = [None] * response_length
    for t in reversed(range(response_length)):
        rows = slice(starts[t], starts[t + 1])
        blocks[t] = child_cost
        node_cost = node_kl[rows] + (probs[rows] * child_cost).sum(axis=-1)
        if t > 0:
            child_cost = node_cost.reshape(sizes[t - 1], vocab_size)
    return jnp.concatenate(blocks, axis=0)
