"""Runs the hi_jax benchmarks, writes bench.json and prints a table.

bench.json is a list of records (see benchmarks/records.py). The first is
the matmul peak with the machine description. A benchmark that raised
leaves a record with an `error` field, and the exit status is then 1.

    python -m benchmarks.run [--quick] [--only sampling,fisher] [--output bench.json]

Every benchmark compares hi_jax with a baseline measured in the same
process on the same machine; see docs/benchmarks.md for what each one
times. The matmul peak is measured first, and FLOP/s fractions refer to it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback

import jax
import numpy as np
import torch

from benchmarks import records, timing

BENCHMARKS = ("sampling", "profile", "continuations", "gradients", "fisher",
              "efficiency", "demo")
# Benchmarks left out of --quick.
FULL_ONLY = ("demo",)

logger = logging.getLogger("benchmarks")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def machine_info() -> dict:
    """Describes the machine and software that the numbers are measured on."""
    return {"nproc": os.cpu_count(), "cpu_model": _cpu_model(),
            "memory_gib": _memory_gib(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "git_commit": _git_commit(),
            "load_average_start": list(os.getloadavg())}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sweep, under about 5 minutes on 2 CPU cores; "
                             "leaves out the demo")
    parser.add_argument("--only", default=None,
                        help="comma-separated benchmarks to run, from: "
                             + ", ".join(BENCHMARKS))
    parser.add_argument("--output", default="bench.json",
                        help="path of the JSON file to write (default: bench.json)")
    args = parser.parse_args(argv)
    if args.only is None:
        args.names = [name for name in BENCHMARKS
                      if not (args.quick and name in FULL_ONLY)]
    else:
        args.names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in args.names if name not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(BENCHMARKS)}")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    machine = machine_info()
    logger.info("machine: %s", machine)
    busy = machine["load_average_start"][0]
    if busy > 0.5 * (machine["nproc"] or 1):
        logger.warning(
            "load average %.1f on %s cores: other processes are using the CPU. Such "
            "load slowed PyTorch far more than XLA in past runs, so compare ratios "
            "only from runs on an idle machine", busy, machine["nproc"])
    peak = timing.measure_matmul_peak()
    logger.info("matmul peak: JAX %.1f GFLOP/s, PyTorch %.1f GFLOP/s",
                peak["jax_flops_per_s"] / 1e9, peak["torch_flops_per_s"] / 1e9)

    peak_record = {
        "name": "matmul peak", "benchmark": "peak", "baseline": "torch.mm",
        "ratio": peak["jax_flops_per_s"] / peak["torch_flops_per_s"],
        "hi_jax_s": None, "baseline_s": None, "compile_s": None, **peak,
        "quick": args.quick, "machine": machine}
    results, failures = [peak_record], []
    for name in args.names:
        logger.info("benchmark %s: starting", name)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            new_records = module.run(args.quick, peak["peak_flops_per_s"])
        except Exception as error:  # Record the failure and go on with the others.
            logger.error("benchmark %s failed: %s\n%s", name, error, traceback.format_exc())
            failures.append({"name": name, "benchmark": name, "baseline": None,
                             "ratio": None, "error": f"{type(error).__name__}: {error}"})
            continue
        for record in new_records:
            record["benchmark_seconds"] = time.perf_counter() - start
        results.extend(new_records)
        logger.info("benchmark %s: finished in %.0f s", name, time.perf_counter() - start)

    machine["load_average_end"] = list(os.getloadavg())
    total_seconds = time.perf_counter() - started
    peak_record["total_seconds"] = total_seconds
    with open(args.output, "w") as file:
        json.dump(results + failures, file, indent=1)
    print(records.format_table(results[1:]))
    print(f"\nmatmul peak {peak['peak_flops_per_s'] / 1e9:.0f} GFLOP/s "
          f"(JAX {peak['jax_flops_per_s'] / 1e9:.0f}, PyTorch "
          f"{peak['torch_flops_per_s'] / 1e9:.0f}); load average "
          f"{machine['load_average_start'][0]:.1f} at start, "
          f"{machine['load_average_end'][0]:.1f} at end; total {total_seconds:.0f} s; "
          f"wrote {args.output}")
    for failure in failures:
        print(f"FAILED {failure['benchmark']}: {failure['error']}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
