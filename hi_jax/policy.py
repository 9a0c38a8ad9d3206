"""The policy interface that every estimator takes, and the tabular policy.

Dimension letters used throughout hi_jax:
  B batch, T response positions, V vocabulary, M continuations per prefix,
  N outer samples (independent prefixes), P parameters, K probes or candidates.

A policy is a JAX pytree whose only leaves are its parameters, so
`jax.grad`, `jax.jvp` and `jax.vmap` work on it directly. `policy.params`
is the parameter pytree, and `policy.replace_params(p)` rebuilds the policy
around new parameters. Everything else (vocabulary size, response length,
architecture, prompt) is static auxiliary data.

Positions are 0-based: `logits(tokens)[:, t]` are the logits of the
distribution of response token y_t given the (optional) prompt and y_<t.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# Largest number of prefix nodes a tabular policy may hold. The table has
# sum_{t<T} V**t rows of V logits each, so this bounds its memory.
MAX_TABULAR_NODES = 2**22


class Policy(abc.ABC):
    """An autoregressive distribution over responses of `response_length` tokens.

    Subclasses provide teacher-forced logits and incremental decoding with a
    cache. The cache is a pytree with a leading batch axis on every leaf, so
    `fork_cache` can repeat it for continuations.
    """

    vocab_size: int
    response_length: int

    @property
    @abc.abstractmethod
    def params(self) -> PyTree:
        """Return the parameter pytree, the only pytree leaves of the policy."""

    @abc.abstractmethod
    def replace_params(self, params: PyTree) -> "Policy":
        """Returns the same policy with other parameters."""

    @abc.abstractmethod
    def logits(self, tokens: jax.Array) -> jax.Array:
        """Teacher-forced logits.

        Args:
          tokens: int [B, T] response tokens.

        Returns:
          float [B, T, V]; entry [b, t] is the logit vector of y_t given y_<t.
        """

    @abc.abstractmethod
    def prefill(self, tokens: jax.Array) -> tuple[jax.Array, PyTree]:
        """Encodes whole responses once and returns their logits and a cache.

        The cache is valid for decoding from any position s: entries at
        positions >= s are overwritten by `decode_step` before they are read.

        Args:
          tokens: int [B, T].

        Returns:
          (logits float [B, T, V] as in `logits`, cache).
        """

    @abc.abstractmethod
    def decode_step(self, cache: PyTree, tokens: jax.Array,
                    position: jax.Array) -> tuple[jax.Array, PyTree]:
        """Feeds response token y_position and returns the logits of y_{position+1}.

        Args:
          cache: a cache from `prefill` or a previous `decode_step`, holding
            the tokens before `position`.
          tokens: int [B], the tokens at `position`.
          position: int scalar in [0, T - 1]. At T - 1 the returned logits
            are meaningless and callers ignore them.

        Returns:
          (logits float [B, V], updated cache).
        """

    def log_probs(self, tokens: jax.Array) -> jax.Array:
        """Log-softmax of `logits(tokens)`: float [B, T, V]."""
        return jax.nn.log_softmax(self.logits(tokens), axis=-1)

    def sequence_log_prob(self, tokens: jax.Array) -> jax.Array:
        """log P(y) for int [B, T] responses: float [B]."""
        logp = self.log_probs(tokens)
        picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
        return picked.sum(axis=-1)

    # Pytree plumbing: the parameters are the children, the rest is static.
    def tree_flatten(self):
        return (self.params,), self._static()

    @abc.abstractmethod
    def _static(self) -> tuple:
        """Hashable static data that `tree_unflatten` needs."""


def fork_cache(cache: PyTree, num_copies: int) -> PyTree:
    """Repeats every batch entry of a cache `num_copies` times along axis 0.

    A cache of batch B becomes one of batch B * num_copies, with copies of
    entry b at rows b * num_copies ... (b + 1) * num_copies - 1.
    """
    return jax.tree.map(lambda x: jnp.repeat(x, num_copies, axis=0), cache)


@jax.tree_util.register_pytree_node_class
class TabularPolicy(Policy):
    """Full-history per-prefix softmax: the decoupled model of the theory.

    Every prefix y_<t has its own logit vector, so the conditionals at
    different prefixes share no parameters. Internally the logits are stored
    as one array `table` of shape [S, V] with one row per prefix node,
    S = sum_{t<T} V**t, ordered by length and then lexicographically: the
    node of prefix (y_0, ..., y_{t-1}) is row
    (V**t - 1) / (V - 1) + sum_s y_s * V**(t - 1 - s).
    """

    def __init__(self, table: jax.Array, vocab_size: int, response_length: int):
        # JAX may rebuild pytrees with placeholder leaves, so only arrays are checked.
        shape = getattr(table, "shape", None)
        if isinstance(shape, tuple):
            expected = (_num_nodes(vocab_size, response_length), vocab_size)
            if shape != expected:
                raise ValueError(
                    f"table must have shape [S, V] = {expected} for V={vocab_size}, "
                    f"T={response_length}; got {shape}. Use TabularPolicy.from_logits "
                    "to build one from per-position tables")
        self.table = table
        self.vocab_size = vocab_size
        self.response_length = response_length

    # Construction ---------------------------------------------------------

    @classmethod
    def from_logits(cls, logits) -> "TabularPolicy":
        """Builds a policy from per-position logit tables.

        Args:
          logits: a sequence of T arrays; `logits[t]` has shape (V,)*t + (V,)
            and contains the logits of y_t for every prefix y_<t.

        Raises:
          ValueError: if the shapes do not form a full-history table, or a
            logit is NaN.
        """
        if isinstance(logits, (jax.Array, np.ndarray)) or len(logits) == 0:
            raise ValueError(
                "logits must be a non-empty list of T arrays with logits[t] of "
                "shape (V,)*t + (V,); got "
                f"{type(logits).__name__} {getattr(logits, 'shape', '')}")
        first = np.shape(logits[0])
        if len(first) != 1 or first[0] < 2:
            raise ValueError(
                f"logits[0] must have shape (V,) with V >= 2; got shape {first}")
        vocab_size = first[0]
        response_length = len(logits)
        _check_table_size(vocab_size, response_length)
        rows = []
        for t, table in enumerate(logits):
            expected = (vocab_size,) * (t + 1)
            if tuple(np.shape(table)) != expected:
                raise ValueError(
                    f"logits[{t}] must have shape {expected} (V={vocab_size}); "
                    f"got {tuple(np.shape(table))}")
            table = jnp.asarray(table)
            if not jnp.issubdtype(table.dtype, jnp.floating):
                table = table.astype(jnp.result_type(float))
            rows.append(table.reshape(-1, vocab_size))
        flat = jnp.concatenate(rows, axis=0)
        if bool(jnp.isnan(flat).any()):
            bad = int(jnp.isnan(flat).sum())
            raise ValueError(f"logits contain {bad} NaN values; all must be finite "
                             "or -inf")
        return cls(flat, vocab_size, response_length)

    @classmethod
    def random(cls, key: jax.Array, vocab_size: int, response_length: int,
               scale: float = 1.0, dtype=None) -> "TabularPolicy":
        """Build a policy with i.i.d. normal logits of standard deviation `scale`."""
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2; got {vocab_size}")
        if response_length < 1:
            raise ValueError(f"response_length must be >= 1; got {response_length}")
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0; got {scale}")
        _check_table_size(vocab_size, response_length)
        num_nodes = _num_nodes(vocab_size, response_length)
        dtype = dtype or jnp.result_type(float)
        table = scale * jax.random.normal(key, (num_nodes, vocab_size), dtype)
        return cls(table, vocab_size, response_length)

    def logit_tables(self) -> list[jax.Array]:
        """Split the table back into T arrays of shape (V,)*t + (V,), inverting `from_logits`."""
        out = []
        for t in range(self.response_length):
            start = _node_offset(self.vocab_size, t)
            rows = self.table[start:start + self.vocab_size**t]
            out.append(rows.reshape((self.vocab_size,) * (t + 1)))
        return out

    # Policy interface -----------------------------------------------------

    @property
    def params(self) -> jax.Array:
        return self.table

    def replace_params(self, params: jax.Array) -> "TabularPolicy":
        return TabularPolicy(params, self.vocab_size, self.response_length)

    def _static(self) -> tuple:
        return (self.vocab_size, self.response_length)

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(children[0], *static)

    def node_index(self, tokens: jax.Array, length: jax.Array) -> jax.Array:
        """Row of `table` for the prefix tokens[..., :length].

        Args:
          tokens: int [..., T].
          length: int, broadcastable to tokens.shape[:-1], in [0, T - 1].

        Returns:
          int [...] row indices.
        """
        V, T = self.vocab_size, self.response_length
        length = jnp.asarray(length)[..., None]
        s = jnp.arange(T)
        # Digit weight of y_s in the base-V number of the prefix.
        exponent = jnp.clip(length - 1 - s, 0, None)
        weight = jnp.where(s < length, jnp.asarray(V) ** exponent, 0)
        digits = (tokens.astype(jnp.int32) * weight).sum(axis=-1)
        offset = (jnp.asarray(V) ** length[..., 0] - 1) // (V - 1)
        return offset + digits

    def logits(self, tokens: jax.Array) -> jax.Array:
        T = self.response_length
        rows = self.node_index(tokens[..., None, :], jnp.arange(T))
        return self.table[rows]

    def prefill(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        # The cache of a tabular policy is the token buffer itself.
        return self.logits(tokens), tokens

    def decode_step(self, cache, tokens, position):
        position = jnp.asarray(position)
        buffer = cache.at[:, position].set(tokens.astype(cache.dtype))
        next_length = jnp.minimum(position + 1, self.response_length - 1)
        rows = self.node_index(buffer, next_length)
        return self.table[rows], buffer


def _num_nodes(vocab_size: int, response_length: int) -> int:
    return (vocab_size**response_length - 1) // (vocab_size - 1)


def _node_offset(vocab_size: int, length: int) -> int:
    return (vocab_size**length - 1) // (vocab_size - 1)


def _check_table_size(vocab_size: int, response_length: int) -> None:
    nodes = _num_nodes(vocab_size, response_length)
    if nodes > MAX_TABULAR_NODES:
        raise ValueError(
            f"a tabular policy with V={vocab_size}, T={response_length} needs "
            f"{nodes} prefix rows, more than the limit MAX_TABULAR_NODES="
            f"{MAX_TABULAR_NODES}; use a smaller V or T, or a transformer")


def check_tokens(name: str, tokens, vocab_size: int) -> None:
    """Raises ValueError if any token id is outside [0, vocab_size)."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids; got dtype {arr.dtype}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} contains token id {bad}, outside the vocabulary "
            f"[0, {vocab_size - 1}]")


def num_responses(policy: Policy) -> int:
    """V**T, the number of distinct responses."""
    return int(math.pow(policy.vocab_size, policy.response_length))
