"""Exact oracle: every quantity of the theory by enumeration of all V**T responses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
    """All V**T responses in lexicographic order: int32 [V**T, T].

    Row r is the base-V digits of r, most significant first, so reshaping
    any per-response array of length V**T to (V,)*T indexes it by tokens.
    """
    size = check_enumerable(vocab_size, response_length, limit)
    index = np.arange(size)
    digits = [(index // vocab_size**(response_length - 1 - s)) % vocab_size
              for s in range(response_length)]
    return jnp.asarray(np.stack(digits, axis=1), dtype=jnp.int32)
