"""Helpers shared by the experiment entry points: config checks and run directories."""

from __future__ import annotations

import datetime
import math
import os

try:
    import fcntl
except ImportError:  # Windows has no fcntl.
    fcntl = None

import jax
from absl import logging

from hi_jax.io import save_figure, write_json, write_text  # noqa: F401  (re-exported)

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
RUNS_DIR = "runs"


def _get(config, field):
    """Reads a field by its name or its dotted path, e.g. "eval.num_continuations"."""
    if field in config:
        return config[field]
    value = config
    for part in field.split("."):
        if part not in value:
            raise ValueError(f"config.{field} is missing")
        value = value[part]
    return value


def check_choice(config, field: str, choices) -> None:
    value = _get(config, field)
    if value not in choices:
        raise ValueError(f"config.{field}={value!r} is invalid; allowed: "
                         f"{', '.join(map(repr, choices))}")


def check_int(config, field: str, low: int, high: int | None = None) -> None:
    value = _get(config, field)
    allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config.{field}={value!r} must be an integer {allowed}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"config.{field}={value} is out of range; allowed: {allowed}")


def check_range(config, field: str, low: float | None, high: float | None,
                low_open: bool = False, high_open: bool = False) -> None:
    value = _get(config, field)
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    allowed = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.{field}={value!r} must be a number in {allowed}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"config.{field}={value} is out of range; allowed: finite "
                         f"values in {allowed}")


def new_run_dir(prefix: str) -> str:
    """Return a new directory name under runs/, unique to the second and the process."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(RUNS_DIR, f"{prefix}-{stamp}-{os.getpid()}")


def prepare_workdir(workdir: str, outputs: list[str], overwrite: bool) -> None:
    """Creates `workdir`; refuses to replace existing outputs unless `overwrite`."""
    existing = [name for name in outputs if os.path.exists(os.path.join(workdir, name))]
    if existing and not overwrite:
        raise FileExistsError(
            f"run directory {workdir!r} already contains {', '.join(existing)}; pass "
            "--overwrite to replace them or choose another --workdir")
    os.makedirs(workdir, exist_ok=True)
    lock_workdir(workdir)


# Lock files this process holds, by absolute run directory, open until it exits.
_HELD_LOCKS: dict[str, int] = {}


def lock_workdir(workdir: str) -> None:
    """Locks `workdir` for the rest of this process, or raises if another process has it.

    The lock is an exclusive `flock` on `workdir/.lock`. The operating
    system releases it when the process ends, also when it is killed, so a
    lock file left behind does not block a restart (on a local file system). NOTE: without `fcntl` (Windows)
    nothing is locked.
    """
    path = os.path.abspath(workdir)
    if fcntl is None or path in _HELD_LOCKS:
        return
    descriptor = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise BlockingIOError(
            f"run directory {workdir!r} is in use by another process; wait for it to "
            "finish or choose another --workdir") from None
    _HELD_LOCKS[path] = descriptor


def log_start(command: str, config, workdir: str) -> None:
    """Logs the devices, the resolved config and the run directory."""
    logging.info("hi-jax %s starting; workdir %s", command, workdir)
    logging.info("JAX backend %s, devices %s", jax.default_backend(), jax.devices())
    logging.info("config:\n%s", config)
