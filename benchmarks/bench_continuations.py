"""Continuations from shared prefixes: the forked-cache sampler against re-encoding.

hi_jax's `sample_from_prefixes` encodes each of N prefixes once and forks
its KV cache for the M continuations. The baseline, written here in JAX,
tiles each prefix M times and encodes all N * M copies with one batched
prefill before the same decode loop. Both use the same keys, so they sample
the same continuations up to float rounding in the logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_sampling, models
from benchmarks.records import comparison
from benchmarks.timing import time_pair
from hi_jax import sampling
from hi_jax.transformer import TransformerConfig

NUM_PREFIXES = 8
NUM_CONTINUATIONS = 32


@functools.partial(jax.jit, static_argnames=("num",))
def reencode_continuations(key, policy, prefixes, lengths, num: int):
    """Samples `num` continuations per prefix, encoding the prefix once per continuation.

    Same keys and outputs as `sampling.sample_from_prefixes`: int [N, M, T].
    """
    T = policy.response_length
    keys = jax.random.split(key, prefixes.shape[0])

    def one(key, tokens, start):
        tiled = jnp.broadcast_to(tokens, (num, T))
        logits, cache = policy.prefill(tiled)
        first_logits = jnp.take(logits, jnp.minimum(start, T - 1), axis=1)
        return sampling._decode(key, policy, cache, first_logits, tiled, start)

    return jax.vmap(one)(keys, prefixes, lengths)


def _temp_bytes(fn, *args, **kwargs) -> int | None:
    """Returns XLA's temporary buffer bytes for `fn` compiled alone, or None if unknown."""
    jitted = jax.jit(fn, static_argnames=tuple(kwargs))
    stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return None if stats is None else int(stats.temp_size_in_bytes)


def run(quick: bool, peak_flops: float) -> list[dict]:
    del peak_flops
    lengths = (32,) if quick else (16, 32)
    N, M = NUM_PREFIXES, NUM_CONTINUATIONS
    records = []
    for length in lengths:
        config = TransformerConfig(response_length=length, **bench_sampling.MODEL)
        policy = models.random_policy(config)
        prefixes = sampling.sample_responses(jax.random.key(0), policy, N)
        L0, T = config.prefix_length, config.response_length
        for start in sorted({T // 2, 3 * T // 4}):
            starts = jnp.full((N,), start, jnp.int32)
            key = jax.random.key(start)
            forked, reencoded = {}, {}

            def run_forked():
                forked["out"] = sampling.sample_from_prefixes(key, policy, prefixes,
                                                              starts, M)
                return forked["out"]

            def run_reencoded():
                reencoded["out"] = reencode_continuations(key, policy, prefixes, starts,
                                                          num=M)
                return reencoded["out"]

            hi_jax, reference = time_pair(run_forked, run_reencoded)
            same = float(np.mean(np.asarray(forked["out"]) == np.asarray(reencoded["out"])))
            decoded = N * M * (T - start)
            cache_row_bytes = config.depth * 2 * config.num_slots * config.width * 4
            records.append(comparison(
                f"continuations T={T} start={start}", "continuations",
                "re-encode each prefix per continuation (JAX, batched prefill)",
                hi_jax, reference, target=">= 1.5x at T=32",
                target_ratio=1.5 if T == 32 else None,
                num_prefixes=N, num_continuations=M, response_length=T,
                prefix_length=start, fraction_same_tokens=same,
                hi_jax_tokens_computed=N * (L0 + T) + decoded,
                baseline_tokens_computed=N * M * (L0 + T) + decoded,
                hi_jax_cache_bytes=(N + N * M) * cache_row_bytes,
                baseline_cache_bytes=N * M * cache_row_bytes,
                hi_jax_xla_temp_bytes=_temp_bytes(
                    sampling.sample_from_prefixes, key, policy, prefixes, starts, num=M),
                baseline_xla_temp_bytes=_temp_bytes(
                    reencode_continuations, key, policy, prefixes, starts, num=M)))
    return records
