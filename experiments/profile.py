"""`hi-jax profile`: per-position harm information, gradients and the bound for one policy.

Writes `profile.json` (Monte Carlo means and stderrs, and the exact values
when the model is small enough to enumerate) and `profile.png` to the run
directory, and prints the directory as the last line.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import hi_jax
from experiments import common

DEFAULT_CONFIG = os.path.join(common.CONFIGS_DIR, "profile.py")

MODELS = ("tabular", "npz", "transformer")
HARMS = ("table", "horizon", "decaying")
EXACT_MODES = ("auto", "always", "never")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first invalid field, its value and the allowed range."""
    common.check_choice(config, "model", MODELS)
    common.check_choice(config, "harm", HARMS)
    common.check_choice(config, "exact", EXACT_MODES)
    common.check_int(config, "seed", 0)
    common.check_int(config, "vocab_size", 2)
    common.check_int(config, "response_length", 1)
    common.check_int(config, "num_sequences", 3)
    common.check_int(config, "num_continuations", 2)
    common.check_int(config, "top_k", 0, config.vocab_size - 1)
    common.check_int(config, "num_branches", 0, hi_jax.estimators.MAX_BRANCHES)
    if config.num_branches == 1:
        raise ValueError("config.num_branches=1 is out of range; allowed: 0 (V branches) "
                         "or >= 2")
    common.check_int(config, "num_probes", 1)
    common.check_int(config, "num_groups", 0)
    if config.num_groups in (1, 2):
        raise ValueError(f"config.num_groups={config.num_groups} is out of range; allowed: "
                         "0 (the default count) or >= 3")
    common.check_int(config, "horizon", 1, config.response_length)
    common.check_range(config, "decay", 0.0, 1.0, low_open=True)
    common.check_range(config, "logit_scale", 0.0, None)
    if config.model == "npz" and not config.logits_path:
        raise ValueError("config.logits_path must name an .npz file when config.model "
                         "is 'npz'")
    if config.model == "npz" and not os.path.isfile(config.logits_path):
        raise ValueError(f"config.logits_path: file {config.logits_path!r} not found")
    if config.model == "transformer":
        common.check_int(config, "width", 1)
        common.check_int(config, "depth", 1)
        common.check_int(config, "num_heads", 1)
        common.check_int(config, "mlp_ratio", 1)
    common.check_choice(config, "info_method", hi_jax.estimators.INFO_METHODS)
    common.check_choice(config, "fisher_method", hi_jax.estimators.FISHER_METHODS)
    _check_estimator_fields(config)


def _check_estimator_fields(config) -> None:
    """Checks the estimator fields that depend on each other, naming the config fields."""
    method = config.info_method
    if config.top_k and method not in ("rao_blackwell", "plug_in"):
        raise ValueError(f"config.top_k={config.top_k} applies to config.info_method "
                         f"'rao_blackwell' or 'plug_in'; set it to 0 for {method!r}")
    if config.num_branches and method != "nested":
        raise ValueError(f"config.num_branches={config.num_branches} applies to "
                         f"config.info_method 'nested'; set it to 0 for {method!r}")
    N = config.num_sequences
    groups = config.num_groups or hi_jax.estimators.default_num_groups(N)
    if groups < 3:
        raise ValueError(f"config.num_sequences={N} has no divisor in [3, "
                         f"{hi_jax.estimators.MAX_GROUPS}] to use as the number of groups; "
                         "set --config.num_groups to a divisor >= 3 or change "
                         "config.num_sequences")
    if N % groups:
        raise ValueError(f"config.num_groups={groups} must divide config.num_sequences={N}")
    devices = jax.local_device_count()
    if config.shard and devices > 1 and (N // groups) % devices:
        raise ValueError(
            f"config.num_sequences / config.num_groups = {N} / {groups} = {N // groups} "
            f"outer samples per group must be divisible by the {devices} local devices; "
            "change those fields or pass --config.shard=False")


def build_policy(key: jax.Array, config) -> hi_jax.Policy:
    """Build the policy the config describes."""
    if config.model == "tabular":
        return hi_jax.TabularPolicy.random(key, config.vocab_size, config.response_length,
                                           scale=config.logit_scale)
    if config.model == "npz":
        return load_tabular_npz(config.logits_path)
    transformer_config = hi_jax.TransformerConfig(
        vocab_size=config.vocab_size, response_length=config.response_length,
        width=config.width, depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio, max_len=config.response_length + 1)
    return hi_jax.TransformerPolicy.init(key, transformer_config)


def load_tabular_npz(path: str) -> hi_jax.TabularPolicy:
    """Loads a TabularPolicy from an .npz with arrays logits_0 .. logits_{T-1}."""
    if not os.path.exists(path):
        raise ValueError(f"config.logits_path: file {path!r} not found")
    with np.load(path) as data:
        names = sorted((n for n in data.files if n.startswith("logits_")),
                       key=lambda n: int(n.split("_")[1]))
        if not names:
            raise ValueError(f"config.logits_path: {path!r} contains no arrays named "
                             f"logits_0 .. logits_(T-1); found {data.files}")
        return hi_jax.TabularPolicy.from_logits([data[n] for n in names])


def build_harm(key: jax.Array, config, vocab_size: int, response_length: int) -> hi_jax.Harm:
    """Build the harm the config describes, for a policy of vocabulary V and length T."""
    if config.harm == "table":
        return hi_jax.TableHarm(jax.random.uniform(key, (vocab_size,) * response_length),
                                name="random table harm")
    if config.harm == "horizon":
        if config.horizon > response_length:
            raise ValueError(f"config.horizon={config.horizon} must be in [1, T] = "
                             f"[1, {response_length}]")
        table = jax.random.uniform(key, (vocab_size,) * config.horizon)
        return hi_jax.HorizonHarm(table, config.horizon, name="random horizon harm")
    weights = jax.random.normal(key, (vocab_size,)) * 2.0
    return hi_jax.DecayingHarm(weights, config.decay, name="random decaying harm")


def run_profile(config: ml_collections.ConfigDict, workdir: str,
                overwrite: bool = False) -> dict:
    """Builds the policy and harm, runs the estimators, and writes the run directory.

    Returns the dict written to profile.json.
    """
    validate_config(config)
    common.prepare_workdir(workdir, ["profile.json", "profile.png"], overwrite)
    root = jax.random.key(config.seed)
    key_policy, key_harm, key_estimate = jax.random.split(root, 3)
    policy = build_policy(key_policy, config)
    V, T = policy.vocab_size, policy.response_length
    harm = build_harm(key_harm, config, V, T)
    logging.info("policy %s with V=%d, T=%d; harm %s", type(policy).__name__, V, T, harm)

    mesh = None
    if config.shard and jax.local_device_count() > 1:
        mesh = hi_jax.sharding.batch_mesh()
        logging.info("outer samples sharded over %d local devices", mesh.size)
    start = time.time()
    estimate = hi_jax.estimate_profile(
        key_estimate, policy, harm, num_sequences=config.num_sequences,
        num_continuations=config.num_continuations, info_method=config.info_method,
        top_k=config.top_k or None, num_branches=config.num_branches or None,
        fisher_method=config.fisher_method,
        num_probes=config.num_probes, num_groups=config.num_groups or None, mesh=mesh)
    mc_seconds = time.time() - start
    logging.info("Monte Carlo profile: %.1f s including compilation", mc_seconds)
    result = {"config": config.to_dict(), "vocab_size": V, "response_length": T,
              "monte_carlo": hi_jax.profile_to_dict(estimate),
              "monte_carlo_seconds": mc_seconds}

    exact = None
    enumerable = V**T <= hi_jax.exact.MAX_ENUMERATED_RESPONSES
    if config.exact == "always" or (config.exact == "auto" and enumerable):
        start = time.time()
        exact = hi_jax.exact_profile(policy, harm)
        result["exact"] = hi_jax.profile_to_dict(exact)
        result["exact_seconds"] = time.time() - start
        logging.info("exact profile: %.1f s", result["exact_seconds"])
    else:
        logging.info("exact oracle skipped: V**T = %d", V**T)

    common.write_json(os.path.join(workdir, "profile.json"), result)
    plot_profile(estimate, exact, os.path.join(workdir, "profile.png"))
    return result


def plot_profile(estimate, exact, path: str) -> None:
    """Plots I_t, ||G_t||^2 and both sides of the bound per position."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    T = len(estimate.I.mean)
    positions = np.arange(T)
    series = [("I", "harm information $I_t$"), ("G_norm_sq", r"$\|G_t\|^2$"),
              ("cs_pointwise", r"$E[\mathrm{Var}(h_t)\,\mathrm{tr}F_t]$"),
              ("fisher_bound", r"$\bar F \cdot I_t$")]
    for ax, names in zip(axes, (series[:1], series[1:])):
        for name, label in names:
            value = getattr(estimate, name)
            line = ax.errorbar(positions, value.mean, yerr=2 * value.stderr, marker="o",
                               capsize=3, label=f"{label} (MC, ±2 se)")
            if exact is not None:
                ax.plot(positions, getattr(exact, name), "x", color=line[0].get_color(),
                        markersize=9, label=f"{label} (exact)")
        ax.set_xlabel("position t")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.legend(fontsize=7)
    axes[0].set_title("Harm information per position")
    axes[1].set_title(r"Cauchy-Schwarz chain: $\|G_t\|^2 \leq$ middle $\leq \bar F I_t$")
    figure.tight_layout()
    common.save_figure(figure, path)
    plt.close(figure)


def main(argv, config, workdir: str | None, overwrite: bool):
    """Runs the command; the flags are defined and parsed by experiments.cli."""
    del argv
    validate_config(config)
    workdir = workdir or common.new_run_dir("profile")
    common.log_start("profile", config, workdir)
    run_profile(config, workdir, overwrite=overwrite)
    print(workdir)
