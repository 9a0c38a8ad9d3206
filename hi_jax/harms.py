"""Harm functions: batched maps from responses to [0, 1].

A harm is any callable taking int [B, T] responses to float [B] values in
[0, 1]. The classes here add a name (used in error messages), an optional
known horizon k (the harm reads only y_0 .. y_{k-1}), and validation.
Harm values cannot be checked inside jit, so `check_harm_values` runs
eagerly on values a computation returns, and estimators call it before
returning a result.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


class Harm:
    """A named harm function with an optional horizon.

    Attributes:
      fn: callable from int [B, T] to float [B].
      name: a short name for messages.
      horizon: number of leading tokens the harm reads, or None if unknown.
        When set, h_t is constant beyond it, so I_t = 0 and G_t = 0 for
        t >= horizon.
    """

    def __init__(self, fn: Callable[[jax.Array], jax.Array], name: str = "harm",
                 horizon: int | None = None):
        if not callable(fn):
            raise TypeError(f"harm function must be callable; got {type(fn).__name__}")
        if horizon is not None and (not isinstance(horizon, (int, np.integer))
                                    or horizon < 0):
            raise ValueError(f"harm horizon must be a non-negative integer; got {horizon!r}")
        self.fn = fn
        self.name = name
        self.horizon = None if horizon is None else int(horizon)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.fn(tokens)

    def check_compatible(self, vocab_size: int, response_length: int) -> None:
        """Raises ValueError if the harm cannot read responses of this V and T."""
        if self.horizon is not None and self.horizon > response_length:
            raise ValueError(
                f"harm {self.name!r} has horizon {self.horizon}, beyond the response "
                f"length T={response_length}; the horizon must be in [0, T]")

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, horizon={self.horizon})"


class TableHarm(Harm):
    """Harm given by a full table: Harm(y) = table[y_0, ..., y_{T-1}].

    Args:
      table: array of shape (V,)*T with values in [0, 1].
      name: name used in error messages.
    """

    def __init__(self, table, name: str = "table harm"):
        table = jnp.asarray(table)
        if table.ndim < 1 or len(set(table.shape)) != 1:
            raise ValueError(
                f"{name}: table must have shape (V,)*T; got {table.shape}")
        check_harm_values(name, table)
        self.table = table.astype(jnp.result_type(float))
        self.vocab_size = table.shape[0]
        self.response_length = table.ndim
        super().__init__(self._lookup, name=name, horizon=None)

    def check_compatible(self, vocab_size: int, response_length: int) -> None:
        if (self.vocab_size, self.response_length) != (vocab_size, response_length):
            raise ValueError(
                f"harm {self.name!r} has a table of shape {self.table.shape}, which needs "
                f"V={self.vocab_size}, T={self.response_length}; the policy has "
                f"V={vocab_size}, T={response_length}")

    def _lookup(self, tokens):
        return self.table[tuple(tokens[..., s] for s in range(self.response_length))]


class HorizonHarm(Harm):
    """Harm that reads only the first `horizon` tokens.

    Args:
      prefix_harm: callable from int [B, k] to float [B], or an array of
        shape (V,)*k giving Harm(y) = table[y_0, ..., y_{k-1}].
      horizon: k >= 1.
      name: name used in error messages.
    """

    def __init__(self, prefix_harm, horizon: int, name: str = "horizon harm"):
        if not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ValueError(f"{name}: horizon must be an integer >= 1; got {horizon!r}")
        if callable(prefix_harm):
            prefix_fn = prefix_harm
            self.table = None
        else:
            table = jnp.asarray(prefix_harm)
            if table.ndim != horizon or len(set(table.shape)) != 1:
                raise ValueError(
                    f"{name}: table must have shape (V,)*{horizon} for horizon "
                    f"{horizon}; got {table.shape}")
            check_harm_values(name, table)
            self.table = table.astype(jnp.result_type(float))
            prefix_fn = lambda y: self.table[tuple(y[..., s] for s in range(horizon))]
        super().__init__(lambda tokens: prefix_fn(tokens[..., :horizon]),
                         name=name, horizon=int(horizon))

    def check_compatible(self, vocab_size: int, response_length: int) -> None:
        super().check_compatible(vocab_size, response_length)
        if self.table is not None and self.table.shape[0] != vocab_size:
            raise ValueError(
                f"harm {self.name!r} has a table over V={self.table.shape[0]} tokens; the "
                f"policy has V={vocab_size}")


class DecayingHarm(Harm):
    """A smooth harm whose dependence on y_t decays geometrically with t.

    Harm(y) = sigmoid(bias + sum_t decay**t * token_weights[y_t]).
    The harm information I_t falls roughly as decay**(2t).

    Args:
      token_weights: float [V], the log-odds each token adds at position 0.
      decay: in (0, 1].
      bias: the log-odds with no tokens.
    """

    def __init__(self, token_weights, decay: float, bias: float = 0.0,
                 name: str = "decaying harm"):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"{name}: decay must be in (0, 1]; got {decay}")
        weights = jnp.asarray(token_weights, dtype=jnp.result_type(float))
        if weights.ndim != 1:
            raise ValueError(f"{name}: token_weights must have shape [V]; got {weights.shape}")
        if not bool(jnp.isfinite(weights).all()) or not np.isfinite(bias):
            raise ValueError(f"{name}: token_weights and bias must be finite")
        self.token_weights = weights
        self.decay = float(decay)
        self.bias = float(bias)

        def fn(tokens):
            T = tokens.shape[-1]
            discount = self.decay ** jnp.arange(T, dtype=weights.dtype)
            return jax.nn.sigmoid(self.bias + (discount * weights[tokens]).sum(-1))

        super().__init__(fn, name=name, horizon=None)


def as_harm(harm) -> Harm:
    """Wraps a plain callable as a `Harm`; returns a `Harm` unchanged."""
    if isinstance(harm, Harm):
        return harm
    if callable(harm):
        return Harm(harm, name=getattr(harm, "__name__", "harm"))
    raise TypeError(f"harm must be a Harm or a callable from [B, T] tokens to [B] "
                    f"values; got {type(harm).__name__}")


def check_harm_values(name: str, values, batch_size: int | None = None) -> None:
    """Raises ValueError unless all values are finite and in [0, 1].

    Args:
      name: the harm's name, for the message.
      values: harm values of any shape.
      batch_size: if given, the required shape is [batch_size].
    """
    values = np.asarray(values)
    if batch_size is not None and values.shape != (batch_size,):
        raise ValueError(
            f"harm {name!r} must return shape [B]=({batch_size},) for a batch of "
            f"{batch_size} responses; got shape {values.shape}")
    if values.size == 0:
        return
    nan = np.isnan(values)
    if nan.any():
        raise ValueError(f"harm {name!r} returned NaN for {int(nan.sum())} of "
                         f"{values.size} responses; values must be in [0, 1]")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        bad = low if low < 0.0 else high
        raise ValueError(f"harm {name!r} returned {bad}, outside the allowed range "
                         "[0, 1]")


def check_harm_on(harm: Harm, tokens: jax.Array) -> jax.Array:
    """Evaluates a harm eagerly on int [B, T] tokens and validates the result."""
    values = harm(tokens)
    check_harm_values(harm.name, values, batch_size=tokens.shape[0])
    return values
