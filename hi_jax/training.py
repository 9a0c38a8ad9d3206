"""Training loops: maximum-likelihood pretraining and alignment.

`pretrain` fits a policy to teacher samples by maximum likelihood with AdamW.
`align` minimises the standard objective (mu = 0) or the deep objective
(mu > 0) of `hi_jax.objectives` with on-policy samples drawn at every step,
and writes a run directory:

  workdir/run_config.json   the model description and the training settings
                            that fix the trajectory; a resumed run must match
  workdir/checkpoints/      Orbax checkpoints of params, optimizer state,
                            step and PRNG key
  workdir/metrics.jsonl     one JSON object per step (loss terms, KL and
                            recovery profiles, evaluation results)

A run restarted on the same workdir resumes from its last checkpoint. Every
random draw of update s uses keys derived from the run key and s alone
(`step_keys`), and `metrics.jsonl` is cut back to the restored step, so the
resumed run reproduces the params and metrics of an uninterrupted one.
NOTE: the tests check this bit for bit on CPU only. On GPU, XLA may sum
scatter-adds (the gradient of a gather) in a varying order, so the params can
differ in their last bits.

Dimension letters: B batch, T response positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from hi_jax import objectives, sampling, sharding
from hi_jax.estimators import check_prng_key
from hi_jax.harms import Harm, as_harm
from hi_jax.io import write_json, write_text
from hi_jax.policy import Policy, PyTree, check_tokens

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"
CHECKPOINT_DIR = "checkpoints"

# Scalar loss terms of `objectives.objective_loss`, checked for NaN and Inf.
LOSS_TERMS = ("harm", "kl", "recovery", "total")


# Configuration --------------------------------------------------------------------


def default_pretrain_config() -> ml_collections.ConfigDict:
    """Default settings of `pretrain`."""
    config = ml_collections.ConfigDict()
    config.steps = 2000  # Optimizer updates; integer >= 1.
    config.batch_size = 64  # B, teacher responses per update; integer >= 1.
    config.learning_rate = 3e-3  # AdamW step size; > 0.
    config.weight_decay = 0.0  # AdamW decoupled weight decay; >= 0.
    config.max_grad_norm = 1.0  # Global gradient-norm clip; > 0, or 0 for none.
    config.log_every = 100  # Updates between progress log lines; integer >= 1.
    config.eval_batch_size = 1024  # Responses for the final cross-entropy report; >= 1.
    config.seed = 0  # Seed of the root PRNG key when none is passed; integer >= 0.
    return config


def default_align_config() -> ml_collections.ConfigDict:
    """Default settings of `align`."""
    config = ml_collections.ConfigDict()
    config.steps = 1000  # Optimizer updates; integer >= 1.
    config.batch_size = 64  # B, on-policy responses per update; integer >= 2.
    config.learning_rate = 1e-3  # AdamW step size; > 0.
    config.weight_decay = 0.0  # AdamW decoupled weight decay; >= 0.
    config.max_grad_norm = 1.0  # Global gradient-norm clip; > 0, or 0 for none.
    config.lam = 1.0  # Harm weight lambda; >= 0.
    config.mu = 0.0  # Recovery weight mu; >= 0, and 0 is the standard objective.
    config.gamma = 1.0  # Recovery discount per position; in (0, 1].
    config.q_batch_size = 0  # Q prefixes per update from a fixed Q set; 0 uses all.
    config.checkpoint_every = 100  # Updates between checkpoints; integer >= 1.
    config.checkpoints_to_keep = 3  # Most recent checkpoints kept; integer >= 1.
    config.log_every = 50  # Updates between progress log lines; integer >= 1.
    config.eval_every = 100  # Updates between calls of eval_fn; integer >= 1.
    config.seed = 0  # Seed of the root PRNG key when none is passed; integer >= 0.
    return config


class _Field(NamedTuple):
    """Allowed values of a config field: an integer or a finite number in a range."""

    integer: bool
    low: float
    high: float = math.inf
    low_open: bool = False

    def allows(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.high < math.inf:
            opening = "(" if self.low_open else "["
            return f"{kind} in {opening}{self.low:g}, {self.high:g}]"
        return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"


_PRETRAIN_FIELDS = {
    "steps": _Field(True, 1),
    "batch_size": _Field(True, 1),
    "learning_rate": _Field(False, 0, low_open=True),
    "weight_decay": _Field(False, 0),
    "max_grad_norm": _Field(False, 0),
    "log_every": _Field(True, 1),
    "eval_batch_size": _Field(True, 1),
    "seed": _Field(True, 0),
}

_ALIGN_FIELDS = {
    "steps": _Field(True, 1),
    "batch_size": _Field(True, 2),
    "learning_rate": _Field(False, 0, low_open=True),
    "weight_decay": _Field(False, 0),
    "max_grad_norm": _Field(False, 0),
    "lam": _Field(False, 0),
    "mu": _Field(False, 0),
    "gamma": _Field(False, 0, 1, low_open=True),
    "q_batch_size": _Field(True, 0),
    "checkpoint_every": _Field(True, 1),
    "checkpoints_to_keep": _Field(True, 1),
    "log_every": _Field(True, 1),
    "eval_every": _Field(True, 1),
    "seed": _Field(True, 0),
}

# Align fields that may change when a run resumes: none of them changes the
# updates already made or the random draws of later ones.
_RESUMABLE_FIELDS = ("steps", "checkpoint_every", "checkpoints_to_keep", "log_every",
                     "eval_every", "seed")


def _validate(config, fields: Mapping[str, _Field], name: str
              ) -> ml_collections.FrozenConfigDict:
    if not hasattr(config, "items"):
        raise ValueError(f"{name} config must be a ConfigDict or a mapping; got "
                         f"{type(config).__name__}")
    values = dict(config.items())
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {name} config fields {unknown}; allowed fields are "
                         f"{sorted(fields)}")
    missing = sorted(set(fields) - set(values))
    if missing:
        raise ValueError(f"{name} config is missing the fields {missing}")
    for field, spec in fields.items():
        value = values[field]
        numeric = isinstance(value, (int, float, np.integer, np.floating))
        valid = numeric and not isinstance(value, bool)
        if spec.integer:
            valid = valid and isinstance(value, (int, np.integer))
        else:
            valid = valid and math.isfinite(value)
        if not valid or not spec.allows(value):
            raise ValueError(f"{name} config field {field} must be {spec.describe()}; "
                             f"got {value!r}")
        values[field] = int(value) if spec.integer else float(value)
    return ml_collections.FrozenConfigDict(values)


def validate_pretrain_config(config) -> ml_collections.FrozenConfigDict:
    """Checks every field of a `pretrain` config and returns a frozen copy.

    Raises:
      ValueError: naming the field, its value and the allowed range, for an
        unknown, missing or invalid field.
    """
    return _validate(config, _PRETRAIN_FIELDS, "pretrain")


def validate_align_config(config) -> ml_collections.FrozenConfigDict:
    """Checks every field of an `align` config and returns a frozen copy.

    Raises:
      ValueError: naming the field, its value and the allowed range, for an
        unknown, missing or invalid field.
    """
    return _validate(config, _ALIGN_FIELDS, "align")


def make_optimizer(settings) -> optax.GradientTransformation:
    """Builds AdamW with a constant learning rate.

    Gradients are first clipped to a global norm of max_grad_norm when it is
    positive.
    """
    adamw = optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay)
    if settings.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(settings.max_grad_norm), adamw)
    return adamw


# Shared helpers -------------------------------------------------------------------


def _root_key(key, seed: int) -> jax.Array:
    """Returns `key` as a typed PRNG key (it may be raw uint32 [2]), or key(seed)."""
    if key is None:
        return jax.random.key(seed)
    check_prng_key(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return key


def _check_policy(name: str, policy) -> None:
    if not isinstance(policy, Policy):
        raise TypeError(f"{name} must be a hi_jax Policy; got {type(policy).__name__}")


def _check_same_shape(policy: Policy, other: Policy, other_name: str) -> None:
    if (policy.vocab_size, policy.response_length) != (other.vocab_size,
                                                       other.response_length):
        raise ValueError(
            f"policy has V={policy.vocab_size}, T={policy.response_length} but "
            f"{other_name} has V={other.vocab_size}, T={other.response_length}; they "
            "must match")


# Pretraining ----------------------------------------------------------------------


@jax.jit
def per_position_cross_entropy(policy: Policy, teacher_policy: Policy,
                               tokens: jax.Array) -> jax.Array:
    """Computes the cross-entropy of the policy against the teacher's exact conditionals.

        CE_t = E_{y<t}[-sum_v P_teacher(v | y<t) log P_theta(v | y<t)]

    with the expectation over the prefixes of `tokens`. With
    policy = teacher_policy this is the teacher's entropy per position, the
    lowest value any policy can reach.

    Args:
      policy: the policy P_theta.
      teacher_policy: the teacher, with the same V and T.
      tokens: int [B, T] prefixes, usually teacher samples.

    Returns:
      float [T], in nats.
    """
    teacher_probs = jnp.exp(teacher_policy.log_probs(tokens))
    log_probs = policy.log_probs(tokens)
    terms = jnp.where(teacher_probs > 0, -teacher_probs * log_probs, 0.0)
    return terms.sum(axis=-1).mean(axis=0)


def pretrain_report(policy: Policy, teacher_policy: Policy,
                    tokens: jax.Array) -> dict[str, np.ndarray]:
    """Compares a policy with the teacher on the prefixes of `tokens`.

    Args:
      policy: the policy P_theta.
      teacher_policy: the teacher, with the same V and T.
      tokens: int [B, T] prefixes, usually teacher samples.

    Returns:
      dict of float [T] arrays: cross_entropy (`per_position_cross_entropy`
      of the policy), teacher_entropy (the same for the teacher itself) and
      excess, their difference, which is
      E_{y<t}[KL(P_teacher(. | y<t) || P_theta(. | y<t))] at each position.
    """
    cross_entropy = np.asarray(per_position_cross_entropy(policy, teacher_policy, tokens))
    entropy = np.asarray(per_position_cross_entropy(teacher_policy, teacher_policy,
                                                    tokens))
    return {"cross_entropy": cross_entropy, "teacher_entropy": entropy,
            "excess": cross_entropy - entropy}


class _Data:
    """Training tokens of `pretrain`: a fixed array read in epochs, or a sampler."""

    def __init__(self, data, policy: Policy, batch_size: int, key: jax.Array):
        self.key = key
        self.batch_size = batch_size
        self.response_length = policy.response_length
        self.vocab_size = policy.vocab_size
        self.sampler = data if callable(data) else None
        self.array = None
        self._epoch, self._order = -1, None
        if self.sampler is not None:
            return
        array = np.asarray(data)
        if array.ndim != 2 or array.shape[1] != policy.response_length:
            raise ValueError(f"pretraining data must have shape [N, T] with "
                             f"T={policy.response_length}; got {array.shape}")
        check_tokens("pretraining data", array, policy.vocab_size)
        if array.shape[0] < batch_size:
            raise ValueError(f"pretraining data has {array.shape[0]} responses, fewer "
                             f"than batch_size={batch_size}")
        self.array = jnp.asarray(array)

    def batch(self, step: int) -> jax.Array:
        """Returns the int [B, T] batch of update `step`, set by key and step alone."""
        if self.sampler is not None:
            tokens = self.sampler(jax.random.fold_in(self.key, step), self.batch_size)
            if step == 0:
                self._check_sampled(tokens)
            return tokens
        num = self.array.shape[0]
        per_epoch = num // self.batch_size
        epoch, index = divmod(step, per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = jax.random.permutation(jax.random.fold_in(self.key, epoch), num)
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.array[rows]

    def sample(self, key: jax.Array, num: int) -> jax.Array:
        """Returns int [min(num, N), T] responses for evaluation."""
        if self.sampler is not None:
            return self.sampler(key, num)
        rows = jax.random.permutation(key, self.array.shape[0])[:num]
        return self.array[rows]

    def _check_sampled(self, tokens) -> None:
        shape = np.shape(tokens)
        if shape != (self.batch_size, self.response_length):
            raise ValueError(
                f"the pretraining sampler must return shape [B, T] = "
                f"[{self.batch_size}, {self.response_length}]; got {shape}")
        check_tokens("sampled pretraining data", tokens, self.vocab_size)


def _pretrain_step(params, opt_state, tokens, *, policy: Policy,
                   optimizer: optax.GradientTransformation):
    def loss_fn(params):
        log_probs = policy.replace_params(params).log_probs(tokens)
        picked = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
        return -picked.mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def pretrain(key: jax.Array | None, policy: Policy, data, config,
             teacher_policy: Policy | None = None) -> Policy:
    """Fits a policy to teacher responses by maximum likelihood with AdamW.

    Each update minimises the mean token negative log-likelihood
    -(1 / (B T)) sum_{b, t} log P_theta(y_bt | y_b<t) over a minibatch. An
    array is read in epochs, each a fresh permutation drawn from the key and
    the epoch index, and a sampler is called with a key derived from the
    step. With `teacher_policy`, the per-position cross-entropy against the
    teacher's exact conditionals and the teacher's entropy are logged at the
    end (see `pretrain_report`), on eval_batch_size responses: fresh samples
    from a sampler, or a random subset of the array.

    Args:
      key: the root PRNG key, or None for jax.random.key(config.seed).
      policy: the initial policy.
      data: int [N, T] teacher responses with N >= batch_size, or a callable
        (key, num) -> int [num, T] that samples them.
      config: a ConfigDict with the fields of `default_pretrain_config`.
      teacher_policy: the teacher with exact conditionals, for the report.

    Returns:
      The fitted policy.

    Raises:
      ValueError: on an invalid config (before any work) or data.
      FloatingPointError: if the loss becomes NaN or Inf; the message names
        the step.
    """
    settings = validate_pretrain_config(config)
    _check_policy("policy", policy)
    if teacher_policy is not None:
        _check_policy("teacher_policy", teacher_policy)
        _check_same_shape(policy, teacher_policy, "teacher_policy")
    data_key, eval_key = jax.random.split(_root_key(key, settings.seed))
    source = _Data(data, policy, settings.batch_size, data_key)
    optimizer = make_optimizer(settings)
    step_fn = jax.jit(functools.partial(_pretrain_step, policy=policy,
                                        optimizer=optimizer))
    params = policy.params
    opt_state = optimizer.init(params)

    logging.info("Pretraining %s for %d steps with batch size %d", type(policy).__name__,
                 settings.steps, settings.batch_size)
    progress = _Progress("pretraining", 0, settings.steps)
    for step in range(settings.steps):
        done = step + 1
        params, opt_state, loss = step_fn(params, opt_state, source.batch(step))
        loss = float(loss)
        progress.step_done(done)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"pretraining loss is {loss} at step {done}; lower the learning rate "
                "or check the data")
        if done % settings.log_every == 0 or done == settings.steps:
            logging.info("pretrain step %d/%d: loss %.4f, %s", done, settings.steps, loss,
                         progress.rate_message(done))

    policy = policy.replace_params(params)
    if teacher_policy is not None:
        report = pretrain_report(policy, teacher_policy,
                                 source.sample(eval_key, settings.eval_batch_size))
        logging.info("Cross-entropy per position against the teacher (nats): %s",
                     np.array2string(report["cross_entropy"], precision=4))
        logging.info("Teacher entropy per position (nats): %s",
                     np.array2string(report["teacher_entropy"], precision=4))
        logging.info("Excess cross-entropy summed over positions: %.4f nats",
                     float(report["excess"].sum()))
    return policy


# Alignment step -------------------------------------------------------------------


class AlignState(NamedTuple):
    """State of the alignment loop.

    Attributes:
      step: int32 scalar, the number of updates applied.
      params: the policy's parameter pytree.
      opt_state: the optax optimizer state.
      key: the run's typed PRNG key; update s draws from `step_keys(key, s)`.
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    key: jax.Array


def step_keys(run_key: jax.Array, step) -> dict[str, jax.Array]:
    """Derives the keys of update `step` (0-based) from the run key, one per purpose.

    Returns:
      dict with "sample" (on-policy responses) and "q" (the Q prefixes of
      the update).
    """
    sample_key, q_key = jax.random.split(jax.random.fold_in(run_key, step))
    return {"sample": sample_key, "q": q_key}


def _align_step(state: AlignState, base_policy: Policy, q_tokens, q_prefix_mask, *,
                policy: Policy, harm: Harm, optimizer: optax.GradientTransformation,
                batch_size: int, lam: float, mu: float, gamma: float,
                recovery_ids: tuple[int, ...] | None, q_batch_size: int,
                batch_sharding=None):
    keys = step_keys(state.key, state.step)
    current = policy.replace_params(state.params)
    tokens = sampling.sample_responses(keys["sample"], current, batch_size)
    if batch_sharding is not None:
        tokens = jax.lax.with_sharding_constraint(tokens, batch_sharding)
    harm_values = harm(tokens)
    if harm_values.shape != (batch_size,):
        raise ValueError(f"harm {harm.name!r} must return shape [B]=({batch_size},) for "
                         f"a batch of responses; got shape {harm_values.shape}")
    if q_tokens is not None and q_batch_size:
        rows = jax.random.permutation(keys["q"], q_tokens.shape[0])[:q_batch_size]
        q_tokens, q_prefix_mask = q_tokens[rows], q_prefix_mask[rows]

    def loss_fn(params):
        return objectives.objective_loss(
            policy.replace_params(params), base_policy, tokens, harm_values, lam, mu,
            gamma, q_tokens, q_prefix_mask, recovery_ids)

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(terms, grad_norm=optax.global_norm(grads),
                   harm_min=harm_values.min(), harm_max=harm_values.max())
    return AlignState(state.step + 1, params, opt_state, state.key), metrics


def make_align_step(policy: Policy, harm, optimizer: optax.GradientTransformation, *,
                    batch_size: int, lam: float, mu: float = 0.0, gamma: float = 1.0,
                    recovery_ids: Sequence[int] | None = None,
                    q_batch_size: int = 0, mesh=None) -> Callable:
    """Builds the jitted alignment update, with the static settings bound.

    The update samples B responses from the current policy with
    `step_keys(state.key, state.step)`, evaluates the harm, takes the
    gradient of `objectives.objective_loss` and applies the optimizer. It is
    a pure function of its arguments, so a second call with arrays of the
    same shapes reuses the compiled program.

    Args:
      policy: a policy whose structure (class and static data) the update
        keeps; its parameters are not read.
      harm: a harm from int [B, T] to float [B], traceable by JAX.
      optimizer: the optax optimizer.
      batch_size: B >= 2.
      lam, mu, gamma: the objective weights (see `objectives.objective_loss`).
      recovery_ids: the ids of R; required when Q prefixes are passed.
      q_batch_size: number of Q prefixes drawn (without replacement, with
        the step's "q" key) from those passed; 0 uses all of them.
      mesh: a one-axis `jax.sharding.Mesh` (see `sharding.batch_mesh`) over
        which the B on-policy responses and their loss terms are sharded;
        B must be divisible by its size. None runs on the default device.

    Returns:
      update(state: AlignState, base_policy, q_tokens int [Bq, T] or None,
      q_prefix_mask bool [Bq, T] or None) -> (AlignState, metrics), where
      metrics contains the terms of `objective_loss` plus grad_norm,
      harm_min and harm_max.
    """
    if recovery_ids is not None:
        recovery_ids = objectives.check_recovery_ids(recovery_ids, policy.vocab_size)
    batch_sharding = None
    if mesh is not None:
        batch_sharding = sharding.batch_sharding(mesh, int(batch_size))
    return jax.jit(functools.partial(
        _align_step, policy=policy, harm=as_harm(harm), optimizer=optimizer,
        batch_size=int(batch_size), lam=float(lam), mu=float(mu), gamma=float(gamma),
        recovery_ids=recovery_ids, q_batch_size=int(q_batch_size),
        batch_sharding=batch_sharding))


# Q prefixes -----------------------------------------------------------------------


class _QSource:
    """The Q prefixes of `align`: a fixed set, or a sampler called every update."""

    def __init__(self, q_prefixes, policy: Policy, q_batch_size: int):
        self.response_length = policy.response_length
        self.vocab_size = policy.vocab_size
        self.sampler = q_prefixes if callable(q_prefixes) else None
        self._shape = None
        if self.sampler is not None:
            if q_batch_size:
                raise ValueError(
                    f"align config field q_batch_size={q_batch_size} applies to a fixed "
                    "Q set; a Q sampler sets its own batch size, so set it to 0")
            self.tokens = self.prefix_mask = None
            return
        try:
            tokens, prefix_mask = q_prefixes
        except (TypeError, ValueError):
            raise ValueError("q_prefixes must be a pair (tokens int [..., T], "
                             "prefix_mask bool [..., T]) or a callable key -> such a "
                             f"pair; got {type(q_prefixes).__name__}") from None
        self.tokens, self.prefix_mask = self._check(tokens, prefix_mask)
        if q_batch_size > self.tokens.shape[0]:
            raise ValueError(
                f"align config field q_batch_size={q_batch_size} exceeds the "
                f"{self.tokens.shape[0]} Q prefixes given")

    def _check(self, tokens, prefix_mask):
        T = self.response_length
        tokens, prefix_mask = np.asarray(tokens), np.asarray(prefix_mask)
        if tokens.shape != prefix_mask.shape or tokens.ndim < 2 or tokens.shape[-1] != T:
            raise ValueError(
                f"Q tokens and prefix mask must have the same shape [..., T] with T={T}; "
                f"got {tokens.shape} and {prefix_mask.shape}")
        tokens, prefix_mask = tokens.reshape(-1, T), prefix_mask.reshape(-1, T)
        check_tokens("Q tokens", tokens, self.vocab_size)
        objectives.check_prefix_mask(prefix_mask, T, name="Q prefix mask")
        return jnp.asarray(tokens), jnp.asarray(prefix_mask)

    def batch(self, run_key: jax.Array, step: int):
        """Returns (tokens, prefix_mask) for update `step` (0-based)."""
        if self.sampler is None:
            return self.tokens, self.prefix_mask
        tokens, prefix_mask = self.sampler(step_keys(run_key, step)["q"])
        if self._shape is None:
            tokens, prefix_mask = self._check(tokens, prefix_mask)
            self._shape = tokens.shape
        elif np.shape(tokens) != self._shape or np.shape(prefix_mask) != self._shape:
            raise ValueError(
                f"the Q sampler returned shapes {np.shape(tokens)} and "
                f"{np.shape(prefix_mask)} after {self._shape}; it must return the same "
                "shape [Bq, T] every time so that the update does not recompile")
        return tokens, prefix_mask


# Run directory: configuration, checkpoints and metrics ----------------------------


def _to_json(value) -> Any:
    """Converts arrays and scalars to JSON values; NaN and Inf become None."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    array = np.asarray(value)
    if array.dtype.kind in "biu":
        return array.tolist()
    if array.dtype.kind == "f":
        array = array.astype(np.float64)
        return np.where(np.isfinite(array), array, None).tolist()
    raise TypeError(f"cannot record a value of type {type(value).__name__} in "
                    f"{METRICS_FILE}")


def describe_model(policy: Policy) -> dict[str, Any]:
    """Describes a policy's architecture as a flat JSON dict.

    The description contains the class, V, T, the fields of a dataclass
    `config` attribute (as `TransformerPolicy` has) and the shape and dtype
    of every parameter. Two policies with equal descriptions can load each
    other's checkpoints.
    """
    cls = type(policy)
    description = {"class": f"{cls.__module__}.{cls.__qualname__}",
                   "vocab_size": policy.vocab_size,
                   "response_length": policy.response_length}
    config = getattr(policy, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        for field in dataclasses.fields(config):
            description[f"config.{field.name}"] = _to_json(getattr(config, field.name))
    leaves = jax.tree_util.tree_flatten_with_path(policy.params)[0]
    for path, leaf in leaves:
        description[f"params{jax.tree_util.keystr(path)}"] = (
            f"{jnp.dtype(leaf.dtype).name}{list(np.shape(leaf))}")
    return description


def _fingerprint(tree: PyTree) -> str:
    """SHA-256 of the shapes, dtypes and bytes of every leaf."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _run_config(policy, base_policy, harm, settings, key, q_source, recovery_ids):
    training = {name: settings[name] for name in _ALIGN_FIELDS
                if name not in _RESUMABLE_FIELDS}
    training["key"] = _to_json(jax.random.key_data(key))
    training["harm"] = harm.name
    training["recovery_ids"] = None if recovery_ids is None else list(recovery_ids)
    if q_source is None:
        training["q_prefixes"] = None
    elif q_source.sampler is not None:
        training["q_prefixes"] = "sampler"
    else:
        training["q_prefixes"] = _fingerprint((q_source.tokens, q_source.prefix_mask))
    return {"model": describe_model(policy),
            "base_model": {"params_sha256": _fingerprint(base_policy.params)},
            "training": training}


def _check_run_config(path: str, current: dict) -> None:
    """Raises ValueError naming every field where the stored run config differs."""
    with open(path) as f:
        stored = json.load(f)
    current = json.loads(json.dumps(current))
    differences = []
    for section in sorted(set(stored) | set(current)):
        old, new = stored.get(section, {}), current.get(section, {})
        for field in sorted(set(old) | set(new)):
            old_value = old.get(field, "<absent>")
            new_value = new.get(field, "<absent>")
            if old_value != new_value:
                differences.append(f"{section}.{field}: {old_value!r} in the run "
                                   f"directory, {new_value!r} now")
    if differences:
        raise ValueError(
            f"{path} was written by a different run, so its checkpoints cannot be "
            f"resumed; differing fields: {'; '.join(differences)}. Use a new workdir "
            "or the original model, base model and settings")


def _checkpoint_tree(state: AlignState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "key": jax.random.key_data(state.key)}


def _restore(manager: ocp.CheckpointManager, step: int,
             template: AlignState) -> AlignState:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _checkpoint_tree(template))
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    impl = jax.random.key_impl(template.key)
    key = jax.random.wrap_key_data(restored["key"], impl=impl)
    state = AlignState(restored["step"], restored["params"], restored["opt_state"], key)
    if int(state.step) != step:
        raise ValueError(f"checkpoint {step} in {manager.directory} contains step "
                         f"{int(state.step)}, so the checkpoint directory is corrupt; "
                         "use a new workdir")
    return state


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keeps the lines of steps <= last_step and drops later or unreadable lines."""
    if not os.path.exists(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            try:
                step = int(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                logging.warning("Dropping unreadable line %d of %s: %s", number, path,
                                error)
                dropped += 1
                continue
            if step <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        logging.info("Dropped %d lines after step %d from %s", dropped, last_step, path)
        write_text(path, "".join(kept))


# Alignment loop -------------------------------------------------------------------


def _check_finite(metrics: dict, step: int, last_checkpoint: int | None,
                  checkpoint_dir: str) -> None:
    values = {name: float(metrics[name]) for name in LOSS_TERMS + ("grad_norm",)}
    if all(math.isfinite(value) for value in values.values()):
        return
    terms = ", ".join(f"{name}={value:.6g}" for name, value in values.items())
    if last_checkpoint is None:
        where = "no checkpoint was saved"
    else:
        where = f"the last good checkpoint is step {last_checkpoint} in {checkpoint_dir}"
    raise FloatingPointError(f"alignment loss is not finite at step {step}: {terms}; "
                             f"{where}")


def _step_record(step: int, metrics: dict, has_q: bool) -> dict:
    record = {"step": step}
    for name in LOSS_TERMS + ("grad_norm", "kl_per_position"):
        record[name] = _to_json(metrics[name])
    if has_q:
        record["recovery_per_position"] = _to_json(metrics["recovery_per_position"])
    return record


def align(key: jax.Array | None, policy: Policy, base_policy: Policy, harm, config,
          workdir: str, q_prefixes=None, recovery_ids: Sequence[int] | None = None,
          eval_fn: Callable[[int, Policy], Mapping[str, Any]] | None = None,
          mesh=None) -> Policy:
    """Aligns a policy with the standard (mu = 0) or the deep objective.

    Each update draws B responses from the current policy, evaluates the
    harm and applies AdamW to the gradient surrogate of

        lam * E[Harm] + KL(P_theta || P_base)
        + mu * E_{y ~ Q}[sum_t gamma**t (1 - P_theta(y_t in R | y<t))]

    (`objectives.objective_loss`; the counted positions t are those of
    `objectives.recovery_positions`). The Q prefixes also give the recovery
    profile in the metrics when mu = 0.

    Every update appends one line to workdir/metrics.jsonl. The line
    contains step (updates done), the loss terms harm, kl, recovery and
    total (estimates of the objective, not of the surrogate), grad_norm and
    kl_per_position [T]. With Q it also contains recovery_per_position [T],
    null where no prefix counts the position. The values of eval_fn follow
    under names prefixed "eval/". Checkpoints are saved every
    checkpoint_every updates and after the last. On a workdir that contains
    checkpoints the run resumes from the latest. Before that, run_config.json
    must match the model, the base model's params, the key, the harm's
    name, the recovery ids and the Q prefixes (a fixed set by its SHA-256).
    It must also match every setting except steps, seed, checkpoints_to_keep
    and the logging, evaluation and checkpoint intervals.

    Args:
      key: the run's PRNG key, or None for jax.random.key(config.seed). A
        resumed run uses the key stored in its checkpoint, which must equal
        this one.
      policy: the initial policy (ignored when resuming, except for its
        structure).
      base_policy: the reference P_base, with the same V and T.
      harm: a harm from int [B, T] to float [B] in [0, 1], traceable by JAX.
      config: a ConfigDict with the fields of `default_align_config`.
      workdir: the run directory; created if missing.
      q_prefixes: None, a pair (tokens int [..., T], prefix_mask bool
        [..., T]) of Q prefixes (as `hi_jax.world.sample_q_prefixes`
        returns), or a callable q_key -> such a pair of fixed shape, called
        eagerly every update with `step_keys(key, step)["q"]`.
      recovery_ids: the ids of R; required with q_prefixes.
      eval_fn: optional callable (step, policy) -> dict of JSON-convertible
        values (scalars or arrays), called at step 0 of a fresh run, every
        eval_every updates and after the last update.
      mesh: a one-axis `jax.sharding.Mesh` over which each update's
        responses are sharded (see `make_align_step`); None for one device.

    Returns:
      The aligned policy.

    Raises:
      ValueError: on an invalid config (before any work), inconsistent Q or
        recovery ids, a run directory from a different run (naming the
        fields that differ), or harm values outside [0, 1].
      FloatingPointError: when a loss term or the gradient norm becomes NaN
        or Inf; the message names the step, the loss terms and the last good
        checkpoint.
    """
    settings = validate_align_config(config)
    _check_policy("policy", policy)
    _check_policy("base_policy", base_policy)
    _check_same_shape(policy, base_policy, "base_policy")
    harm = as_harm(harm)
    key = _root_key(key, settings.seed)
    q_source = None
    if q_prefixes is not None:
        if recovery_ids is None:
            raise ValueError("recovery_ids are required with q_prefixes")
        recovery_ids = objectives.check_recovery_ids(recovery_ids, policy.vocab_size)
        q_source = _QSource(q_prefixes, policy, settings.q_batch_size)
    if settings.mu > 0 and q_source is None:
        raise ValueError(f"align config field mu={settings.mu} weights a recovery "
                         "penalty, which needs q_prefixes and recovery_ids")

    optimizer = make_optimizer(settings)
    update = make_align_step(
        policy, harm, optimizer, batch_size=settings.batch_size, lam=settings.lam,
        mu=settings.mu, gamma=settings.gamma,
        recovery_ids=recovery_ids if q_source is not None else None,
        q_batch_size=settings.q_batch_size if q_source is not None else 0, mesh=mesh)

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
    manager = ocp.CheckpointManager(
        checkpoint_dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=settings.checkpoints_to_keep,
                                             create=True, cleanup_tmp_directories=True))
    try:
        return _run_alignment(
            settings, key, policy, base_policy, harm, optimizer, update, q_source,
            recovery_ids, eval_fn, workdir, manager)
    finally:
        manager.wait_until_finished()
        manager.close()


def _check_or_write_run_config(workdir: str, manager: ocp.CheckpointManager,
                               run_config: dict) -> None:
    run_config_path = os.path.join(workdir, RUN_CONFIG_FILE)
    if os.path.exists(run_config_path):
        _check_run_config(run_config_path, run_config)
    elif manager.latest_step() is not None:
        raise ValueError(f"{workdir} contains checkpoints but no {RUN_CONFIG_FILE}, so "
                         "they cannot be checked against this run; use a new workdir")
    else:
        write_json(run_config_path, run_config)


def _restore_latest(workdir: str, manager: ocp.CheckpointManager, initial: AlignState,
                    total_steps: int) -> AlignState:
    """Restores the latest checkpoint, or returns `initial` when there is none.

    Cuts metrics.jsonl back to the restored step, or to nothing for a fresh run.
    """
    metrics_path = os.path.join(workdir, METRICS_FILE)
    latest = manager.latest_step()
    if latest is None:
        _truncate_metrics(metrics_path, last_step=-1)
        return initial
    state = _restore(manager, latest, initial)
    _truncate_metrics(metrics_path, last_step=latest)
    logging.info("Resuming alignment in %s from the checkpoint at step %d of %d",
                 workdir, latest, total_steps)
    return state


class _Progress:
    """Timing of a training loop: first-step compile time, rate and time remaining."""

    def __init__(self, name: str, start_step: int, total_steps: int):
        self.name = name
        self.start_step = start_step
        self.total_steps = total_steps
        self.time = time.perf_counter()
        self.step = start_step

    def step_done(self, done: int) -> None:
        """Logs the duration of this process's first step, which includes compilation."""
        if done == self.start_step + 1:
            logging.info("First %s step, including compilation, took %.2f s", self.name,
                         time.perf_counter() - self.time)
            self.time, self.step = time.perf_counter(), done

    def rate_message(self, done: int) -> str:
        """Returns 'R steps/s, S s remaining', with the rate since the previous call."""
        now = time.perf_counter()
        rate = (done - self.step) / max(now - self.time, 1e-9)
        self.time, self.step = now, done
        remaining = (self.total_steps - done) / rate if rate > 0 else math.inf
        return f"{rate:.2f} steps/s, {remaining:.0f} s remaining"


def _run_alignment(settings, key, policy, base_policy, harm, optimizer, update, q_source,
                   recovery_ids, eval_fn, workdir, manager) -> Policy:
    run_config = _run_config(policy, base_policy, harm, settings, key, q_source,
                             recovery_ids)
    _check_or_write_run_config(workdir, manager, run_config)
    initial = AlignState(jnp.zeros((), jnp.int32), policy.params,
                         optimizer.init(policy.params), key)
    state = _restore_latest(workdir, manager, initial, settings.steps)
    start = int(state.step)
    if start >= settings.steps:
        logging.info("The run in %s is complete: its checkpoint at step %d is at or past "
                     "steps=%d", workdir, start, settings.steps)
        return policy.replace_params(state.params)
    if start == 0:
        logging.info("Starting alignment in %s: %d steps, batch size %d, lam=%g, mu=%g, "
                     "gamma=%g", workdir, settings.steps, settings.batch_size,
                     settings.lam, settings.mu, settings.gamma)

    last_checkpoint = start if start > 0 else None
    with open(os.path.join(workdir, METRICS_FILE), "a") as metrics_file:
        if start == 0 and eval_fn is not None:
            record = {"step": 0}
            record.update(_evaluate(eval_fn, 0, policy.replace_params(state.params)))
            _append(metrics_file, record)
        progress = _Progress("alignment", start, settings.steps)
        try:
            for step in range(start, settings.steps):
                done = step + 1
                q_tokens = q_prefix_mask = None
                if q_source is not None:
                    q_tokens, q_prefix_mask = q_source.batch(key, step)
                state, metrics = update(state, base_policy, q_tokens, q_prefix_mask)
                metrics = jax.device_get(metrics)
                progress.step_done(done)
                _check_finite(metrics, done, last_checkpoint, manager.directory)
                _check_harm_range(harm, metrics, done)

                record = _step_record(done, metrics, q_source is not None)
                if eval_fn is not None and (done % settings.eval_every == 0
                                            or done == settings.steps):
                    aligned = policy.replace_params(state.params)
                    record.update(_evaluate(eval_fn, done, aligned))
                _append(metrics_file, record)

                if done % settings.log_every == 0 or done == settings.steps:
                    logging.info(
                        "align step %d/%d: total %.4f, harm %.4f, kl %.4f, "
                        "recovery %.4f, %s", done, settings.steps, record["total"],
                        record["harm"], record["kl"], record["recovery"],
                        progress.rate_message(done))
                if done % settings.checkpoint_every == 0 or done == settings.steps:
                    tree = _checkpoint_tree(state)
                    manager.save(done, args=ocp.args.StandardSave(tree))
                    last_checkpoint = done
                    logging.info("Saved checkpoint at step %d in %s", done,
                                 manager.directory)
        except Exception as error:
            logging.error("Alignment in %s stopped at step %d: %s: %s", workdir,
                          int(state.step), type(error).__name__, error)
            raise
    return policy.replace_params(state.params)


def _check_harm_range(harm: Harm, metrics: dict, step: int) -> None:
    low, high = float(metrics["harm_min"]), float(metrics["harm_max"])
    if low < 0.0 or high > 1.0:
        raise ValueError(f"harm {harm.name!r} returned values in [{low}, {high}] at step "
                         f"{step}; values must be in [0, 1]")


def _evaluate(eval_fn, step: int, policy: Policy) -> dict:
    values = eval_fn(step, policy)
    if not isinstance(values, Mapping):
        raise TypeError(f"eval_fn must return a dict of metrics; got "
                        f"{type(values).__name__} at step {step}")
    return {f"eval/{name}": _to_json(value) for name, value in values.items()}


def _append(metrics_file, record: dict) -> None:
    """Writes one whole JSON line and flushes it."""
    metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
    metrics_file.flush()
