"""`hi-jax profile`: the importable run function and the command line."""

import json
import os
import subprocess
import sys

import pytest

from experiments import profile
from experiments.configs import profile as profile_config


def small_config(**overrides):
    config = profile_config.get_config()
    config.unlock()
    config.update(dict(vocab_size=3, response_length=3, horizon=2, num_sequences=12,
                       num_continuations=2))
    config.update(overrides)
    return config


def test_run_profile_writes_both_files(tmp_path):
    result = profile.run_profile(small_config(), str(tmp_path))
    assert (tmp_path / "profile.png").stat().st_size > 0
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["exact"]["I"] == pytest.approx(result["exact"]["I"])
    for field in ("I", "G_norm_sq", "cs_pointwise", "fisher_trace_mean",
                  "fisher_trace_max", "h0", "var_harm"):
        assert field in saved["monte_carlo"]
        assert field in saved["exact"]
    assert len(saved["monte_carlo"]["I"]["mean"]) == 3
    assert len(saved["monte_carlo"]["I"]["stderr"]) == 3


def test_run_profile_on_transformer(tmp_path):
    config = small_config(model="transformer", width=8, depth=1, num_heads=2,
                          harm="decaying")
    result = profile.run_profile(config, str(tmp_path))
    assert len(result["exact"]["I"]) == 3


def test_existing_run_directory_is_not_overwritten(tmp_path):
    profile.run_profile(small_config(), str(tmp_path))
    with pytest.raises(FileExistsError, match="--overwrite"):
        profile.run_profile(small_config(), str(tmp_path))
    profile.run_profile(small_config(), str(tmp_path), overwrite=True)


def test_npz_policy_round_trip(tmp_path):
    import jax
    import numpy as np
    import hi_jax
    policy = hi_jax.TabularPolicy.random(jax.random.key(0), 3, 3)
    path = tmp_path / "logits.npz"
    np.savez(path, **{f"logits_{t}": np.asarray(a)
                      for t, a in enumerate(policy.logit_tables())})
    loaded = profile.load_tabular_npz(str(path))
    np.testing.assert_array_equal(loaded.table, policy.table)


@pytest.mark.parametrize("overrides,fragment", [
    (dict(model="lstm"), "config.model='lstm' is invalid"),
    (dict(num_sequences=0), "config.num_sequences=0 is out of range"),
    (dict(num_continuations=1), "config.num_continuations=1 is out of range"),
    (dict(horizon=4), r"config.horizon=4 is out of range; allowed: \[1, 3\]"),
    (dict(decay=0.0), r"config.decay=0.0 is out of range; allowed: finite values in "
                      r"\(0.0, 1.0\]"),
    (dict(logit_scale=float("inf")), "config.logit_scale=inf is out of range"),
    (dict(top_k=3), r"config.top_k=3 is out of range; allowed: \[0, 2\]"),
    (dict(model="npz"), "config.logits_path must name an .npz file"),
    (dict(model="npz", logits_path="/nonexistent.npz"), "not found"),
    (dict(num_branches=5000), r"config.num_branches=5000 is out of range; allowed: "
                              r"\[0, 4096\]"),
    (dict(info_method="nested", top_k=1), "config.top_k=1 applies to config.info_method"),
    (dict(num_branches=3), "config.num_branches=3 applies to config.info_method 'nested'"),
    (dict(num_sequences=8, num_groups=3), "config.num_groups=3 must divide "
                                          "config.num_sequences=8"),
    (dict(num_sequences=37), "config.num_sequences=37 has no divisor in"),
])
def test_invalid_config_fields_raise(tmp_path, overrides, fragment):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=fragment):
        profile.run_profile(small_config(**overrides), str(workdir))
    assert not workdir.exists()


def _run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args],
                          capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))


def test_command_line_prints_workdir_last(tmp_path):
    workdir = tmp_path / "run"
    result = _run_cli("profile", f"--workdir={workdir}", "--config.vocab_size=2",
                      "--config.response_length=3", "--config.horizon=2",
                      "--config.num_sequences=6", "--config.num_continuations=2",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(workdir)
    assert (workdir / "profile.json").exists()


@pytest.mark.parametrize("flag,fragment", [
    ("--config.no_such_field=1", "unknown config field 'no_such_field'"),
    ("--config=/nonexistent/config.py", "No such file or directory"),
    ("--config.num_sequences=abc", "invalid literal for int()"),
])
def test_command_line_rejects_bad_config_in_one_line(tmp_path, flag, fragment):
    result = _run_cli("profile", flag, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("hi-jax profile: invalid flags or config:")
    assert fragment in lines[-1]
    assert "Traceback" not in result.stderr


def test_command_line_rejects_config_without_get_config(tmp_path):
    (tmp_path / "empty.py").write_text("x = 1\n")
    result = _run_cli("profile", f"--config={tmp_path / 'empty.py'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "has no attribute 'get_config'" in result.stderr


def test_command_line_reports_invalid_value_in_one_line(tmp_path):
    result = _run_cli("profile", "--config.num_sequences=0", f"--workdir={tmp_path}/r",
                      cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "hi-jax profile: error: config.num_sequences=0 is out of range; allowed: >= 3")


def test_run_directory_in_use_is_rejected(tmp_path):
    from experiments import common
    workdir = tmp_path / "busy"
    workdir.mkdir()
    common.lock_workdir(str(workdir))  # Held by this test process until it exits.
    result = _run_cli("profile", f"--workdir={workdir}", "--config.vocab_size=2",
                      "--config.response_length=3", "--config.horizon=2",
                      "--config.num_sequences=6", "--config.num_continuations=2",
                      cwd=tmp_path)
    assert result.returncode == 1
    assert "is in use by another process" in result.stderr.strip().splitlines()[-1]
    assert not (workdir / "profile.json").exists()


def test_command_line_rejects_unknown_command(tmp_path):
    result = _run_cli("train", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown command 'train'" in result.stderr


def test_orbax_info_lines_are_dropped():
    import logging
    import os

    from experiments.cli import _DropOrbaxInfo

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "saver.py")
    own_file = os.path.join("hi_jax", "training.py")
    keep = _DropOrbaxInfo().filter
    assert not keep(record(orbax_file, logging.INFO))
    assert keep(record(orbax_file, logging.WARNING))
    assert keep(record(own_file, logging.INFO))
