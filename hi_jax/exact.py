"""Exact oracle: every quantity of the theory by enumeration of all V**T responses."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hi_jax.harms import as_harm, check_harm_on
from hi_jax.policy import Policy

# Largest V**T the oracle enumerates.
MAX_ENUMERATED_RESPONSES = 2**16


def check_enumerable(vocab_size: int, response_length: int,
                     limit: int = MAX_ENUMERATED_RESPONSES) -> int:
    """Returns V**T, or raises ValueError when it exceeds `limit`."""
    size = vocab_size**response_length
    if size > limit:
        raise ValueError(
            f"exact enumeration needs V**T = {vocab_size}**{response_length} = {size} "
            f"responses, more than the limit of {limit}; use the Monte Carlo "
            "estimators (estimate_profile) or a smaller model")
    return size


def enumerate_responses(vocab_size: int, response_length: int,
                        limit: int = MAX_ENUMERATED_RESPONSES) -> jax.Array:
    """List all V**T responses in lexicographic order: int32 [V**T, T].

    Row r is the base-V digits of r, most significant first, so reshaping
    any per-response array of length V**T to (V,)*T indexes it by tokens.
    """
    size = check_enumerable(vocab_size, response_length, limit)
    index = np.arange(size)
    digits = [(index // vocab_size**(response_length - 1 - s)) % vocab_size
              for s in range(response_length)]
    return jnp.asarray(np.stack(digits, axis=1), dtype=jnp.int32)


class ExactProfile(NamedTuple):
    """Exact per-position quantities of a policy and a harm.

    Attributes:
      h0: scalar, E[Harm].
      var_harm: scalar, Var(Harm).
      I: float [T], harm information I_t = E_{y<t}[Var(h_t | y<t)].
      G_norm_sq: float [T], ||G_t||^2 over all parameters, with
        G_t = E_{y<t}[sum_v p_v h_t(y<t v) grad log p_v].
      cs_pointwise: float [T], E_{y<t}[Var(h_t | y<t) * tr F_t(y<t)].
      fisher_trace_mean: float [T], E_{y<t}[tr F_t(y<t)].
      fisher_trace_max: float [T], max of tr F_t(y<t) over prefixes of
        positive probability.
      fisher_bound: float [T], max_t' fisher_trace_max[t'] * I_t, the
        right-hand side of ||G_t||^2 <= F_bar * I_t with F_bar the uniform
        bound over all prefixes.
      G: the parameter pytree with a leading [T] axis holding G_t, or None
        unless requested.
    """

    h0: jax.Array
    var_harm: jax.Array
    I: jax.Array
    G_norm_sq: jax.Array
    cs_pointwise: jax.Array
    fisher_trace_mean: jax.Array
    fisher_trace_max: jax.Array
    fisher_bound: jax.Array
    G: Any = None


def exact_profile(policy: Policy, harm, limit: int = MAX_ENUMERATED_RESPONSES,
                  return_gradients: bool = False,
                  fisher_batch_size: int = 64) -> ExactProfile:
    """Computes the harm-information profile exactly by enumerating all V**T responses.

    With h_t(y_<=t) = E[Harm | y_<=t] (h_{-1} = E[Harm], h_{T-1} = Harm):
      I_t = E_{y<t}[sum_v p_v (h_t(y<t v) - h_{t-1}(y<t))^2],
      G_t = E[h_t(y_<=t) grad log p(y_t | y<t)],
      tr F_t(y<t) = sum_v p_v ||grad log p_v(y<t)||^2,
    and the Cauchy-Schwarz chain ||G_t||^2 <= cs_pointwise_t <= F_bar * I_t.
    Gradients are taken by autodiff through the enumeration, so any policy
    works; the dtype follows the policy's parameters (float64 when
    jax_enable_x64 is on).

    Args:
      policy: any `Policy`.
      harm: a callable from int [B, T] responses to [B] values in [0, 1].
      limit: largest V**T to enumerate.
      return_gradients: also return the per-position gradients G.
      fisher_batch_size: prefixes per vmapped batch in the per-token Fisher
        trace (memory is fisher_batch_size * V * P floats).

    Returns:
      An `ExactProfile`.

    Raises:
      ValueError: if V**T exceeds `limit` (before allocating), or the harm
        returns values outside [0, 1], NaN, or the wrong shape.
    """
    harm = as_harm(harm)
    V, T = policy.vocab_size, policy.response_length
    check_enumerable(V, T, limit)
    harm.check_compatible(V, T)
    if fisher_batch_size < 1:
        raise ValueError(f"fisher_batch_size must be >= 1; got {fisher_batch_size}")
    responses = enumerate_responses(V, T, limit)
    harm_values = check_harm_on(harm, responses)
    node_tokens, node_positions = _prefix_nodes(responses, V, T)
    result = _exact_profile_jit(policy, harm_values, responses, node_tokens,
                                node_positions, fisher_batch_size)
    if not return_gradients:
        result = result._replace(G=None)
    return result


def _prefix_nodes(responses, V, T):
    """Pick one representative response per prefix node, with the node's length.

    Nodes are ordered by length, then lexicographically, as in TabularPolicy:
    the V**t nodes of length t come from rows r * V**(T - t) of `responses`.
    """
    tokens, positions = [], []
    for t in range(T):
        rows = responses.reshape(V**t, V**(T - t), T)[:, 0, :]
        tokens.append(rows)
        positions.append(jnp.full((V**t,), t, dtype=jnp.int32))
    return jnp.concatenate(tokens), jnp.concatenate(positions)


@functools.partial(jax.jit, static_argnames=("fisher_batch_size",))
def _exact_profile_jit(policy, harm_values, responses, node_tokens,
                       node_positions, fisher_batch_size):
    V, T = policy.vocab_size, policy.response_length
    R = responses.shape[0]
    logp = policy.log_probs(responses)  # [R, T, V]
    dtype = logp.dtype
    harm_values = harm_values.astype(dtype)

    # Conditionals at each node: the row of the first response below it.
    conditionals = [jnp.exp(logp.reshape(V**t, V**(T - t), T, V)[:, 0, t, :])
                    for t in range(T)]  # [V**t, V]

    # Backward recursion: h_after[t] has shape [V**t, V] and contains h_t(y<t v).
    h_after = [None] * T
    h_before = [None] * T  # [V**t], h_{t-1}(y<t)
    h_after[T - 1] = harm_values.reshape(V**(T - 1), V)
    for t in range(T - 1, -1, -1):
        h_before[t] = (conditionals[t] * h_after[t]).sum(-1)
        if t > 0:
            h_after[t - 1] = h_before[t].reshape(V**(t - 1), V)

    # Forward recursion for the probability of every node.
    node_prob = [jnp.ones((1,), dtype)]
    for t in range(T - 1):
        node_prob.append((node_prob[t][:, None] * conditionals[t]).reshape(-1))

    conditional_var = [
        (conditionals[t] * (h_after[t] - h_before[t][:, None])**2).sum(-1)
        for t in range(T)]
    info = jnp.stack([(node_prob[t] * conditional_var[t]).sum() for t in range(T)])

    # Per-node Fisher trace by per-token gradients.
    trace_flat = _fisher_traces(policy, node_tokens, node_positions, fisher_batch_size)
    offsets = np.cumsum([0] + [V**t for t in range(T)])
    traces = [trace_flat[offsets[t]:offsets[t + 1]] for t in range(T)]
    fisher_mean = jnp.stack([(node_prob[t] * traces[t]).sum() for t in range(T)])
    fisher_max = jnp.stack([jnp.where(node_prob[t] > 0, traces[t], -jnp.inf).max()
                            for t in range(T)])
    cs_pointwise = jnp.stack([(node_prob[t] * conditional_var[t] * traces[t]).sum()
                              for t in range(T)])

    # G_t = E[h_t(y_<=t) grad log p(y_t|y<t)] over all responses.
    sequence_prob = node_prob[T - 1].reshape(V**(T - 1), 1) * conditionals[T - 1]
    sequence_prob = sequence_prob.reshape(R)
    h_on_path = jnp.stack(
        [h_after[t].reshape(-1)[jnp.arange(R) // V**(T - 1 - t)] for t in range(T)],
        axis=1)  # [R, T]
    weights = jax.lax.stop_gradient(sequence_prob[:, None] * h_on_path)

    def surrogate(params):
        logp_path = _path_log_probs(policy.replace_params(params), responses)
        return (weights * logp_path).sum(0)  # [T]

    gradients = jax.jacrev(surrogate)(policy.params)
    g_norm_sq = sum(jnp.sum(leaf.reshape(T, -1)**2, axis=1)
                    for leaf in jax.tree.leaves(gradients))

    h0 = h_before[0][0]
    var_harm = (sequence_prob * (harm_values - h0)**2).sum()
    fisher_bound = fisher_max.max() * info
    return ExactProfile(h0=h0, var_harm=var_harm, I=info, G_norm_sq=g_norm_sq,
                        cs_pointwise=cs_pointwise, fisher_trace_mean=fisher_mean,
                        fisher_trace_max=fisher_max, fisher_bound=fisher_bound,
                        G=gradients)


def _path_log_probs(policy, responses):
    """log p(y_t | y<t) along each response: float [R, T]."""
    logp = policy.log_probs(responses)
    return jnp.take_along_axis(logp, responses[..., None], axis=-1)[..., 0]


def _fisher_traces(policy, node_tokens, node_positions, batch_size):
    """tr F(y<t) = sum_v p_v ||grad log p_v||^2 for each node: float [S]."""

    def node_trace(tokens, position):
        def log_probs_at(params):
            logp = policy.replace_params(params).log_probs(tokens[None])[0]
            return logp[position]  # [V]

        jac = jax.jacrev(log_probs_at)(policy.params)  # leaves [V, ...]
        sq_norms = sum(jnp.sum(leaf.reshape(leaf.shape[0], -1)**2, axis=1)
                       for leaf in jax.tree.leaves(jac))
        probs = jnp.exp(jax.lax.stop_gradient(log_probs_at(policy.params)))
        return (probs * sq_norms).sum()

    return jax.lax.map(lambda args: node_trace(*args), (node_tokens, node_positions),
                       batch_size=batch_size)
