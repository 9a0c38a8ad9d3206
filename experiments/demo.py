"""`hi-jax demo`: shallow versus deep alignment in the synthetic refusal world.

Pretrains a base transformer on teacher samples, aligns it once with the
standard objective lam * E[Harm_k] + KL(P || P_base) and once with the deep
objective that adds mu * E_Q[sum_t gamma**t (1 - P(R | y<t))], then evaluates
the three models on the same prefixes and keys. Writes summary.json,
summary.md and the plots to the run directory and prints its path last.
A restarted run on the same directory reuses the saved base model and
resumes each alignment from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from experiments import common, demo_report
from hi_jax import evaluation, training
from hi_jax import world as world_lib
from hi_jax.transformer import TransformerConfig, TransformerPolicy

DEFAULT_CONFIG = os.path.join(common.CONFIGS_DIR, "demo.py")

MODELS = ("base", "standard", "deep")
OUTPUTS = ("summary.json", "summary.md")
BASE_SETTINGS = "base_model_settings.json"


def validate_config(config) -> tuple[world_lib.WorldConfig, TransformerConfig]:
    """Checks every field before any work; returns the world and model configs.

    Raises:
      ValueError: naming the first invalid field, its value and the allowed range.
    """
    common.check_int(config, "seed", 0)
    world = world_lib.world_from_config(config.world)
    model = TransformerConfig(
        vocab_size=world.vocab_size, response_length=world.response_length,
        width=config.model.width, depth=config.model.depth,
        num_heads=config.model.num_heads, mlp_ratio=config.model.mlp_ratio)
    training.validate_pretrain_config(config.pretrain)
    training.validate_align_config(config.align)
    common.check_range(config, "deep_mu", 0.0, None)
    common.check_range(config, "deep_gamma", 0.0, 1.0, low_open=True)
    common.check_int(config, "num_q_prefixes", 1)
    common.check_int(config, "eval.num_eval_sequences", 2)
    common.check_int(config, "eval.num_profile_sequences", 3)
    common.check_int(config, "eval.num_profile_sequences_during_training", 3)
    common.check_int(config, "eval.num_continuations", 2)
    common.check_choice(config, "eval.info_method", ("rao_blackwell", "pick_freeze"))
    common.check_choice(config, "eval.fisher_method", ("exact", "hutchinson"))
    return world, model


def _named_keys(seed: int) -> dict[str, jax.Array]:
    names = ("init", "pretrain", "standard", "deep", "q_train", "q_eval", "kl",
             "profile", "attack", "profile_during_training")
    return dict(zip(names, jax.random.split(jax.random.key(seed), len(names))))


def _align_config(config, mu: float, gamma: float) -> ml_collections.ConfigDict:
    align = ml_collections.ConfigDict(config.align.to_dict())
    align.mu = mu
    align.gamma = gamma
    return align


def _base_model_settings(config, model_config) -> dict:
    """Collect the settings that determine the base model, stored beside it."""
    return {"seed": config.seed, "world": config.world.to_dict(),
            "model": dataclasses.asdict(model_config),
            "pretrain": config.pretrain.to_dict()}


def _check_stale_run(workdir: str, settings: dict, overwrite: bool) -> None:
    """Removes or rejects a base model and alignments made with other settings."""
    path = os.path.join(workdir, BASE_SETTINGS)
    if not os.path.exists(path):
        return
    with open(path) as f:
        stored = json.load(f)
    current = json.loads(json.dumps(settings))
    differences = sorted(_differences(stored, current))
    if not differences:
        return
    if not overwrite:
        raise ValueError(
            f"run directory {workdir!r} contains a base model made with other settings ("
            f"{'; '.join(differences)}); pass --overwrite to start it again or choose "
            "another --workdir")
    logging.warning("removing the base model and alignments of %s: %s", workdir,
                    "; ".join(differences))
    for name in ("base_model", BASE_SETTINGS, "standard", "deep"):
        target = os.path.join(workdir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)


def _differences(stored, current, prefix="config"):
    if isinstance(stored, dict) and isinstance(current, dict):
        for key in sorted(set(stored) | set(current)):
            yield from _differences(stored.get(key), current.get(key), f"{prefix}.{key}")
    elif stored != current:
        yield f"{prefix}: {stored!r} in the run directory, {current!r} now"


def _base_model(keys, config, world, model_config, workdir, stage_seconds):
    """Pretrains the base model, or restores it from workdir/base_model."""
    path = os.path.abspath(os.path.join(workdir, "base_model"))
    init = TransformerPolicy.init(keys["init"], model_config)
    checkpointer = ocp.StandardCheckpointer()
    if os.path.exists(path):
        logging.info("restoring the base model from %s", path)
        params = checkpointer.restore(path, init.params)
        return init.replace_params(params)
    start = time.time()
    teacher = world_lib.TeacherPolicy(world)
    sampler = lambda key, num: world_lib.sample_teacher(key, world, num)
    base = training.pretrain(keys["pretrain"], init, sampler, config.pretrain,
                             teacher_policy=teacher)
    checkpointer.save(path, base.params)
    checkpointer.wait_until_finished()
    common.write_json(os.path.join(workdir, BASE_SETTINGS),
                      _base_model_settings(config, model_config))
    stage_seconds["pretrain"] = time.time() - start
    logging.info("base model saved to %s", path)
    return base


def run_demo(config: ml_collections.ConfigDict, workdir: str,
             overwrite: bool = False) -> dict:
    """Runs the whole demo and writes the run directory; returns the summary dict."""
    start = time.time()
    world, model_config = validate_config(config)
    common.prepare_workdir(workdir, list(OUTPUTS), overwrite)
    _check_stale_run(workdir, _base_model_settings(config, model_config), overwrite)
    keys = _named_keys(config.seed)
    stage_seconds = {}
    harm = world_lib.training_harm(world)
    recovery_ids = world.groups.refusal
    q_train = world_lib.sample_q_prefixes(keys["q_train"], world, config.num_q_prefixes,
                                          world.response_length)
    q_eval, _ = world_lib.sample_q_prefixes(keys["q_eval"], world,
                                            config.eval.num_eval_sequences,
                                            world.response_length)

    base = _base_model(keys, config, world, model_config, workdir, stage_seconds)
    teacher = world_lib.TeacherPolicy(world)
    eval_tokens = world_lib.sample_teacher(keys["kl"], world, config.eval.num_eval_sequences)
    cross_entropy = {
        "base": training.per_position_cross_entropy(base, teacher, eval_tokens),
        "teacher_entropy": training.per_position_cross_entropy(teacher, teacher,
                                                               eval_tokens),
    }

    def profile_during_training(step, policy):
        del step
        profile = evaluation.bound_profile(
            keys["profile_during_training"], policy, harm,
            config.eval.num_profile_sequences_during_training,
            config.eval.num_continuations, info_method=config.eval.info_method,
            fisher_method=config.eval.fisher_method)
        return {name: np.asarray(value.mean).tolist() for name, value in profile.items()}

    models = {"base": base}
    for name, mu, gamma in (("standard", 0.0, 1.0),
                            ("deep", config.deep_mu, config.deep_gamma)):
        stage_start = time.time()
        logging.info("aligning the %s model (mu=%g, gamma=%g)", name, mu, gamma)
        models[name] = training.align(
            keys[name], base, base, harm, _align_config(config, mu, gamma),
            os.path.join(workdir, name), q_prefixes=q_train, recovery_ids=recovery_ids,
            eval_fn=profile_during_training)
        stage_seconds[f"align_{name}"] = time.time() - stage_start

    stage_start = time.time()
    eval_keys = {"kl": keys["kl"], "profile": keys["profile"], "attack": keys["attack"]}
    results = {}
    for name in MODELS:
        logging.info("evaluating the %s model", name)
        results[name] = evaluation.evaluate_model(eval_keys, models[name], base, world,
                                                  q_eval, config.eval)
    stage_seconds["evaluate"] = time.time() - stage_start

    summary = {
        "horizon": world.horizon,
        "response_length": world.response_length,
        "runtime_seconds": time.time() - start,
        "stage_seconds": stage_seconds,
        "base_cross_entropy_per_position": {
            name: np.asarray(value).tolist() for name, value in cross_entropy.items()},
        "config": config.to_dict(),
    }
    for name in MODELS:
        summary[name] = {field: evaluation.estimate_to_dict(value)
                         for field, value in results[name].items()}
    summary["findings"] = demo_report.findings(summary)
    demo_report.write_plots(summary, workdir)
    summary["runtime_seconds"] = time.time() - start
    common.write_json(os.path.join(workdir, "summary.json"), summary)
    common.write_text(os.path.join(workdir, "summary.md"),
                      demo_report.summary_markdown(summary))
    logging.info("demo finished in %.0f s", summary["runtime_seconds"])
    return summary


def main(argv, config, workdir: str | None, overwrite: bool):
    """Runs the command; the flags are defined and parsed by experiments.cli."""
    del argv
    validate_config(config)
    workdir = workdir or common.new_run_dir("demo")
    common.log_start("demo", config, workdir)
    run_demo(config, workdir, overwrite=overwrite)
    print(workdir)
