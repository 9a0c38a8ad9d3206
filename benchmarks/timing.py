"""Wall-clock timing and the matmul peak that the benchmarks share."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call of a function, from repeated calls after a warm-up.

    `first_s` is the first call: for a jitted function it includes tracing
    and XLA compilation, for PyTorch any lazy initialisation. `compile_s`
    is `first_s` minus the median, so it is an estimate of compilation time.
    """

    first_s: float
    median_s: float
    min_s: float
    repeats: int

    @property
    def compile_s(self) -> float:
        return max(self.first_s - self.median_s, 0.0)

    def to_dict(self) -> dict[str, float]:
        return {"median_s": self.median_s, "min_s": self.min_s,
                "first_call_s": self.first_s, "compile_s": self.compile_s,
                "repeats": self.repeats}


def block(tree: Any) -> Any:
    """Waits until every JAX array in `tree` is computed; other leaves pass."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()
    return tree


def time_calls(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> Timing:
    """Times `fn()` once cold, `warmup` times unrecorded, then `repeats` times.

    Every call waits for its JAX outputs (`block_until_ready`). PyTorch on
    the CPU runs synchronously, so its calls need no wait.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    start = time.perf_counter()
    block(fn())
    first = time.perf_counter() - start
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return Timing(first, statistics.median(times), min(times), repeats)


def time_once(fn: Callable[[], Any]) -> Timing:
    """Times a single call, for slow eager functions that compile nothing."""
    start = time.perf_counter()
    block(fn())
    elapsed = time.perf_counter() - start
    return Timing(elapsed, elapsed, elapsed, 1)


def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measures float32 FLOP/s of one square matmul in JAX and in PyTorch.

    A [size, size] x [size, size] product is 2 * size**3 FLOPs. The larger
    of the two median rates is the machine peak that the benchmarks report
    fractions of. The rates of the fastest calls are returned too: on a
    machine that other processes load, they are closer to the idle peak.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size**3

    a_jax, b_jax = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    jax_timing = time_calls(lambda: dot(a_jax, b_jax), repeats=repeats)

    a_torch, b_torch = torch.from_numpy(a), torch.from_numpy(b)
    with torch.inference_mode():
        torch_timing = time_calls(lambda: torch.mm(a_torch, b_torch), repeats=repeats)

    jax_rate = flops / jax_timing.median_s
    torch_rate = flops / torch_timing.median_s
    return {"size": size, "jax_flops_per_s": jax_rate, "torch_flops_per_s": torch_rate,
            "peak_flops_per_s": max(jax_rate, torch_rate),
            "jax_fastest_flops_per_s": flops / jax_timing.min_s,
            "torch_fastest_flops_per_s": flops / torch_timing.min_s}


def time_pair(hi_jax_fn: Callable[[], Any], baseline_fn: Callable[[], Any],
              repeats: int = 5, warmup: int = 1) -> tuple[Timing, Timing]:
    """Times two functions with their timed calls interleaved.

    The cold and warm-up calls of each function come first. The timed calls
    then alternate between the two, so a passing load from other processes
    affects both medians alike.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    functions = (hi_jax_fn, baseline_fn)
    first = []
    for fn in functions:
        start = time.perf_counter()
        block(fn())
        first.append(time.perf_counter() - start)
        for _ in range(warmup):
            block(fn())
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, record in zip(functions, times):
            start = time.perf_counter()
            block(fn())
            record.append(time.perf_counter() - start)
    return tuple(Timing(first[i], statistics.median(times[i]), min(times[i]), repeats)
                 for i in range(2))
