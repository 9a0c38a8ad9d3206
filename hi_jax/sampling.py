"""Sampling of responses and of continuations from shared prefixes.

The sampler has three parts: `prefill` (one teacher-forced pass that fills
the cache), `fork_cache` (repeats the cache for M continuations), and the
decode loop `_decode` (one `decode_step` per position, a categorical draw
from the logits). A prefix is encoded once however many continuations and
candidate tokens branch from it.

All functions here work on one prefix; callers vmap over prefixes and
positions. The decode loop runs from a traced start position, so vmapping
over start positions is allowed. Under that vmap a loop from `start` to T
becomes a while loop that runs as many steps as the longest row and selects
every row's state at every step. Passing a static `num_steps` instead runs
exactly that many steps with no selects: positions past T - 1 are computed
and discarded. Both draw the same token at each position (position s uses
fold_in(key, s)), so they return identical responses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hi_jax.policy import Policy, PyTree, check_tokens, fork_cache


def _decode(key: jax.Array, policy: Policy, cache: PyTree, logits: jax.Array,
            buffer: jax.Array, start: jax.Array, num_steps: int | None = None) -> jax.Array:
    """Samples positions start .. T-1 of every row of `buffer`.

    Args:
      key: PRNG key; position s draws with fold_in(key, s).
      policy: the policy.
      cache: a cache of batch M valid for positions < start.
      logits: float [M, V], logits of y_start.
      buffer: int [M, T]; positions < start are kept.
      start: int scalar in [0, T]; at T nothing is sampled.
      num_steps: None loops from `start` to T. A static int runs exactly
        that many steps from `start` and must be at least T - start. Steps
        past position T - 1 repeat position T - 1 and are discarded.

    Returns:
      int [M, T] responses.
    """
    T = policy.response_length

    def step(position, buffer, logits, cache, keep):
        tokens = jax.random.categorical(jax.random.fold_in(key, position), logits)
        tokens = tokens.astype(buffer.dtype)
        if keep is not None:
            current = jax.lax.dynamic_index_in_dim(buffer, position, axis=1,
                                                   keepdims=False)
            tokens = jnp.where(keep, current, tokens)
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, tokens[:, None],
                                                     position, axis=1)
        logits, cache = policy.decode_step(cache, tokens, position)
        return buffer, logits, cache

    if num_steps is None:
        def body(position, carry):
            return step(position, *carry, None)

        buffer, _, _ = jax.lax.fori_loop(start, T, body, (buffer, logits, cache))
        return buffer

    def fixed_body(i, carry):
        position = start + i
        # Past the end, position T - 1 is decoded again and its token kept.
        return step(jnp.minimum(position, T - 1), *carry, position >= T)

    buffer, _, _ = jax.lax.fori_loop(0, num_steps, fixed_body, (buffer, logits, cache))
    return buffer


def prefill_one(policy: Policy, tokens: jax.Array) -> tuple[jax.Array, PyTree]:
    """Encodes one response once: returns (logits float [T, V], cache of batch 1)."""
    logits, cache = policy.prefill(tokens[None])
    return logits[0], cache


def continue_prefilled(key: jax.Array, policy: Policy, prefilled, tokens: jax.Array,
                       start: jax.Array, num: int, num_steps: int | None = None) -> jax.Array:
    """Samples `num` continuations of tokens[:start] from a prefilled cache.

    Args:
      key: PRNG key.
      policy: the policy.
      prefilled: `prefill_one(policy, tokens)`.
      tokens: int [T]; only positions < start are read.
      start: int scalar in [0, T]; T returns `num` copies of `tokens`.
      num: M, the number of continuations.
      num_steps: None, or a static int >= T - start; see `_decode`.

    Returns:
      int [M, T]; positions < start equal `tokens`.
    """
    logits_all, cache = prefilled
    T = policy.response_length
    logits = jnp.take(logits_all, jnp.minimum(start, T - 1), axis=0)
    logits = jnp.broadcast_to(logits, (num,) + logits.shape)
    buffer = jnp.broadcast_to(tokens, (num, T))
    return _decode(key, policy, fork_cache(cache, num), logits, buffer, start,
                   num_steps)


def branch_prefilled(key: jax.Array, policy: Policy, prefilled, tokens: jax.Array,
                     position: jax.Array, candidate: jax.Array, num: int,
                     num_steps: int | None = None) -> jax.Array:
    """Samples `num` continuations of (tokens[:position], candidate).

    The candidate token is fed to the prefix's cache with one `decode_step`
    before the cache is forked, so the prefix tokens[:position] is not
    encoded again and the candidate is encoded once, not `num` times.

    Args:
      key: PRNG key.
      policy: the policy.
      prefilled: `prefill_one(policy, tokens)`.
      tokens: int [T]; only positions < position are read.
      position: int scalar in [0, T - 1], where the candidate goes.
      candidate: int scalar token id.
      num: M.
      num_steps: None, or a static int >= T - 1 - position, the decode steps
        after the candidate; see `_decode`.

    Returns:
      int [M, T] with column `position` equal to `candidate`.
    """
    _, cache = prefilled
    T = policy.response_length
    # The candidate step is the same for every continuation, so it runs on
    # the prefix's single cache row before the cache is forked.
    candidate = jnp.asarray(candidate, tokens.dtype)
    logits, cache = policy.decode_step(cache, candidate[None], position)
    cache = fork_cache(cache, num)
    logits = jnp.broadcast_to(logits, (num,) + logits.shape[1:])
    buffer = jnp.broadcast_to(tokens, (num, T))
    buffer = jax.lax.dynamic_update_slice_in_dim(
        buffer, jnp.full((num, 1), candidate, tokens.dtype), position, axis=1)
    return _decode(key, policy, cache, logits, buffer, position + 1, num_steps)


def sample_continuations(key: jax.Array, policy: Policy, tokens: jax.Array,
                         start: jax.Array, num: int) -> jax.Array:
    """Samples `num` continuations of tokens[:start]: int [M, T].

    The prefix is encoded once and its cache forked across the
    continuations. `tokens` is int [T]; `start` is in [0, T].
    """
    if not isinstance(tokens, jax.core.Tracer):
        if np.shape(tokens) != (policy.response_length,):
            raise ValueError(f"tokens must have shape [T]=({policy.response_length},); "
                             f"got {np.shape(tokens)}")
        check_tokens("tokens", tokens, policy.vocab_size)
    if not isinstance(start, jax.core.Tracer) and not 0 <= int(start) <= policy.response_length:
        raise ValueError(f"start must be in [0, T] = [0, {policy.response_length}]; got "
                         f"{start}")
    _check_num(num)
    return continue_prefilled(key, policy, prefill_one(policy, tokens), tokens,
                              start, num)


def _check_num(num) -> None:
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be an integer >= 1; got {num!r}")


def sample_responses(key: jax.Array, policy: Policy, num: int) -> jax.Array:
    """Samples `num` independent responses from the policy: int [B, T]."""
    _check_num(num)
    return _sample_responses(key, policy, int(num))


@functools.partial(jax.jit, static_argnames=("num",))
def _sample_responses(key, policy, num):
    empty = jnp.zeros((policy.response_length,), jnp.int32)
    return sample_continuations(key, policy, empty, 0, num)


def sample_from_prefixes(key: jax.Array, policy: Policy, prefixes: jax.Array,
                         lengths: jax.Array, num: int) -> jax.Array:
    """Samples `num` continuations for each of B prefixes.

    Args:
      key: PRNG key.
      policy: the policy.
      prefixes: int [B, T]; row b keeps positions < lengths[b].
      lengths: int [B], each in [0, T].
      num: M continuations per prefix, >= 1.

    Returns:
      int [B, M, T].

    Raises:
      ValueError: if a concrete prefix token is outside the vocabulary, a
        length is outside [0, T], or the shapes do not match.
    """
    T = policy.response_length
    _check_num(num)
    if not isinstance(prefixes, jax.core.Tracer):
        if prefixes.ndim != 2 or prefixes.shape[1] != T:
            raise ValueError(f"prefixes must have shape [B, T] with T={T}; got "
                             f"{prefixes.shape}")
        check_tokens("prefixes", prefixes, policy.vocab_size)
    if not isinstance(lengths, jax.core.Tracer):
        lengths_np = np.asarray(lengths)
        if lengths_np.shape != (prefixes.shape[0],):
            raise ValueError(f"lengths must have shape [B]=({prefixes.shape[0]},); got "
                             f"{lengths_np.shape}")
        if lengths_np.size and (lengths_np.min() < 0 or lengths_np.max() > T):
            raise ValueError(f"lengths must be in [0, T] = [0, {T}]; got values from "
                             f"{lengths_np.min()} to {lengths_np.max()}")
    return _sample_from_prefixes(key, policy, prefixes, lengths, num)


@functools.partial(jax.jit, static_argnames=("num",))
def _sample_from_prefixes(key, policy, prefixes, lengths, num):
    keys = jax.random.split(key, prefixes.shape[0])
    return jax.vmap(sample_continuations, in_axes=(0, None, 0, 0, None))(
        keys, policy, prefixes, lengths, num)
