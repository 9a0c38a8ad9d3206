"""`hi-jax sweep`: equilibrium scaling of the alignment objectives over a grid.

On random tabular worlds (a random TabularPolicy as P_base and a harm with
horizon k), the sweep minimises, with exact gradients,

  * the standard objective lam * E_P[Harm] + KL(P || P_base) for every lam,
    and compares each optimum with the closed form `exact_equilibrium`;
  * the deep objective, which adds mu * E_{y ~ Q}[sum_t gamma**t *
    (1 - P(y_t in R | y<t))], for every (lam, mu, gamma),

then checks the predictions of the theory: D_KL^(t) = (lam**2 / 2) * I_t at
the standard optimum (with a Bayesian fit of the exponents), and the Gibbs
form of recovery beyond the horizon at the deep optimum.

The pending grid points of one world and objective run as one vmapped
program (up to config.max_batch_size points). Each point writes
points/<id>.json when it finishes, or points/<id>.error.json with the error
when it fails, and a failure does not stop the other points. A rerun on the
same --workdir reuses finished points and retries failed ones; --overwrite
recomputes every point. The run directory also gets sweep.json (every
point's measurements, the fit summary and the point counts) and the plots
kl_scaling.png, exponents.png and recovery.png, which each run replaces.
The last line printed is the run directory.

Everything runs in float64 (`jax.enable_x64`). At lam = 1e-3 the KL is
about 2e-8 nats, below the float32 rounding of the log-probabilities (about
1e-7). In float32 the closed-form optimum of a V = 3, T = 4 world gave 2 to
28 times the predicted KL at lam = 1e-3, against 0.9997 times in float64.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
import traceback
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from experiments import common
from hi_jax import equilibrium, scaling_fit, theory
from hi_jax.exact import check_enumerable, enumerate_responses, exact_profile
from hi_jax.harms import HorizonHarm
from hi_jax.policy import TabularPolicy

DEFAULT_CONFIG = os.path.join(common.CONFIGS_DIR, "equilibrium.py")

OBJECTIVES = ("standard", "deep")
PREFIX_SOURCES = ("harm_weighted", "base", "uniform")
POINTS_DIR = "points"
PLOTS = ("kl_scaling.png", "exponents.png", "recovery.png")

# Config fields that change the content of a finished point. A point file made
# with other values of these cannot be reused.
_WORLD_FIELDS = ("seed", "vocab_size", "response_length", "horizon", "logit_scale",
                 "recovery_tokens", "base_recovery", "prefix_source")
_OPTIMIZER_FIELDS = {
    "standard": ("lbfgs_steps", "tolerance"),
    "deep": ("adam_steps", "learning_rate", "lbfgs_steps", "tolerance"),
}


# Config validation --------------------------------------------------------------


def _field(config, path: str) -> dict:
    """Returns {path: value} for a dotted field path, for the common.check_* helpers.

    The helpers then name the field by its full path, e.g. config.deep.mus[1].
    """
    node = config
    for name in path.split("."):
        if name not in node:
            raise ValueError(f"config.{path} is missing")
        node = node[name]
    return {path: node}


def _check_grid(config, path: str, low: float, high: float | None = None,
                low_open: bool = False) -> None:
    """Checks a non-empty tuple of distinct numbers, each in the given range."""
    values = _field(config, path)[path]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not values:
        raise ValueError(f"config.{path}={values!r} must be a non-empty tuple of numbers")
    for index, value in enumerate(values):
        name = f"{path}[{index}]"
        common.check_range({name: value}, name, low, high, low_open=low_open)
    labels = [_format(value) for value in values]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config.{path}={tuple(values)} has repeated values (to 6 "
                         "significant digits); each grid value must be distinct")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first invalid field, its value and the allowed range."""
    common.check_int(config, "seed", 0)
    common.check_int(config, "num_worlds", 1)
    common.check_int(config, "vocab_size", 2)
    common.check_int(config, "response_length", 1)
    common.check_int(config, "horizon", 1, config.response_length)
    common.check_range(config, "logit_scale", 0.0, None)
    common.check_range(config, "base_recovery", 0.0, 1.0, low_open=True, high_open=True)
    common.check_choice(config, "prefix_source", PREFIX_SOURCES)
    common.check_int(config, "max_batch_size", 1)
    _check_recovery_tokens(config)
    try:
        check_enumerable(config.vocab_size, config.response_length)
    except ValueError as error:
        raise ValueError(
            f"config.vocab_size={config.vocab_size} and config.response_length="
            f"{config.response_length}: {error}") from None

    _check_grid(config, "standard.lams", 0.0, None, low_open=True)
    _check_grid(config, "deep.lams", 0.0, None)
    _check_grid(config, "deep.mus", 0.0, None, low_open=True)
    _check_grid(config, "deep.gammas", 0.0, 1.0, low_open=True)
    for objective in OBJECTIVES:
        path = f"{objective}.lbfgs_steps"
        common.check_int(_field(config, path), path, 1)
        path = f"{objective}.tolerance"
        common.check_range(_field(config, path), path, 0.0, None)
    common.check_int(_field(config, "deep.adam_steps"), "deep.adam_steps", 0)
    common.check_range(_field(config, "deep.learning_rate"), "deep.learning_rate", 0.0,
                       None, low_open=True)

    common.check_range(_field(config, "fit.max_lam"), "fit.max_lam", 0.0, None,
                       low_open=True)
    for name in ("num_warmup", "num_samples", "num_chains"):
        common.check_int(_field(config, f"fit.{name}"), f"fit.{name}", 1)
    common.check_range(_field(config, "fit.interval"), "fit.interval", 0.0, 1.0,
                       low_open=True, high_open=True)


def _check_recovery_tokens(config) -> None:
    tokens = config.recovery_tokens
    vocab_size = config.vocab_size
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__") or not tokens:
        raise ValueError(f"config.recovery_tokens={tokens!r} must be a non-empty tuple "
                         "of token ids")
    for index, token in enumerate(tokens):
        name = f"recovery_tokens[{index}]"
        common.check_int({name: token}, name, 0, vocab_size - 1)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"config.recovery_tokens={tuple(tokens)} has repeated token ids")
    if len(tokens) == vocab_size:
        raise ValueError(f"config.recovery_tokens={tuple(tokens)} covers the whole "
                         f"vocabulary of V={vocab_size} tokens; leave at least one out")


# The grid -----------------------------------------------------------------------


class GridPoint(NamedTuple):
    """One optimisation of the sweep.

    Attributes:
      id: file name stem, unique within the grid.
      objective: "standard" or "deep".
      world: index of the random world.
      lam: harm weight.
      mu: recovery penalty, 0 for the standard objective.
      gamma: recovery discount, 1 (and unused) for the standard objective.
    """
    id: str
    objective: str
    world: int
    lam: float
    mu: float
    gamma: float


def _format(value: float) -> str:
    return f"{float(value):.6g}"


def grid_points(config) -> list[GridPoint]:
    """Lists every grid point, world by world: standard points, then deep points."""
    points = []
    for world in range(config.num_worlds):
        for lam in config.standard.lams:
            points.append(GridPoint(f"standard_w{world}_lam{_format(lam)}", "standard",
                                    world, float(lam), 0.0, 1.0))
        for lam, mu, gamma in itertools.product(config.deep.lams, config.deep.mus,
                                                config.deep.gammas):
            point_id = (f"deep_w{world}_lam{_format(lam)}_mu{_format(mu)}"
                        f"_gamma{_format(gamma)}")
            points.append(GridPoint(point_id, "deep", world, float(lam), float(mu),
                                    float(gamma)))
    return points


def point_settings(config, objective: str) -> dict:
    """Returns the config values that a point of `objective` depends on, JSON-normalised."""
    settings = {name: config[name] for name in _WORLD_FIELDS}
    section = config[objective]
    settings.update({f"{objective}.{name}": section[name]
                     for name in _OPTIMIZER_FIELDS[objective]})
    return json.loads(json.dumps(settings))


# Worlds -------------------------------------------------------------------------


class World(NamedTuple):
    """One random tabular world.

    Attributes:
      index: the world's index in the grid.
      base: P_base, a TabularPolicy with V, T from the config.
      harm: HorizonHarm with horizon k.
      prefix_dist: float [V**T], Q as a distribution over responses.
      info: float [T], the harm information I_t under P_base.
      recovery_tokens: int [|R|], the recovery set R.
    """
    index: int
    base: TabularPolicy
    harm: HorizonHarm
    prefix_dist: np.ndarray
    info: np.ndarray
    recovery_tokens: np.ndarray


def build_world(config, key: jax.Array, index: int) -> World:
    """Builds world `index` from the key fold_in(key, index).

    P_base has i.i.d. normal logits of std config.logit_scale, with the
    logits of R shifted at every prefix so that P_base(R | u) =
    config.base_recovery. The harm reads the first k tokens through a table
    of uniform [0, 1) values.
    """
    V, T, k = config.vocab_size, config.response_length, config.horizon
    key_policy, key_harm = jax.random.split(jax.random.fold_in(key, index))
    tokens = np.asarray(config.recovery_tokens, dtype=np.int32)
    mask = np.zeros(V, dtype=bool)
    mask[tokens] = True
    random_policy = TabularPolicy.random(key_policy, V, T, scale=config.logit_scale)
    base = TabularPolicy(_set_recovery(random_policy.table, mask, config.base_recovery),
                         V, T)
    harm = HorizonHarm(jax.random.uniform(key_harm, (V,) * k), k,
                       name=f"world {index} horizon harm")
    prefix_dist = _prefix_distribution(config.prefix_source, base, harm)
    info = np.asarray(exact_profile(base, harm).I)
    return World(index, base, harm, prefix_dist, info, tokens)


def _set_recovery(table: jax.Array, mask: np.ndarray, recovery: float) -> jax.Array:
    """Shifts the logits of R in each row so that P(R | row) = recovery: float [S, V]."""
    log_probs = jax.nn.log_softmax(table, axis=-1)
    log_inside = jax.scipy.special.logsumexp(jnp.where(mask, log_probs, -jnp.inf), axis=-1)
    log_outside = jax.scipy.special.logsumexp(jnp.where(mask, -jnp.inf, log_probs), axis=-1)
    shift = log_outside - log_inside + math.log(recovery / (1.0 - recovery))
    return jax.nn.log_softmax(jnp.where(mask, log_probs + shift[:, None], log_probs),
                              axis=-1)


def _prefix_distribution(source: str, base: TabularPolicy, harm) -> np.ndarray:
    """Returns Q over all V**T responses in lexicographic order: float [V**T]."""
    responses = enumerate_responses(base.vocab_size, base.response_length)
    if source == "uniform":
        return np.full(responses.shape[0], 1.0 / responses.shape[0])
    weights = np.exp(np.asarray(base.sequence_log_prob(responses)))
    if source == "harm_weighted":
        weights = weights * np.asarray(harm(responses))
        if not weights.sum() > 0:
            raise ValueError("prefix_source 'harm_weighted' needs a harm that is > 0 on "
                             "some response; this world's harm is 0 everywhere")
    return weights / weights.sum()


# Optimisation ---------------------------------------------------------------------

# NOTE: the sweep vmaps the objective and the optimiser loops of
# hi_jax.equilibrium (the ones `optimize_deep_objective` runs), which that
# module keeps private and exposes only for one point at a time.


@functools.partial(jax.jit, static_argnames=("vocab_size", "response_length",
                                             "adam_steps", "learning_rate",
                                             "lbfgs_steps", "tolerance"))
def solve_batch(problems, vocab_size: int, response_length: int, adam_steps: int,
                learning_rate: float, lbfgs_steps: int, tolerance: float):
    """Minimises the deep objective for a batch of grid points of one world.

        H_deep(P) = lam * E_P[Harm] + KL(P || P_base)
                    + sum_u penalty(u) * (1 - P(R | u)),

    with penalty(u) = mu * gamma**t(u) * q(u); a zero penalty gives the
    standard objective. Each point starts at P_base, runs `adam_steps` of
    Adam and then up to `lbfgs_steps` of L-BFGS, with exact gradients from
    the enumeration of all V**T responses.

    Args:
      problems: the deep-problem tuple of hi_jax.equilibrium. Its lam
        float [B] and penalty float [B, S] have one row per grid point. Its
        base_log_probs float [S, V], harm_values float [V**T] and
        recovery_mask bool [V] are shared by all points. S = (V**T - 1) /
        (V - 1) is the number of prefix nodes.
      vocab_size, response_length: V and T.
      adam_steps: Adam warm-up iterations, >= 0.
      learning_rate: Adam learning rate, > 0.
      lbfgs_steps: maximum L-BFGS iterations, >= 1.
      tolerance: L-BFGS stops once max |gradient| <= tolerance.

    Returns:
      (table float [B, S, V] of optimised logits, objective float [B],
      gradient_max float [B] = max |dH_deep / d logit|, steps int [B] of
      L-BFGS iterations run).
    """
    in_axes = problems._replace(base_log_probs=None, harm_values=None, lam=0, penalty=0,
                                recovery_mask=None)

    def solve_one(problem):
        value_fn = functools.partial(equilibrium._deep_objective_value, problem=problem,
                                     vocab_size=vocab_size,
                                     response_length=response_length)
        table = problem.base_log_probs
        if adam_steps > 0:
            table = equilibrium._run_adam(value_fn, table, adam_steps, learning_rate)
        table, steps = equilibrium._run_lbfgs(value_fn, table, lbfgs_steps, tolerance)
        objective, gradient = jax.value_and_grad(value_fn)(table)
        return table, objective, jnp.max(jnp.abs(gradient)), steps

    return jax.vmap(solve_one, in_axes=(in_axes,))(problems)


class Solution(NamedTuple):
    """The optimiser's output for one grid point.

    Attributes:
      table: float [S, V], the optimised logits.
      objective: the objective at `table`.
      gradient_max: max |dH / d logit| at `table`.
      lbfgs_steps: L-BFGS iterations run.
      seconds: wall time of the program that solved the point.
      batch_size: grid points in that program, padding included.
    """
    table: np.ndarray
    objective: float
    gradient_max: float
    lbfgs_steps: int
    seconds: float
    batch_size: int


def _build_problem(world: World, point: GridPoint):
    return equilibrium._build_deep_problem(
        world.base, world.base, world.harm, point.lam, point.mu, point.gamma,
        world.prefix_dist, world.recovery_tokens)


def _solve_program(problems: list, config, objective: str,
                   batch_size: int) -> list[Solution]:
    """Solves the problems as one vmapped program, padded to `batch_size` points.

    Padding with copies of the last problem keeps the shapes, and so the
    compiled program, the same for every chunk.
    """
    count = len(problems)
    padded = problems + [problems[-1]] * (batch_size - count)
    batched = padded[0]._replace(lam=jnp.stack([p.lam for p in padded]),
                                 penalty=jnp.stack([p.penalty for p in padded]))
    section = config[objective]
    start = time.time()
    tables, objectives, gradient_max, steps = solve_batch(
        batched, config.vocab_size, config.response_length,
        adam_steps=section.adam_steps if objective == "deep" else 0,
        # The learning rate is unused without Adam steps.
        learning_rate=float(section.learning_rate) if objective == "deep" else 1.0,
        lbfgs_steps=section.lbfgs_steps, tolerance=float(section.tolerance))
    tables = np.asarray(tables)
    seconds = time.time() - start
    return [Solution(tables[i], float(objectives[i]), float(gradient_max[i]),
                     int(steps[i]), seconds, batch_size) for i in range(count)]


def solve_points(world: World, points: list[GridPoint], config,
                 batch_size: int) -> dict[str, Solution | Exception]:
    """Solves grid points of one world and objective, returning id -> Solution or error.

    The points run as one vmapped program. If that program fails, each point
    runs alone, so that one bad point does not take the others down.
    """
    outcomes: dict[str, Solution | Exception] = {}
    problems = {}
    for point in points:
        try:
            problems[point.id] = _build_problem(world, point)
        except Exception as error:  # Recorded for this point only, so the others go on.
            outcomes[point.id] = error
    valid = [point for point in points if point.id in problems]
    if not valid:
        return outcomes
    objective = valid[0].objective
    try:
        solutions = _solve_program([problems[p.id] for p in valid], config, objective,
                                   batch_size)
        outcomes.update({point.id: solution for point, solution in zip(valid, solutions)})
        return outcomes
    except Exception as error:
        if len(valid) == 1:
            outcomes[valid[0].id] = error
            return outcomes
        logging.exception("vmapped program for %d %s points of world %d failed; "
                          "running them one at a time", len(valid), objective, world.index)
    for point in valid:
        try:
            single = _solve_program([problems[point.id]], config, objective, 1)
            outcomes[point.id] = single[0]
        except Exception as error:  # Recorded for this point only, so the others go on.
            outcomes[point.id] = error
    return outcomes


# Measurements ---------------------------------------------------------------------


def _json_list(values) -> list:
    """Converts an array to a list of floats, with None where it is not finite."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, np.float64)]


def _check_solution(point: GridPoint, solution: Solution) -> None:
    if not (np.isfinite(solution.objective) and np.isfinite(solution.table).all()):
        raise FloatingPointError(
            f"point {point.id}: the optimiser returned a non-finite objective "
            f"({solution.objective}) or non-finite logits; lower the learning rate or "
            "the grid values")


def _solve_record(solution: Solution) -> dict:
    return {"objective": solution.objective, "gradient_max": solution.gradient_max,
            "lbfgs_steps": solution.lbfgs_steps, "program_seconds": solution.seconds,
            "program_batch_size": solution.batch_size}


def measure_standard_point(world: World, point: GridPoint, solution: Solution) -> dict:
    """Measures a standard-objective optimum and its gap to the closed form.

    Returns a JSON-ready dict with, per position t (lists of length T):
    `kl`, D_KL^(t) of the optimised policy; `kl_exact`, the same at the
    closed-form optimum `exact_equilibrium`; `info`, I_t under P_base;
    `kl_predicted` = (lam**2 / 2) * I_t; `kl_ratio` = kl / kl_predicted at
    t < k (None beyond the horizon, where both are 0). `convergence` has
    the objective gap H(P) - H(P*), the max |log P(y) - log P*(y)| over all
    responses and the max relative KL gap at t < k.
    """
    _check_solution(point, solution)
    base, harm = world.base, world.harm
    V, T, k = base.vocab_size, base.response_length, harm.horizon
    policy = TabularPolicy(jnp.asarray(solution.table), V, T)
    kl = np.asarray(equilibrium.exact_kl_profile(policy, base))
    optimum = equilibrium.exact_equilibrium(base, harm, point.lam)
    kl_exact = np.asarray(equilibrium.exact_kl_profile(optimum, base))
    objective_exact = float(equilibrium.deep_objective(
        optimum, base, harm, point.lam, 0.0, 1.0, world.prefix_dist,
        world.recovery_tokens))
    responses = enumerate_responses(V, T)
    log_prob_gap = float(jnp.max(jnp.abs(policy.sequence_log_prob(responses)
                                         - optimum.sequence_log_prob(responses))))
    predicted = np.asarray(theory.predicted_kl_decoupled(point.lam, world.info))
    inside = np.arange(T) < k
    ratio = np.where(inside, kl / np.where(inside, predicted, 1.0), np.nan)
    relative_gap = np.abs(kl - kl_exact)[inside] / kl_exact[inside]
    if not np.isfinite(kl).all():
        raise FloatingPointError(f"point {point.id}: D_KL is not finite: {kl}")
    return {
        "kl": _json_list(kl),
        "kl_exact": _json_list(kl_exact),
        "info": _json_list(world.info),
        "kl_predicted": _json_list(predicted),
        "kl_ratio": _json_list(ratio),
        "convergence": {
            "objective_gap": solution.objective - objective_exact,
            "max_log_prob_gap": log_prob_gap,
            "max_relative_kl_gap": float(relative_gap.max()),
        },
    }


def measure_deep_point(world: World, point: GridPoint, solution: Solution) -> dict:
    """Measures recovery beyond the horizon at a deep-objective optimum.

    Returns a JSON-ready dict with `kl` (D_KL^(t), length T) and `recovery`,
    one list entry per prefix node u at depth t >= k (see
    `hi_jax.equilibrium.recovery_report`): position t, recovery P(R | u),
    base recovery p0, the effective penalty beta = mu * gamma**t * q(u) / P(u)
    (None where P(u) underflows to 0 and beta is infinite), the nominal
    penalty mu * gamma**t, the per-prefix Gibbs form sigmoid(logit(p0) +
    beta) and the stationary recovery that includes the future-KL term.
    `gaps` has the max |recovery - stationary| (convergence) and the max
    |recovery - Gibbs| at the last position and at earlier ones.
    """
    _check_solution(point, solution)
    base = world.base
    V, T, k = base.vocab_size, base.response_length, world.harm.horizon
    policy = TabularPolicy(jnp.asarray(solution.table), V, T)
    kl = np.asarray(equilibrium.exact_kl_profile(policy, base))
    report = jax.tree.map(np.asarray, equilibrium.recovery_report(
        policy, base, point.mu, point.gamma, world.prefix_dist, world.recovery_tokens, k))
    nominal = point.mu * point.gamma ** report.position.astype(np.float64)
    gibbs_gap = np.abs(report.recovery - report.gibbs)
    last = report.position == T - 1
    return {
        "kl": _json_list(kl),
        "recovery": {
            "node": report.node.tolist(),
            "position": report.position.tolist(),
            "recovery": _json_list(report.recovery),
            "base_recovery": _json_list(report.base_recovery),
            "beta": _json_list(report.beta),
            "nominal_beta": _json_list(nominal),
            "gibbs": _json_list(report.gibbs),
            "stationary": _json_list(report.stationary),
        },
        "gaps": {
            "max_stationary_gap": _max_or_none(np.abs(report.recovery - report.stationary)),
            "max_gibbs_gap_last_position": _max_or_none(gibbs_gap[last]),
            "max_gibbs_gap_earlier_positions": _max_or_none(gibbs_gap[~last]),
            "num_infinite_beta": int((~np.isfinite(report.beta)).sum()),
        },
    }


def _max_or_none(values: np.ndarray) -> float | None:
    return float(values.max()) if values.size else None


# Point files ------------------------------------------------------------------------


def _point_path(workdir: str, point: GridPoint, error: bool = False) -> str:
    suffix = ".error.json" if error else ".json"
    return os.path.join(workdir, POINTS_DIR, point.id + suffix)


def _point_header(point: GridPoint, settings: dict) -> dict:
    return {"id": point.id, "objective": point.objective, "world": point.world,
            "lam": point.lam, "mu": point.mu, "gamma": point.gamma, "settings": settings}


def load_finished_point(workdir: str, point: GridPoint, settings: dict) -> dict | None:
    """Returns the stored result of a finished point, or None if there is none.

    Raises:
      ValueError: if the stored point was computed with other settings.
    """
    path = _point_path(workdir, point)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        logging.warning("point file %s is unreadable (%s); recomputing the point",
                        path, error)
        return None
    stored = record.get("settings", {})
    if stored != settings:
        differing = sorted(name for name in settings.keys() | stored.keys()
                           if stored.get(name) != settings.get(name))
        raise ValueError(
            f"{path} was computed with other settings ({', '.join(differing)} differ); "
            "pass --overwrite to recompute it or choose another --workdir")
    return record


def _record_failure(workdir: str, point: GridPoint, settings: dict,
                    error: BaseException) -> dict:
    message = f"{type(error).__name__}: {error}"
    logging.error("grid point %s failed: %s", point.id, message)
    record = _point_header(point, settings)
    record["error"] = message
    record["traceback"] = "".join(traceback.format_exception(error))
    common.write_json(_point_path(workdir, point, error=True), record)
    return record


def _record_success(workdir: str, point: GridPoint, settings: dict, world: World,
                    solution: Solution) -> dict:
    measure = (measure_standard_point if point.objective == "standard"
               else measure_deep_point)
    record = _point_header(point, settings)
    record["solve"] = _solve_record(solution)
    record.update(measure(world, point, solution))
    common.write_json(_point_path(workdir, point), record)
    error_path = _point_path(workdir, point, error=True)
    if os.path.exists(error_path):
        os.remove(error_path)
    return record


# The sweep --------------------------------------------------------------------------


def run_sweep(config: ml_collections.ConfigDict, workdir: str,
              overwrite: bool = False) -> dict:
    """Runs every pending grid point, fits the scaling law, and writes the run directory.

    Returns the dict written to sweep.json; its "counts" entry gives the
    grid points computed in this call, reused from earlier runs and failed.
    """
    validate_config(config)
    os.makedirs(os.path.join(workdir, POINTS_DIR), exist_ok=True)
    common.lock_workdir(workdir)
    with jax.enable_x64(True):
        return _run_sweep(config, workdir, overwrite)


def _run_sweep(config, workdir: str, overwrite: bool) -> dict:
    start = time.time()
    key_worlds, key_fit = jax.random.split(jax.random.key(config.seed))
    points = grid_points(config)
    settings = {objective: point_settings(config, objective) for objective in OBJECTIVES}

    records: dict[str, dict] = {}
    if not overwrite:
        for point in points:
            record = load_finished_point(workdir, point, settings[point.objective])
            if record is not None:
                records[point.id] = record
    pending = [point for point in points if point.id not in records]
    counts = {"grid_points": len(points), "computed": 0, "reused": len(records),
              "failed": 0}
    logging.info("%d grid points: %d finished earlier, %d to compute", len(points),
                 len(records), len(pending))

    failures: dict[str, dict] = {}
    worlds = sorted({point.world for point in pending})
    for done, world_index in enumerate(worlds):
        world_points = [point for point in pending if point.world == world_index]
        _run_world(config, workdir, key_worlds, world_index, world_points, settings,
                   records, failures, counts)
        elapsed = time.time() - start
        remaining = elapsed / (done + 1) * (len(worlds) - done - 1)
        logging.info("world %d done (%d/%d): %d computed, %d failed so far; %.1f s "
                     "elapsed, about %.0f s left", world_index, done + 1, len(worlds),
                     counts["computed"], counts["failed"], elapsed, remaining)

    ordered = [records[point.id] for point in points if point.id in records]
    summary = summarize(config, ordered, key_fit)
    summary["counts"] = counts
    summary["errors"] = [{"id": point_id, "error": record["error"]}
                         for point_id, record in failures.items()]
    summary["seconds"] = time.time() - start
    common.write_json(os.path.join(workdir, "sweep.json"), summary)
    write_plots(config, summary, workdir)
    logging.info("sweep finished in %.1f s: %s", summary["seconds"], counts)
    return summary


def _run_world(config, workdir, key_worlds, world_index, world_points, settings,
               records, failures, counts) -> None:
    """Solves and measures the pending points of one world, recording each outcome."""
    try:
        world = build_world(config, key_worlds, world_index)
    except Exception as error:  # Every point of this world fails, but other worlds go on.
        for point in world_points:
            failures[point.id] = _record_failure(workdir, point,
                                                 settings[point.objective], error)
            counts["failed"] += 1
        return

    for objective in OBJECTIVES:
        group = [point for point in world_points if point.objective == objective]
        per_world = (len(config.standard.lams) if objective == "standard" else
                     len(config.deep.lams) * len(config.deep.mus) * len(config.deep.gammas))
        batch_size = min(config.max_batch_size, per_world)
        for first in range(0, len(group), batch_size):
            chunk = group[first:first + batch_size]
            started = time.time()
            outcomes = solve_points(world, chunk, config, batch_size)
            logging.info("world %d: %d %s points solved in %.2f s", world_index,
                         len(chunk), objective, time.time() - started)
            for point in chunk:
                outcome = outcomes[point.id]
                if not isinstance(outcome, Exception):
                    try:
                        records[point.id] = _record_success(
                            workdir, point, settings[objective], world, outcome)
                        counts["computed"] += 1
                        continue
                    except Exception as error:  # Recorded for this point only.
                        outcome = error
                failures[point.id] = _record_failure(workdir, point, settings[objective],
                                                     outcome)
                counts["failed"] += 1


# Summary and fit ----------------------------------------------------------------------


def _fit_observations(config, standard: list[dict]) -> tuple[np.ndarray, ...]:
    """Collects (lam, I_t, D_KL^(t)) at positions t < k and lam <= fit.max_lam."""
    lam, info, kl = [], [], []
    for record in standard:
        if record["lam"] > config.fit.max_lam:
            continue
        for t in range(config.horizon):
            lam.append(record["lam"])
            info.append(record["info"][t])
            kl.append(record["kl"][t])
    return np.asarray(lam), np.asarray(info), np.asarray(kl)


def summarize(config, records: list[dict], key_fit: jax.Array) -> dict:
    """Builds the sweep.json content from the finished point records."""
    standard = [record for record in records if record["objective"] == "standard"]
    deep = [record for record in records if record["objective"] == "deep"]
    summary = {"config": config.to_dict(), "standard": standard, "deep": deep}

    if standard:
        convergence = [record["convergence"] for record in standard]
        summary["standard_convergence"] = {
            name: max(abs(c[name]) for c in convergence)
            for name in ("objective_gap", "max_log_prob_gap", "max_relative_kl_gap")}
        beyond = [abs(v) for record in standard for v in record["kl"][config.horizon:]]
        summary["standard_convergence"]["max_abs_kl_beyond_horizon"] = max(beyond,
                                                                          default=0.0)
        summary["kl_ratio_by_lam"] = _ratio_by_lam(config, standard)
    if deep:
        gaps = [record["gaps"] for record in deep]
        summary["deep_recovery"] = {
            name: max((g[name] for g in gaps if g[name] is not None), default=None)
            for name in ("max_stationary_gap", "max_gibbs_gap_last_position",
                         "max_gibbs_gap_earlier_positions")}
        summary["deep_recovery"]["num_infinite_beta"] = sum(
            g["num_infinite_beta"] for g in gaps)

    excluded = (f"positions t >= k = {config.horizon} are excluded because D_KL^(t) "
                f"and I_t are 0 there, and points with lam > {config.fit.max_lam:g} "
                "are excluded because the prediction has a relative error of order lam")
    lam, info, kl = _fit_observations(config, standard)
    fit = {"model": "log D_KL^(t) = a log(lam) + b log(I_t) + c + Normal(0, sigma)",
           "prediction": {"a": 2.0, "b": 1.0, "c": math.log(0.5)},
           "max_lam": config.fit.max_lam, "excluded": excluded}
    try:
        started = time.time()
        result = scaling_fit.fit_kl_scaling(
            key_fit, lam, info, kl, num_warmup=config.fit.num_warmup,
            num_samples=config.fit.num_samples, num_chains=config.fit.num_chains,
            interval=config.fit.interval)
        fit.update(result.to_dict())
        fit["seconds"] = time.time() - started
        logging.info("scaling fit on %d observations: a = %.4f [%.4f, %.4f], "
                     "b = %.4f [%.4f, %.4f]", result.num_observations,
                     result.summary["a"].mean, result.summary["a"].lower,
                     result.summary["a"].upper, result.summary["b"].mean,
                     result.summary["b"].lower, result.summary["b"].upper)
        fit["samples"] = {name: result.samples[name].tolist() for name in ("a", "b", "c")}
    except ValueError as error:
        logging.warning("scaling fit skipped: %s", error)
        fit["skipped"] = str(error)
    summary["scaling_fit"] = fit
    return summary


def _ratio_by_lam(config, standard: list[dict]) -> list[dict]:
    """Returns the range of D_KL^(t) / ((lam**2 / 2) I_t) at t < k for each lam."""
    rows = []
    for lam in sorted({record["lam"] for record in standard}):
        ratios = [r for record in standard if record["lam"] == lam
                  for r in record["kl_ratio"][:config.horizon] if r is not None]
        if ratios:
            rows.append({"lam": lam, "min": min(ratios), "max": max(ratios)})
    return rows


# Plots ----------------------------------------------------------------------------------


def write_plots(config, summary: dict, workdir: str) -> None:
    """Writes kl_scaling.png, exponents.png and recovery.png."""
    import matplotlib
    matplotlib.use("Agg")

    plot_kl_scaling(config, summary, os.path.join(workdir, "kl_scaling.png"))
    plot_exponents(config, summary, os.path.join(workdir, "exponents.png"))
    plot_recovery(config, summary, os.path.join(workdir, "recovery.png"))


def _caption(figure, text: str) -> None:
    figure.text(0.01, 0.01, text, fontsize=7.5, va="bottom", ha="left", wrap=True)


def plot_kl_scaling(config, summary: dict, path: str) -> None:
    """Plots D_KL^(t) against lam**2 I_t, log-log, with the line D = I lam**2 / 2."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    k = config.horizon
    standard = summary["standard"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5.4))
    figure.subplots_adjust(bottom=0.22, wspace=0.28)
    markers = "os^vD<>p*h"
    if standard:
        lams = np.array([record["lam"] for record in standard])
        norm = LogNorm(vmin=lams.min(), vmax=max(lams.max(), lams.min() * 1.0001))
        x_all = []
        for t in range(k):
            lam = np.array([record["lam"] for record in standard])
            x = lam**2 * np.array([record["info"][t] for record in standard])
            kl = np.array([record["kl"][t] for record in standard])
            ratio = np.array([record["kl_ratio"][t] for record in standard], dtype=float)
            keep = (x > 0) & (kl > 0)
            scatter = left.scatter(x[keep], kl[keep], c=lam[keep], norm=norm,
                                   cmap="viridis", marker=markers[t % len(markers)],
                                   s=22, label=f"position t = {t}")
            right.scatter(lam[keep], ratio[keep], c=lam[keep], norm=norm, cmap="viridis",
                          marker=markers[t % len(markers)], s=22,
                          label=f"position t = {t}")
            x_all.append(x[keep])
        x_all = np.concatenate(x_all)
        if x_all.size:
            line = np.geomspace(x_all.min(), x_all.max(), 50)
            left.plot(line, 0.5 * line, "k--", lw=1,
                      label=r"$D = \frac{1}{2}\lambda^2 I_t$ (slope 1, factor 1/2)")
        figure.colorbar(scatter, ax=right, label=r"$\lambda$")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel(r"$\lambda^2 I_t$  ($I_t$ under $P_{base}$)")
    left.set_ylabel(r"$D_{KL}^{(t)}$ at the trained optimum (nats)")
    left.set_title("Per-position KL at the standard optimum")
    left.legend(fontsize=8)
    right.axhline(1.0, color="k", ls="--", lw=1)
    right.axvline(config.fit.max_lam, color="gray", ls=":", lw=1,
                  label=rf"fit uses $\lambda \leq$ {config.fit.max_lam:g}")
    right.set_xscale("log")
    right.set_xlabel(r"$\lambda$")
    right.set_ylabel(r"$D_{KL}^{(t)} \,/\, (\frac{1}{2}\lambda^2 I_t)$")
    right.set_title(r"Ratio to the prediction: $1 + O(\lambda)$")
    right.legend(fontsize=8)
    _caption(figure, (
        f"{config.num_worlds} random tabular worlds (V = {config.vocab_size}, "
        f"T = {config.response_length}, harm horizon k = {k}); each point is one "
        "(world, lambda, position) after L-BFGS on the standard objective. Positions "
        f"t >= k = {k} are not shown: there D_KL and I_t are 0 (the trained policy equals "
        "P_base beyond the horizon). The dashed line is the small-lambda prediction "
        "D = lambda^2 I_t / 2."))
    common.save_figure(figure, path, dpi=120)
    plt.close(figure)


def plot_exponents(config, summary: dict, path: str) -> None:
    """Plots the posterior of a, b and c with the intervals and the predicted values."""
    import matplotlib.pyplot as plt

    fit = summary["scaling_fit"]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    figure.subplots_adjust(bottom=0.25, top=0.82, wspace=0.3)
    labels = {"a": r"$a$ (exponent of $\lambda$)", "b": r"$b$ (exponent of $I_t$)",
              "c": r"$c$ (log of the constant)"}
    if "skipped" in fit:
        for ax in axes:
            ax.text(0.5, 0.5, "fit skipped:\n" + fit["skipped"], ha="center",
                    va="center", wrap=True, fontsize=8, transform=ax.transAxes)
        figure.suptitle("Fitted exponents: no fit")
    else:
        percent = round(100 * fit["interval"])
        for ax, name in zip(axes, ("a", "b", "c")):
            draws = np.asarray(fit["samples"][name])
            stats = fit[name]
            ax.hist(draws, bins=50, color="tab:blue", alpha=0.7, density=True)
            ax.axvspan(stats["lower"], stats["upper"], color="tab:blue", alpha=0.15,
                       label=f"{percent}% interval")
            ax.axvline(stats["mean"], color="tab:blue", lw=1.5,
                       label=f"mean {stats['mean']:.4f}")
            predicted = fit["prediction"][name]
            ax.axvline(predicted, color="k", ls="--", lw=1.5,
                       label=f"prediction {predicted:.4f}")
            ax.set_xlabel(labels[name])
            ax.set_title(f"{name} = {stats['mean']:.4f}  [{stats['lower']:.4f}, "
                         f"{stats['upper']:.4f}]", fontsize=10)
            ax.legend(fontsize=8)
        figure.suptitle(
            r"Posterior of $\log D_{KL}^{(t)} = a \log\lambda + b \log I_t + c$ + noise "
            f"(NUTS, {fit['num_observations']} observations, "
            rf"$\lambda \leq$ {fit['max_lam']:g}, $t < k$)")
    _caption(figure, (
        f"Predicted: a = 2, b = 1, c = log(1/2) = {math.log(0.5):.4f}. Excluded: "
        f"{fit['excluded']}. The measurements are exact up to optimiser error, so the "
        "noise term absorbs the deterministic O(lambda) correction, and intervals this "
        "narrow can miss the predicted value by that correction."))
    common.save_figure(figure, path, dpi=120)
    plt.close(figure)


# Largest effective penalty on the recovery plot's log axis. Beyond it the
# Gibbs recovery sigmoid(logit(p0) + beta) is 1 to within 1e-12 for p0 >= 1e-6.
_MAX_PLOTTED_BETA = 50.0


def plot_recovery(config, summary: dict, path: str) -> None:
    """Plots recovery beyond the horizon against the effective and nominal penalties."""
    import matplotlib.pyplot as plt

    T, k, p0 = config.response_length, config.horizon, config.base_recovery
    columns = {name: [] for name in ("position", "recovery", "beta", "nominal_beta",
                                     "stationary")}
    for record in summary["deep"]:
        for name in columns:
            columns[name].extend(record["recovery"][name])
    position = np.asarray(columns["position"], dtype=int)
    recovery = np.asarray(columns["recovery"], dtype=float)
    stationary = np.asarray(columns["stationary"], dtype=float)
    nominal = np.asarray(columns["nominal_beta"], dtype=float)
    beta = np.array([np.inf if b is None else b for b in columns["beta"]], dtype=float)
    finite = (beta > 0) & (beta <= _MAX_PLOTTED_BETA)

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5.4), sharey=True)
    figure.subplots_adjust(bottom=0.27, top=0.86, wspace=0.08)
    colors = plt.get_cmap("plasma")(np.linspace(0.0, 0.8, max(T - k, 1)))
    # Later positions first, so that the earlier ones, which can leave the
    # Gibbs curve, are drawn on top.
    for t in reversed(range(k, T)):
        at = position == t
        color = colors[t - k]
        left.scatter(beta[at & finite], recovery[at & finite], s=16, color=color,
                     label=f"position t = {t}")
        left.scatter(beta[at & finite], stationary[at & finite], s=60, facecolors="none",
                     edgecolors=color, lw=0.8)
        right.scatter(nominal[at], recovery[at], s=16, color=color,
                      label=f"position t = {t}")
    for ax, x in ((left, beta[finite]), (right, nominal)):
        if x.size:
            grid = np.geomspace(x.min(), x.max(), 200)
            curve, _ = theory.gibbs_recovery(p0, grid)
            ax.plot(grid, np.asarray(curve), "k--", lw=1.2,
                    label=rf"Gibbs $\sigma(\mathrm{{logit}}\,p_0 + \beta)$, $p_0$ = {p0:g}")
        else:
            ax.text(0.5, 0.5, "no deep grid points beyond the horizon", ha="center",
                    transform=ax.transAxes)
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    left.set_xlabel(r"effective penalty $\beta = \mu\gamma^t\, q(u)/P(u)$")
    right.set_xlabel(r"nominal penalty $\mu\gamma^t$")
    left.set_ylabel(r"recovery $P(R \mid u)$ at the deep optimum")
    left.set_title("Against the effective penalty (open circles: stationary solution)")
    right.set_title("Against the nominal penalty")
    figure.suptitle(r"Recovery beyond the horizon ($t \geq k$) against $\mu\gamma^t$, "
                    "corrected by the importance weight q/P")
    hidden = int((~finite).sum())
    avoided = int(np.isinf(beta).sum())
    _caption(figure, (
        f"Each point is one prefix u of depth t >= k = {k}, over all worlds and deep grid "
        "points (lambda, mu, gamma). Left: the x axis is the effective penalty that "
        "recovery_report gives, beta = mu gamma^t q(u)/P(u): Q weights the penalty but P "
        "weights the KL, so per unit of KL the penalty carries the importance weight "
        "q(u)/P(u). The dashed curve is the per-prefix Gibbs solution sigmoid(logit p0 + "
        f"beta). Points at the last position t = {T - 1} lie on it. At earlier positions "
        "the optimum also pays the future KL below u (the term sum_v p_v K(uv)), which "
        "the Gibbs form leaves out, so they can leave the curve; the open circles are the "
        "stationary solution that includes that term. "
        f"{hidden} prefixes with beta > {_MAX_PLOTTED_BETA:g} are not shown on the left, "
        f"{avoided} of them avoided by the optimum (P(u) = 0 in float64, so beta is "
        "infinite); the Gibbs form gives them recovery 1 to within 1e-12. Right: the same "
        "recovery against the nominal mu gamma^t, where the Gibbs curve does not apply."))
    common.save_figure(figure, path, dpi=120)
    plt.close(figure)


def main(argv, config, workdir: str | None, overwrite: bool):
    """Runs the command; the flags are defined and parsed by experiments.cli."""
    del argv
    workdir = workdir or common.new_run_dir("sweep")
    common.log_start("sweep", config, workdir)
    run_sweep(config, workdir, overwrite=overwrite)
    print(workdir)
