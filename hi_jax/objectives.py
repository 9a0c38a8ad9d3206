"""Alignment objectives and their Monte Carlo gradient surrogates.

With harm weight lam >= 0, recovery weight mu >= 0, discount gamma in (0, 1],
a recovery token set R and a distribution Q of adversarial prefixes:

    standard: H(theta) = lam * E_{y ~ P_theta}[Harm(y)] + KL(P_theta || P_base)
    deep:     H_deep(theta) = H(theta)
                  + mu * E_{y ~ Q}[sum_{t in S(y)} gamma**t * (1 - p_t(y<t))]

where p_t(y<t) = P_theta(y_t in R | y<t) and positions t are 0-based. For a
Q prefix y of length L, S(y) = {0, ..., min(L, T - 1)}: position t counts
when the whole of y<t lies inside the prefix, so the policy is asked to
recover after every part of the prefix, including the empty one at t = 0
(where recovery means refusing at the start). A Q prefix that covers the
whole response counts every position 0 .. T - 1, which matches
`hi_jax.equilibrium.deep_objective` for Q over full responses.

The sequence KL is a sum of exact per-token KLs over the vocabulary,
KL(P_theta || P_base) = E_{y ~ P_theta}[sum_t KL_t(y<t)] with
KL_t(y<t) = KL(P_theta(. | y<t) || P_base(. | y<t)). Its gradient has two
parts, the per-token KL differentiated with the prefixes held fixed and a
score-function term for the prefix distribution:

    grad KL = E[sum_t grad KL_t(y<t)]
              + E[sum_s grad log P_theta(y_s | y<s) * sum_{t > s} KL_t(y<t)].

The harm gradient is the score-function estimator
grad E[Harm] = E[Harm(y) grad log P_theta(y)]. Both score terms subtract a
leave-one-out baseline: sample i uses the mean of the other B - 1 samples
(per position for the KL-to-go), which does not depend on sample i and so
leaves the estimate unbiased. The recovery term is deterministic given the Q
prefixes (teacher forcing) and is differentiated directly.

Loss functions here take on-policy samples y ~ P_theta drawn outside the
gradient and return a surrogate scalar whose gradient is an unbiased
estimate of grad H or grad H_deep, together with unbiased estimates of the
objective's terms for logging.

Dimension letters: B batch, T response positions, V vocabulary.

References:
  Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hi_jax.exact import enumerate_responses
from hi_jax.harms import as_harm, check_harm_on
from hi_jax.policy import Policy, check_tokens


# Per-token KL ---------------------------------------------------------------------


def kl_from_log_probs(log_probs: jax.Array, base_log_probs: jax.Array) -> jax.Array:
    """Computes KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probabilities.

    Tokens with p_v = 0 contribute 0 even where log q_v = -inf, so the result
    is finite whenever q_v > 0 wherever p_v > 0, and +inf otherwise.

    Args:
      log_probs: float [..., V], normalised log-probabilities of p.
      base_log_probs: float [..., V], normalised log-probabilities of q.

    Returns:
      float [...], the KL in nats.
    """
    probs = jnp.exp(log_probs)
    positive = probs > 0
    # Masking the difference as well keeps -inf - (-inf) = NaN out of the
    # gradient at tokens with p_v = 0.
    difference = jnp.where(positive, log_probs - base_log_probs, 0.0)
    return jnp.where(positive, probs * difference, 0.0).sum(axis=-1)


def per_token_kl(policy: Policy, base_policy: Policy, tokens: jax.Array) -> jax.Array:
    """Computes the exact KL of the next-token distributions at every prefix.

        KL_t(y<t) = sum_v P_theta(v | y<t) (log P_theta(v | y<t) - log P_base(v | y<t))

    from the full log-probability vectors (log_softmax of the logits), so it
    stays finite for probabilities down to 1e-12 and logits up to 1e4 in
    float32 (and non-negative up to rounding).

    Args:
      policy: the policy P_theta.
      base_policy: the reference policy P_base, with the same V and T.
      tokens: int [B, T] responses; column t uses only y<t.

    Returns:
      float [B, T] KL_t in nats.
    """
    return kl_from_log_probs(policy.log_probs(tokens), base_policy.log_probs(tokens))


# Recovery -------------------------------------------------------------------------


def check_recovery_ids(recovery_ids, vocab_size: int) -> tuple[int, ...]:
    """Validates the recovery token set R and returns it as a sorted tuple of ints.

    Raises:
      ValueError: if R is empty, not 1-D, has an id outside [0, V) or a
        repeated id, or covers the whole vocabulary (recovery could not fail).
    """
    ids = np.asarray(recovery_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("recovery_ids must be a non-empty 1-D sequence of token ids; "
                         f"got {recovery_ids!r}")
    check_tokens("recovery_ids", ids, vocab_size)
    if len(set(ids.tolist())) != ids.size:
        raise ValueError(f"recovery_ids must not repeat a token id; got {ids.tolist()}")
    if ids.size == vocab_size:
        raise ValueError(
            f"recovery_ids cover the whole vocabulary of {vocab_size} tokens, so "
            "recovery never fails; R must leave at least one token out")
    return tuple(sorted(int(i) for i in ids))


def recovery_failure(log_probs: jax.Array, recovery_ids: Sequence[int]) -> jax.Array:
    """Computes 1 - P(R) from log-probabilities as the mass outside R.

    Summing the complement with logsumexp avoids the cancellation in
    1 - P(R) when P(R) is close to 1.

    Args:
      log_probs: float [..., V] normalised log-probabilities.
      recovery_ids: the ids of R, concrete ints (static under jit).

    Returns:
      float [...], P(y_t not in R).
    """
    vocab_size = log_probs.shape[-1]
    outside = np.setdiff1d(np.arange(vocab_size), np.asarray(recovery_ids, dtype=int))
    return jnp.exp(jax.nn.logsumexp(log_probs[..., outside], axis=-1))


def recovery_probabilities(policy: Policy, tokens: jax.Array,
                           recovery_ids: Sequence[int]) -> jax.Array:
    """Computes p_t = P_theta(y_t in R | y<t) at every position by teacher forcing.

    Args:
      policy: the policy.
      tokens: int [B, T]; column t uses only y<t.
      recovery_ids: the ids of R, concrete ints (static under jit).

    Returns:
      float [B, T].
    """
    log_probs = policy.log_probs(tokens)
    return jnp.exp(jax.nn.logsumexp(log_probs[..., np.asarray(recovery_ids, dtype=int)],
                                    axis=-1))


def prefix_mask_from_lengths(lengths: jax.Array, response_length: int) -> jax.Array:
    """Builds the mask of prefixes of given lengths: bool [B, T], True at t < lengths[b].

    Args:
      lengths: int [B], each in [0, T].
      response_length: T.
    """
    return jnp.arange(response_length) < jnp.asarray(lengths)[..., None]


def recovery_positions(prefix_mask: jax.Array) -> jax.Array:
    """Marks the positions where the recovery penalty applies to a Q prefix.

    For a prefix of length L (prefix_mask True exactly at t < L) the counted
    positions are t = 0 .. min(L, T - 1): every t whose y<t lies inside the
    prefix, including the empty prefix at t = 0.

    Args:
      prefix_mask: bool [B, T], True at the prefix tokens t < L.

    Returns:
      bool [B, T], True at the counted positions.
    """
    prefix_mask = jnp.asarray(prefix_mask, bool)
    first = jnp.ones(prefix_mask.shape[:-1] + (1,), bool)
    return jnp.concatenate([first, prefix_mask[..., :-1]], axis=-1)


def check_prefix_mask(prefix_mask, response_length: int,
                      name: str = "prefix_mask") -> None:
    """Raises ValueError unless every row of the mask is True exactly at t < L for some L.

    Args:
      prefix_mask: bool [B, T].
      response_length: T.
      name: the argument name for the message.
    """
    mask = np.asarray(prefix_mask)
    if mask.ndim != 2 or mask.shape[1] != response_length:
        raise ValueError(f"{name} must have shape [B, T] with T={response_length}; got "
                         f"{mask.shape}")
    if mask.dtype != bool:
        raise ValueError(f"{name} must be a boolean mask; got dtype {mask.dtype}")
    lengths = mask.sum(axis=1)
    expected = np.arange(response_length) < lengths[:, None]
    bad = np.nonzero((mask != expected).any(axis=1))[0]
    if bad.size:
        raise ValueError(
            f"{name} row {int(bad[0])} is {mask[bad[0]].astype(int).tolist()}; each row "
            "must be True at positions 0 .. L - 1 and False after (a prefix of length L)")


def recovery_penalty(policy: Policy, q_tokens: jax.Array, q_prefix_mask: jax.Array,
                     recovery_ids: Sequence[int], gamma) -> tuple[jax.Array, jax.Array]:
    """Computes the recovery term of the deep objective on a batch of Q prefixes.

        penalty = (1 / B) sum_b sum_{t in S_b} gamma**t (1 - p_t(y_b<t))

    with S_b the positions of `recovery_positions`, by teacher forcing.

    Args:
      policy: the policy.
      q_tokens: int [B, T] Q prefixes; tokens at t >= L are padding and never
        read by a counted position.
      q_prefix_mask: bool [B, T], True at t < L_b.
      recovery_ids: the ids of R, concrete ints (static under jit).
      gamma: discount in (0, 1].

    Returns:
      (float scalar penalty, float [B, T] recovery probabilities p_t).
    """
    log_probs = policy.log_probs(q_tokens)
    return _recovery_terms(log_probs, q_prefix_mask, recovery_ids, gamma)


def _recovery_terms(log_probs, q_prefix_mask, recovery_ids, gamma):
    counted = recovery_positions(q_prefix_mask)
    T = counted.shape[-1]
    discount = jnp.asarray(gamma, log_probs.dtype) ** jnp.arange(T, dtype=log_probs.dtype)
    failure = recovery_failure(log_probs, recovery_ids)  # [B, T]
    penalty = jnp.where(counted, discount * failure, 0.0).sum(axis=-1).mean()
    return penalty, 1.0 - failure


# Loss functions -------------------------------------------------------------------


def leave_one_out_advantage(values: jax.Array) -> jax.Array:
    """Subtracts from each sample the mean of the other samples along axis 0.

        A_i = x_i - (1 / (B - 1)) sum_{j != i} x_j = (B / (B - 1)) (x_i - mean(x))

    Args:
      values: float [B, ...] with B >= 2.

    Returns:
      float [B, ...].
    """
    batch = values.shape[0]
    if batch < 2:
        raise ValueError(f"a leave-one-out baseline needs a batch of at least 2 samples; "
                         f"got {batch}")
    return (batch * values - values.sum(axis=0)) / (batch - 1)


def _kl_to_go(kl: jax.Array) -> jax.Array:
    """sum_{t > s} kl[:, t] for every s: float [B, T] from float [B, T]."""
    inclusive = jnp.cumsum(kl[:, ::-1], axis=1)[:, ::-1]
    return inclusive - kl


def objective_loss(policy: Policy, base_policy: Policy, tokens: jax.Array,
                   harm_values: jax.Array, lam, mu=0.0, gamma=1.0,
                   q_tokens: jax.Array | None = None,
                   q_prefix_mask: jax.Array | None = None,
                   recovery_ids: Sequence[int] | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Builds the gradient surrogate of H_deep (of H when mu = 0) and its terms.

    With y_i ~ P_theta drawn outside the gradient, KL_t as in `per_token_kl`,
    A the leave-one-out advantage, and p_t the recovery probability on Q:

        surrogate = (1 / B) sum_i [ sum_t KL_t(y_i<t)
                     + sum_s stop_grad(lam * A(Harm)_i + A(KL-to-go)_is)
                                         * log P_theta(y_is | y_i<s) ]
                    + mu * recovery_penalty

    where KL-to-go_is = sum_{t > s} KL_t(y_i<t). Its gradient is an unbiased
    estimate of grad H_deep; its value is not the objective. The objective's
    terms come back in the dict.

    Args:
      policy: the policy P_theta being differentiated.
      base_policy: the reference P_base (not differentiated).
      tokens: int [B, T] samples from P_theta, B >= 2.
      harm_values: float [B], Harm(y_i) in [0, 1].
      lam: harm weight >= 0.
      mu: recovery weight >= 0; must be 0 when no Q prefixes are given.
      gamma: discount in (0, 1].
      q_tokens: int [Bq, T] Q prefixes, or None.
      q_prefix_mask: bool [Bq, T], True at t < L for each prefix (see
        `recovery_positions`), or None.
      recovery_ids: the ids of R as concrete ints (static under jit); needed
        with Q prefixes.

    Returns:
      (surrogate float scalar, terms). `terms` contains the float scalars
      harm = mean Harm, kl = mean sum_t KL_t (the sequence KL), recovery =
      the recovery penalty (0 without Q), total = lam * harm + kl +
      mu * recovery, and the profiles kl_per_position float [T] (mean KL_t
      over the batch) and recovery_per_position float [T] (mean p_t over the
      Q prefixes that count position t; NaN where none does, and all NaN
      without Q).

    Raises:
      ValueError: if mu > 0 (concrete) without Q prefixes, or Q prefixes
        without recovery ids.
    """
    has_q = q_tokens is not None
    if has_q != (q_prefix_mask is not None):
        raise ValueError("q_tokens and q_prefix_mask must be given together")
    if has_q and recovery_ids is None:
        raise ValueError("recovery_ids are required with Q prefixes")
    if not has_q and not isinstance(mu, jax.core.Tracer) and mu != 0:
        raise ValueError(f"mu={mu} weights a recovery penalty, which needs Q prefixes "
                         "(q_tokens and q_prefix_mask)")

    log_probs = policy.log_probs(tokens)  # [B, T, V]
    base_log_probs = jax.lax.stop_gradient(base_policy.log_probs(tokens))
    kl = kl_from_log_probs(log_probs, base_log_probs)  # [B, T]
    token_log_probs = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]

    harm_values = jnp.asarray(harm_values, log_probs.dtype)
    harm_advantage = leave_one_out_advantage(harm_values)  # [B]
    kl_advantage = leave_one_out_advantage(_kl_to_go(jax.lax.stop_gradient(kl)))  # [B, T]
    weights = jax.lax.stop_gradient(lam * harm_advantage[:, None] + kl_advantage)
    surrogate = (kl.sum(axis=1) + (weights * token_log_probs).sum(axis=1)).mean()

    T = tokens.shape[-1]
    if has_q:
        q_log_probs = policy.log_probs(q_tokens)
        recovery, recovery_probs = _recovery_terms(q_log_probs, q_prefix_mask,
                                                   recovery_ids, gamma)
        counted = recovery_positions(q_prefix_mask)
        count = counted.sum(axis=0)
        recovery_profile = jnp.where(
            count > 0,
            jnp.where(counted, recovery_probs, 0.0).sum(axis=0) / jnp.maximum(count, 1),
            jnp.nan)
        surrogate = surrogate + mu * recovery
    else:
        recovery = jnp.zeros((), log_probs.dtype)
        recovery_profile = jnp.full((T,), jnp.nan, log_probs.dtype)

    harm = harm_values.mean()
    sequence_kl = kl.sum(axis=1).mean()
    terms = {
        "harm": harm,
        "kl": sequence_kl,
        "recovery": recovery,
        "total": lam * harm + sequence_kl + mu * recovery,
        "kl_per_position": kl.mean(axis=0),
        "recovery_per_position": recovery_profile,
    }
    return surrogate, terms


def standard_loss(policy: Policy, base_policy: Policy, tokens: jax.Array,
                  harm_values: jax.Array, lam) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Builds the gradient surrogate of H = lam * E[Harm] + KL(P_theta || P_base).

    This is `objective_loss` with mu = 0 and no Q prefixes; see it for the
    surrogate and the terms.

    Args:
      policy: the policy P_theta being differentiated.
      base_policy: the reference P_base.
      tokens: int [B, T] samples from P_theta, B >= 2.
      harm_values: float [B] in [0, 1].
      lam: harm weight >= 0.

    Returns:
      (surrogate float scalar, terms dict).
    """
    return objective_loss(policy, base_policy, tokens, harm_values, lam)


def deep_loss(policy: Policy, base_policy: Policy, tokens: jax.Array,
              harm_values: jax.Array, q_tokens: jax.Array, q_prefix_mask: jax.Array,
              recovery_ids: Sequence[int], lam, mu, gamma
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Builds the gradient surrogate of H_deep; see `objective_loss`.

    Args:
      policy: the policy P_theta being differentiated.
      base_policy: the reference P_base.
      tokens: int [B, T] samples from P_theta, B >= 2.
      harm_values: float [B] in [0, 1].
      q_tokens: int [Bq, T] Q prefixes.
      q_prefix_mask: bool [Bq, T], True at t < L for each prefix.
      recovery_ids: the ids of R as concrete ints (static under jit).
      lam: harm weight >= 0.
      mu: recovery weight >= 0.
      gamma: discount in (0, 1].

    Returns:
      (surrogate float scalar, terms dict).
    """
    return objective_loss(policy, base_policy, tokens, harm_values, lam, mu, gamma,
                          q_tokens, q_prefix_mask, recovery_ids)


# Exact objective ------------------------------------------------------------------


def exact_objective(policy: Policy, base_policy: Policy, harm, lam, mu=0.0, gamma=1.0,
                    q_tokens: jax.Array | None = None,
                    q_prefix_mask: jax.Array | None = None,
                    recovery_ids: Sequence[int] | None = None) -> dict[str, jax.Array]:
    """Evaluates H_deep (H when mu = 0) exactly by enumerating all V**T responses.

        harm = sum_y P_theta(y) Harm(y)
        kl = sum_y P_theta(y) (log P_theta(y) - log P_base(y))
        recovery = recovery_penalty on the given Q prefixes (their empirical
                   distribution is Q)

    Every term is differentiable with respect to the policy, so
    `jax.grad(lambda p: exact_objective(p, ...)["total"])` is the exact
    gradient that the surrogate of `objective_loss` estimates. The harm is
    evaluated eagerly, so call this outside jit.

    Args:
      policy: any policy with V**T within the enumeration limit.
      base_policy: the reference P_base, with the same V and T.
      harm: callable from int [B, T] to float [B] in [0, 1].
      lam, mu, gamma, q_tokens, q_prefix_mask, recovery_ids: as in
        `objective_loss`.

    Returns:
      dict of float scalars harm, kl, recovery and total.

    Raises:
      ValueError: if V**T exceeds the enumeration limit, the harm returns
        values outside [0, 1], or the Q arguments are inconsistent.
    """
    V, T = policy.vocab_size, policy.response_length
    responses = enumerate_responses(V, T)
    harm_values = check_harm_on(as_harm(harm), responses)
    log_p = policy.sequence_log_prob(responses)
    base_log_p = base_policy.sequence_log_prob(responses)
    probs = jnp.exp(log_p)
    positive = probs > 0
    difference = jnp.where(positive, log_p - base_log_p, 0.0)
    expected_harm = (probs * harm_values.astype(probs.dtype)).sum()
    kl = jnp.where(positive, probs * difference, 0.0).sum()

    if (q_tokens is None) != (q_prefix_mask is None):
        raise ValueError("q_tokens and q_prefix_mask must be given together")
    if q_tokens is None:
        if mu != 0:
            raise ValueError(f"mu={mu} weights a recovery penalty, which needs Q "
                             "prefixes (q_tokens and q_prefix_mask)")
        recovery = jnp.zeros((), probs.dtype)
    else:
        if recovery_ids is None:
            raise ValueError("recovery_ids are required with Q prefixes")
        recovery, _ = recovery_penalty(policy, q_tokens, q_prefix_mask,
                                       check_recovery_ids(recovery_ids, V), gamma)
    return {
        "harm": expected_harm,
        "kl": kl,
        "recovery": recovery,
        "total": lam * expected_harm + kl + mu * recovery,
    }
