"""End to end: `experiments.demo.run_demo` on its default config.

There is no baseline; the record gives the wall time, compilation
included, and the demo's own split by stage (`stage_seconds`).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time

CONFIG_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments", "configs", "demo.py")


def _default_config():
    spec = importlib.util.spec_from_file_location("demo_config", CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run(quick: bool, peak_flops: float) -> list[dict]:
    del quick, peak_flops
    # Imported here: the module defines absl flags and pulls in training code.
    from experiments import demo

    with tempfile.TemporaryDirectory(prefix="hi_jax_bench_demo_") as workdir:
        start = time.perf_counter()
        summary = demo.run_demo(_default_config(), workdir)
        elapsed = time.perf_counter() - start
    return [{"name": "demo, default config", "benchmark": "demo", "baseline": None,
             "ratio": None, "hi_jax_s": elapsed, "baseline_s": None, "compile_s": None,
             "target": None, "stage_seconds": summary["stage_seconds"],
             "demo_runtime_seconds": summary["runtime_seconds"]}]
