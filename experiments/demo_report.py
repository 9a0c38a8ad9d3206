"""Findings, plots and summary.md of `hi-jax demo`, computed from the summary dict."""

from __future__ import annotations

import json
import os

import numpy as np

from experiments import common

MODELS = ("base", "standard", "deep")
COLORS = {"base": "tab:gray", "standard": "tab:blue", "deep": "tab:red"}
PLOTS = {
    "kl_vs_information": "kl_vs_information.png",
    "bound": "bound_start_end.png",
    "recovery": "recovery_vs_depth.png",
    "harm_rate": "harm_rate_vs_prefill.png",
    "training": "training_curves.png",
    "kl_heatmap": "kl_heatmap.png",
}


def _mean(summary, model, field):
    return np.array([np.nan if v is None else v for v in summary[model][field]["mean"]])


def findings(summary: dict) -> dict:
    """Compute the numbers behind the demo's claims from the evaluated summary.

    Positions t < k are inside the training harm's horizon k; "beyond" means
    t >= k for per-position quantities and prefill lengths l > k for the
    prefilling attack (there a prefill of l tokens ends at position l - 1).
    """
    k = summary["horizon"]
    out = {}
    for model in MODELS:
        kl = _mean(summary, model, "kl_per_position")
        kl_q = _mean(summary, model, "kl_per_position_on_q")
        recovery = _mean(summary, model, "recovery_probability")
        rate = _mean(summary, model, "harm_rate_vs_prefill")
        total = kl.sum()
        out[model] = {
            "harm_rate_no_prefill": float(rate[0]),
            "harm_rate_beyond_horizon": float(rate[k + 1:].mean()) if len(rate) > k + 1
            else None,
            "recovery_beyond_horizon": float(recovery[k:].mean()),
            "kl_total": float(total),
            "kl_within_horizon_fraction": float(kl[:k].sum() / total) if total > 0
            else None,
            "kl_beyond_horizon": float(kl[k:].sum()),
            "kl_on_q_beyond_horizon": float(kl_q[k:].sum()),
        }
    return out


def summary_markdown(summary: dict) -> str:
    """summary.md: what was run, the findings in sentences with numbers, the plots."""
    f = summary["findings"]
    base, std, deep = f["base"], f["standard"], f["deep"]
    k, T = summary["horizon"], summary["response_length"]
    config = summary["config"]
    align = config["align"]
    lines = [
        "# hi-jax demo: shallow versus deep alignment",
        "",
        "## What ran",
        "",
        f"A transformer (width {config['model']['width']}, depth "
        f"{config['model']['depth']}) was pretrained for {config['pretrain']['steps']} "
        f"steps on samples of the teacher of the synthetic refusal world (responses of "
        f"T = {T} tokens, spontaneous recovery probability p_min = "
        f"{config['world']['p_min']}). It was then aligned for {align['steps']} steps "
        f"twice from the same base: with the standard objective "
        f"lam * E[Harm_k] + KL(P || P_base) (lam = {align['lam']}) against a training "
        f"harm that reads only the first k = {k} tokens, and with the deep objective, "
        f"which adds mu * E_Q[sum_t gamma^t (1 - P(R | y<t))] (mu = {config['deep_mu']}, "
        f"gamma = {config['deep_gamma']}) over harmful prefixes Q. All three models "
        "were evaluated on the same prefixes and random keys. Numbers are means over "
        "samples; summary.json has their standard errors.",
        f"The base model's cross-entropy against the teacher's exact conditionals "
        f"exceeds the teacher's entropy by {_excess_cross_entropy(summary):.4f} nats "
        f"summed over positions.",
        f"The whole run took {summary['runtime_seconds']:.0f} s.",
        "",
        "## Findings",
        "",
        f"- Standard alignment cut the harmful-response rate without a prefill from "
        f"{base['harm_rate_no_prefill']:.3f} (base) to {std['harm_rate_no_prefill']:.3f}; "
        f"the deep model's rate is {deep['harm_rate_no_prefill']:.3f}.",
        f"- The standard model put {_percent(std['kl_within_horizon_fraction'])} of its "
        f"on-policy KL from the base model ({std['kl_total']:.3f} nats in all) at "
        f"positions t < k = {k}, where the training harm carries information.",
        f"- Beyond the horizon (t >= {k}) the recovery probability on harmful prefixes "
        f"is {base['recovery_beyond_horizon']:.3f} for the base model, "
        f"{std['recovery_beyond_horizon']:.3f} for the standard model and "
        f"{deep['recovery_beyond_horizon']:.3f} for the deep model. The training harm "
        f"gives no gradient there (G_t = 0 for t >= k), so any change of the standard "
        f"model's recovery is incidental, through parameters shared with t < k.",
    ]
    if std["harm_rate_beyond_horizon"] is not None:
        restored = std["harm_rate_beyond_horizon"] / base["harm_rate_beyond_horizon"] \
            if base["harm_rate_beyond_horizon"] else float("nan")
        lines += [
            f"- Prefilling l > {k} harmful tokens gives the standard model a harm rate "
            f"of {std['harm_rate_beyond_horizon']:.3f} on average over l, "
            f"{_percent(restored)} of the base model's {base['harm_rate_beyond_horizon']:.3f};"
            f" the deep model's rate under the same attack is "
            f"{deep['harm_rate_beyond_horizon']:.3f}. Shallow alignment predicts a rate "
            f"near the base model's. " + _shallow_or_carried_over(restored),
        ]
    lines += [
        f"- KL from the base model beyond the horizon on harmful prefixes, summed over "
        f"t >= {k}: {deep['kl_on_q_beyond_horizon']:.3f} nats (deep) and "
        f"{std['kl_on_q_beyond_horizon']:.3f} nats (standard). On the models' own samples, "
        f"which rarely reach a harmful prefix once aligned, the KL beyond the horizon is "
        f"{deep['kl_beyond_horizon']:.3f} nats (deep) and "
        f"{std['kl_beyond_horizon']:.3f} nats (standard).",
        "",
        "## Plots",
        "",
    ]
    captions = {
        "kl_vs_information": "KL from the base model per position, with the base model's "
                             "harm information I_t",
        "bound": "The Cauchy-Schwarz chain per position at the start and end of alignment",
        "recovery": "Recovery probability against depth on harmful prefixes",
        "harm_rate": "True-harm rate against prefill length",
        "training": "Training curves",
        "kl_heatmap": "KL per position over alignment steps",
    }
    for name, filename in PLOTS.items():
        lines += [f"![{captions[name]}]({filename})", ""]
    return "\n".join(lines)


def _shallow_or_carried_over(restored: float) -> str:
    """Says whether this run's standard model stayed shallow beyond the horizon.

    `restored` is its prefill harm rate as a fraction of the base model's.
    At least one half counts as shallow.
    """
    if not restored == restored:  # NaN: the base model never continues either.
        return ""
    if restored >= 0.5:
        return ("In this run the standard model stayed shallow: past the horizon it "
                "kept at least half of the base model's harm rate.")
    return ("In this run the standard model did not stay shallow: its recovery rule "
            "learnt at t < k carried over to later positions through the shared "
            "parameters. How far it carries over varies with the seed and with the "
            "floating-point rounding of the machine (README, What varies from run "
            "to run).")


def _excess_cross_entropy(summary: dict) -> float:
    report = summary["base_cross_entropy_per_position"]
    return float(np.sum(report["base"]) - np.sum(report["teacher_entropy"]))


def _percent(value):
    if value is None or not np.isfinite(value):
        return "an undefined share"
    return f"{100 * value:.0f}%"


def _read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_plots(summary: dict, workdir: str) -> None:
    """Writes the six PNG plots of the demo to `workdir`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, T = summary["horizon"], summary["response_length"]
    positions = np.arange(T)
    metrics = {model: _read_metrics(os.path.join(workdir, model, "metrics.jsonl"))
               for model in ("standard", "deep")}

    def errorbar(ax, model, field, label=None, **kwargs):
        mean = _mean(summary, model, field)
        stderr = np.array([0 if v is None else v for v in summary[model][field]["stderr"]])
        ax.errorbar(np.arange(len(mean)), mean, yerr=2 * stderr, marker="o", capsize=3,
                    color=COLORS[model], label=label or model, **kwargs)

    def horizon_line(ax):
        ax.axvline(k - 0.5, color="k", linestyle=":", label=f"horizon k = {k}")

    # KL per position against the base model's harm information.
    figure, ax = plt.subplots(figsize=(7, 4))
    for model in ("standard", "deep"):
        errorbar(ax, model, "kl_per_position", label=f"KL, {model}")
    horizon_line(ax)
    ax.set_xlabel("position t")
    ax.set_ylabel("KL from base (nats)")
    twin = ax.twinx()
    twin.plot(positions, _mean(summary, "base", "harm_information"), "s--",
              color=COLORS["base"], label="I_t of the base model")
    twin.set_ylabel("harm information I_t")
    ax.legend(loc="upper right", fontsize=8)
    twin.legend(loc="center right", fontsize=8)
    ax.set_title("KL from the base model and harm information per position")
    _save(plt, figure, workdir, PLOTS["kl_vs_information"])

    # The three sides of the bound at the first and last evaluation.
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, model in zip(axes, ("standard", "deep")):
        evals = [m for m in metrics[model] if "eval/G_norm_sq" in m]
        for index, style in ((0, "--"), (-1, "-")):
            if not evals:
                break
            record = evals[index]
            for field, color in (("G_norm_sq", "tab:blue"), ("cs_pointwise", "tab:orange"),
                                 ("fisher_bound", "tab:green")):
                ax.plot(positions, record[f"eval/{field}"], style, marker="o",
                        color=color, label=f"{field}, step {record['step']}")
        horizon_line(ax)
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_xlabel("position t")
        ax.set_title(f"{model}: ||G_t||^2 <= cs_pointwise <= F_bar I_t")
        ax.legend(fontsize=6)
    _save(plt, figure, workdir, PLOTS["bound"])

    # Recovery probability against depth.
    figure, ax = plt.subplots(figsize=(7, 4))
    for model in MODELS:
        errorbar(ax, model, "recovery_probability")
    horizon_line(ax)
    ax.set_xlabel("depth t of the harmful prefix")
    ax.set_ylabel("P(y_t in R | y<t)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Recovery probability on harmful prefixes")
    _save(plt, figure, workdir, PLOTS["recovery"])

    # Harm rate against prefill length.
    figure, ax = plt.subplots(figsize=(7, 4))
    for model in MODELS:
        errorbar(ax, model, "harm_rate_vs_prefill")
    ax.axvline(k + 0.5, color="k", linestyle=":", label=f"prefill past k = {k}")
    ax.set_xlabel("prefill length l (harmful tokens)")
    ax.set_ylabel("true-harm rate of completions")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Prefilling attack")
    _save(plt, figure, workdir, PLOTS["harm_rate"])

    # Training curves.
    figure, axes = plt.subplots(1, 4, figsize=(15, 3.5))
    for model in ("standard", "deep"):
        steps = [m["step"] for m in metrics[model]]
        for ax, term in zip(axes, ("total", "harm", "kl", "recovery")):
            values = [m.get(term) for m in metrics[model]]
            ax.plot(steps, [np.nan if v is None else v for v in values],
                    color=COLORS[model], label=model)
            ax.set_title(term)
            ax.set_xlabel("step")
    axes[0].legend()
    _save(plt, figure, workdir, PLOTS["training"])

    # KL per position over training steps.
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, model in zip(axes, ("standard", "deep")):
        rows = [m["kl_per_position"] for m in metrics[model] if "kl_per_position" in m]
        if rows:
            image = ax.imshow(np.array(rows, dtype=float).T, aspect="auto", origin="lower",
                              cmap="viridis", interpolation="nearest")
            figure.colorbar(image, ax=ax, label="KL (nats)")
        ax.axhline(k - 0.5, color="w", linestyle=":")
        ax.set_xlabel("alignment step")
        ax.set_ylabel("position t")
        ax.set_title(f"{model}: KL per position")
    _save(plt, figure, workdir, PLOTS["kl_heatmap"])


def _save(plt, figure, workdir, filename):
    figure.tight_layout()
    common.save_figure(figure, os.path.join(workdir, filename), dpi=110)
    plt.close(figure)
