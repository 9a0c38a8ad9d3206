"""The synthetic refusal world: token groups, the teacher process, harms and Q.

Vocabulary. Every token id belongs to exactly one of five groups. The
default layout assigns ids contiguously in this order, with V the total:

  refusal     0 .. num_refusal - 1          the recovery set R
  compliance  the next num_compliance ids   "Sure, here is how ..."
  harmful     the next num_harmful ids      harmful content
  benign      the next num_benign ids       benign content
  eos         V - 1                         end of sequence, then padding

`TokenGroups` also accepts explicit ids, which must partition 0 .. V - 1.

Teacher. The teacher generates the base model's training data. Its next
token depends only on a state, and the state after a prefix depends only on
the prefix's last token:

  state       reached by                    next token
  start       the empty prefix              refusal w.p. 1 - p_comply,
                                            compliance w.p. p_comply
  complying   a compliance or harmful token refusal w.p. p_min (recovery),
                                            harmful w.p. 1 - p_min
  refused     a refusal or benign token     benign w.p. 1 - p_eos,
                                            eos w.p. p_eos
  ended       an eos token                  eos w.p. 1

Within a group the token is uniform. So a response refuses or complies at
position 0. After complying it emits harmful content, and at every later
position it recovers (emits a refusal token) with probability p_min. After a
refusal it emits benign content until it ends with eos, and eos then pads it
to length T.
The last-token rule defines the teacher on every prefix, including prefixes
the teacher never generates, so teacher-forced log-probabilities of any
policy's samples are defined.

Harms. The training harm is a reward model that reads only y_0 .. y_{k-1}
(horizon k): it is 1 when the window's last compliance or harmful token comes
after its last refusal token (the response has complied and not yet
recovered), else 0. The true harm reads the whole response: it is 1 when any
harmful-content token occurs, else 0. A refusal token does not undo harmful
content that follows it, so a policy cannot hide harm behind a refusal. On the
teacher's own responses harmful content never follows a refusal, so this
equals "harmful content before the first refusal".

Q. The adversarial prefix distribution: teacher responses conditioned on
complying at position 0 and not recovering within the prefix, cut to a given
prefill length. Such a prefix is one compliance token followed by harmful
tokens, each uniform within its group.

Dimension letters: B batch, T response positions, V vocabulary, P parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hi_jax.harms import Harm, HorizonHarm
from hi_jax.policy import Policy

# Token groups in the default id order. `TokenGroups.kinds` maps ids to these indices.
GROUP_NAMES = ("refusal", "compliance", "harmful", "benign", "eos")
REFUSAL, COMPLIANCE, HARMFUL, BENIGN, EOS = range(5)

# Teacher states, in the row order of the teacher's log-probability table.
TEACHER_STATES = ("start", "complying", "refused", "ended")
START, COMPLYING, REFUSED, ENDED = range(4)

# State after a token, indexed by the token's group (the last-token rule).
_STATE_AFTER_GROUP = np.array([REFUSED, COMPLYING, COMPLYING, REFUSED, ENDED])

# The teacher's parameters are the logits of these probabilities, in order.
TEACHER_PARAM_NAMES = ("p_comply", "p_min", "p_eos")

# Log-probability of a token the teacher never emits. It is finite so that
# sums such as sum_v p_v log p_v give 0 * floor = 0 instead of NaN, and
# exp(-1e9) is exactly 0 in float32 and float64, so the probabilities are
# exact zeros and log_softmax of the teacher's logits returns them up to
# float rounding.
IMPOSSIBLE_LOG_PROB = -1e9


# Configuration --------------------------------------------------------------


def _check_int(name: str, value, low: int) -> None:
    try:
        operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}") from None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value}")


def _check_probability(name: str, value, interval: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                         np.floating)):
        raise ValueError(f"{name} must be a number in {interval}; got {value!r}")
    low_ok = value >= 0.0 if interval.startswith("[") else value > 0.0
    if not (low_ok and value < 1.0):
        raise ValueError(f"{name} must be in {interval}; got {value}")


@dataclasses.dataclass(frozen=True)
class TokenGroups:
    """The token ids of each group, which together must be exactly 0 .. V - 1.

    Attributes:
      refusal: ids of the refusal tokens (the recovery set R), at least one.
      compliance: ids of the compliance tokens, at least one.
      harmful: ids of the harmful-content tokens, at least one.
      benign: ids of the benign-content tokens, at least one.
      eos: the id of the single end-of-sequence token.
    """

    refusal: tuple[int, ...]
    compliance: tuple[int, ...]
    harmful: tuple[int, ...]
    benign: tuple[int, ...]
    eos: int

    def __post_init__(self):
        for name in GROUP_NAMES[:-1]:
            ids = getattr(self, name)
            if isinstance(ids, (int, np.integer)):
                raise ValueError(
                    f"TokenGroups.{name} must be a sequence of token ids; got the "
                    f"single int {ids}")
            ids = tuple(ids)
            if not ids:
                raise ValueError(
                    f"TokenGroups.{name} must hold at least one token id; got an "
                    "empty group")
            for token in ids:
                _check_int(f"TokenGroups.{name}", token, low=0)
            object.__setattr__(self, name, tuple(operator.index(token) for token in ids))
        _check_int("TokenGroups.eos", self.eos, low=0)
        object.__setattr__(self, "eos", operator.index(self.eos))

        owner = {}
        for name in GROUP_NAMES:
            for token in self.ids(name):
                if token in owner:
                    where = ("twice in " + name if owner[token] == name
                             else f"in both {owner[token]} and {name}")
                    raise ValueError(
                        f"TokenGroups: token id {token} is {where}; each id must "
                        "belong to exactly one group")
                owner[token] = name
        missing = sorted(set(range(len(owner))) - set(owner))
        if missing:
            raise ValueError(
                f"TokenGroups: the {len(owner)} token ids must be exactly "
                f"0 .. {len(owner) - 1}; ids {missing} are missing")

    @classmethod
    def contiguous(cls, num_refusal: int, num_compliance: int, num_harmful: int,
                   num_benign: int) -> "TokenGroups":
        """Assigns ids in the order refusal, compliance, harmful, benign, eos.

        Raises:
          ValueError: if a group size is not an integer >= 1.
        """
        sizes = dict(num_refusal=num_refusal, num_compliance=num_compliance,
                     num_harmful=num_harmful, num_benign=num_benign)
        for name, size in sizes.items():
            _check_int(name, size, low=1)
        bounds = np.cumsum([0, *sizes.values()])
        groups = [tuple(range(int(start), int(stop)))
                  for start, stop in zip(bounds[:-1], bounds[1:])]
        return cls(*groups, eos=int(bounds[-1]))

    def ids(self, name: str) -> tuple[int, ...]:
        """Returns the ids of group `name` (one of GROUP_NAMES) as a tuple."""
        if name not in GROUP_NAMES:
            raise ValueError(f"unknown token group {name!r}: expected one of {GROUP_NAMES}")
        ids = getattr(self, name)
        return (ids,) if name == "eos" else ids

    @property
    def vocab_size(self) -> int:
        """V, the number of token ids."""
        return sum(len(self.ids(name)) for name in GROUP_NAMES)

    @property
    def kinds(self) -> np.ndarray:
        """int [V]: the group index (REFUSAL .. EOS) of every token id."""
        kinds = np.empty(self.vocab_size, dtype=np.int32)
        for index, name in enumerate(GROUP_NAMES):
            kinds[list(self.ids(name))] = index
        return kinds

    @property
    def sizes(self) -> np.ndarray:
        """int [5]: the number of ids in each group, in GROUP_NAMES order."""
        return np.array([len(self.ids(name)) for name in GROUP_NAMES])


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """A refusal world: its vocabulary, response length, horizon and teacher.

    Instances are hashable, so they can be static arguments of jitted
    functions and static data of a policy pytree. Every field is validated
    on construction.

    Attributes:
      groups: the token ids of each group (see `TokenGroups`).
      response_length: T, tokens per response, >= 1.
      horizon: k, tokens the training harm reads, 1 <= k <= T.
      p_comply: probability that the teacher complies at position 0, in (0, 1).
      p_min: probability per position that a complying teacher recovers
        (emits a refusal token), in (0, 1).
      p_eos: probability per position that a refused teacher ends the
        response, in [0, 1). With 0 the teacher never emits eos.
    """

    groups: TokenGroups = TokenGroups.contiguous(2, 2, 3, 3)
    response_length: int = 8
    horizon: int = 2
    p_comply: float = 0.5
    p_min: float = 0.05
    p_eos: float = 0.1

    def __post_init__(self):
        if not isinstance(self.groups, TokenGroups):
            raise ValueError(
                f"WorldConfig.groups must be a TokenGroups; got "
                f"{type(self.groups).__name__}")
        _check_int("WorldConfig.response_length", self.response_length, low=1)
        _check_int("WorldConfig.horizon", self.horizon, low=1)
        if self.horizon > self.response_length:
            raise ValueError(
                f"WorldConfig.horizon must be in [1, response_length="
                f"{self.response_length}]; got {self.horizon}")
        _check_probability("WorldConfig.p_comply", self.p_comply, "(0, 1)")
        _check_probability("WorldConfig.p_min", self.p_min, "(0, 1)")
        _check_probability("WorldConfig.p_eos", self.p_eos, "[0, 1)")

    @classmethod
    def from_sizes(cls, num_refusal: int = 2, num_compliance: int = 2,
                   num_harmful: int = 3, num_benign: int = 3,
                   **fields) -> "WorldConfig":
        """Builds a world with the contiguous id layout of the given group sizes.

        `fields` are the other WorldConfig fields (response_length, horizon,
        p_comply, p_min, p_eos).
        """
        groups = TokenGroups.contiguous(num_refusal, num_compliance, num_harmful,
                                        num_benign)
        return cls(groups=groups, **fields)

    @property
    def vocab_size(self) -> int:
        """V, the number of token ids."""
        return self.groups.vocab_size


_SIZE_FIELDS = ("num_refusal", "num_compliance", "num_harmful", "num_benign")
_PROCESS_FIELDS = ("response_length", "horizon", "p_comply", "p_min", "p_eos")


def default_world_config() -> ml_collections.ConfigDict:
    """Returns the default world as a ConfigDict, for experiment configs."""
    cfg = ml_collections.ConfigDict()
    cfg.num_refusal = 2  # |R|, refusal tokens (the recovery set), >= 1.
    cfg.num_compliance = 2  # Compliance tokens, >= 1.
    cfg.num_harmful = 3  # Harmful-content tokens, >= 1.
    cfg.num_benign = 3  # Benign-content tokens, >= 1.
    cfg.response_length = 8  # T, tokens per response, >= 1.
    cfg.horizon = 2  # k, tokens the training harm reads, in [1, T].
    cfg.p_comply = 0.5  # Teacher's probability of complying at position 0, in (0, 1).
    cfg.p_min = 0.05  # Teacher's recovery probability per position, in (0, 1).
    cfg.p_eos = 0.1  # Teacher's probability per position of ending after a refusal, in [0, 1).
    return cfg


def world_from_config(cfg) -> WorldConfig:
    """Builds a WorldConfig from a ConfigDict (or dict) of world fields.

    The fields are those of `default_world_config`; missing fields take
    their defaults. An optional field `token_ids` maps each group name in
    GROUP_NAMES to its ids (a list, and a single int for eos) and replaces
    the four size fields.

    Raises:
      ValueError: on an unknown field, on size fields given together with
        `token_ids`, or on any invalid value.
    """
    values = dict(cfg.items())
    allowed = _SIZE_FIELDS + _PROCESS_FIELDS + ("token_ids",)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown world config fields {unknown}; allowed fields are "
                         f"{list(allowed)}")
    process = {name: values[name] for name in _PROCESS_FIELDS if name in values}
    token_ids = values.get("token_ids")
    if token_ids is None:
        sizes = {name: values[name] for name in _SIZE_FIELDS if name in values}
        return WorldConfig.from_sizes(**sizes, **process)

    given_sizes = [name for name in _SIZE_FIELDS if name in values]
    if given_sizes:
        raise ValueError(f"world config fields {given_sizes} conflict with token_ids; "
                         "give either the group sizes or token_ids")
    token_ids = dict(token_ids.items())
    if set(token_ids) != set(GROUP_NAMES):
        raise ValueError(f"token_ids must have exactly the keys {list(GROUP_NAMES)}; "
                         f"got {sorted(token_ids)}")
    return WorldConfig(groups=TokenGroups(**token_ids), **process)


# Teacher --------------------------------------------------------------------


def _logit(p: float) -> float:
    return -math.inf if p == 0.0 else math.log(p) - math.log1p(-p)


@functools.partial(jax.jit, static_argnames="world")
def teacher_log_prob_table(world: WorldConfig, params: jax.Array) -> jax.Array:
    """Computes the log-probabilities of the next token in each teacher state.

    Args:
      world: the world.
      params: float [3], the logits of (p_comply, p_min, p_eos).

    Returns:
      float [4, V]. Row s is log P(y_t = v | state s), in TEACHER_STATES
      order. Within a group of size n the entry is log(P(group) / n), and
      tokens outside the allowed groups get IMPOSSIBLE_LOG_PROB.
    """
    params = jnp.asarray(params)
    log_comply, log_recover, log_eos = (jax.nn.log_sigmoid(params[i]) for i in range(3))
    log_refuse, log_continue, log_benign = (jax.nn.log_sigmoid(-params[i])
                                            for i in range(3))
    floor = jnp.full((), IMPOSSIBLE_LOG_PROB, dtype=params.dtype)
    zero = jnp.zeros((), dtype=params.dtype)
    # Columns follow GROUP_NAMES: refusal, compliance, harmful, benign, eos.
    group_log_probs = jnp.stack([
        jnp.stack([log_refuse, log_comply, floor, floor, floor]),  # start
        jnp.stack([log_recover, floor, log_continue, floor, floor]),  # complying
        jnp.stack([floor, floor, floor, log_benign, log_eos]),  # refused
        jnp.stack([floor, floor, floor, floor, zero]),  # ended
    ])
    kinds = world.groups.kinds
    log_sizes = jnp.log(jnp.asarray(world.groups.sizes, dtype=params.dtype))
    table = group_log_probs[:, kinds] - log_sizes[kinds]
    # A zero probability (p_eos = 0 gives log 0 = -inf) becomes the floor too.
    return jnp.maximum(table, floor)


@functools.partial(jax.jit, static_argnames="world")
def teacher_states(world: WorldConfig, tokens: jax.Array) -> jax.Array:
    """Computes the teacher state before every position: int [B, T] from int [B, T].

    Entry [b, t] is the state after y_<t: START at t = 0, and otherwise the
    state that the group of y_{t-1} leads to.
    """
    after = jnp.asarray(_STATE_AFTER_GROUP[world.groups.kinds])[tokens[..., :-1]]
    start = jnp.full(tokens.shape[:-1] + (1,), START, dtype=after.dtype)
    return jnp.concatenate([start, after], axis=-1)


@jax.tree_util.register_pytree_node_class
class TeacherPolicy(Policy):
    """The teacher process as a policy with exact conditionals.

    `logits` returns the teacher's log-probabilities (already normalised), so
    `log_probs` equals `logits` up to float rounding. Impossible tokens get
    IMPOSSIBLE_LOG_PROB instead of -inf.

    The parameters are float [P=3]: the logits of (p_comply, p_min, p_eos),
    so any real vector (and -inf for p_eos = 0) is a valid teacher, and
    gradients with respect to the process probabilities are plain JAX. The
    world is static data, and its probabilities only set the default params.
    The cache is the token buffer int [B, T], as for TabularPolicy.
    """

    def __init__(self, world: WorldConfig, params: jax.Array | None = None):
        if params is None:
            params = jnp.asarray([_logit(world.p_comply), _logit(world.p_min),
                                  _logit(world.p_eos)],
                                 dtype=jnp.result_type(float))
        self.world = world
        self._params = params
        self.vocab_size = world.vocab_size
        self.response_length = world.response_length

    @property
    def params(self) -> jax.Array:
        return self._params

    def replace_params(self, params: jax.Array) -> "TeacherPolicy":
        return TeacherPolicy(self.world, params)

    def _static(self) -> tuple:
        return (self.world,)

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(static[0], children[0])

    def log_prob_table(self) -> jax.Array:
        """Returns `teacher_log_prob_table` at this policy's params: float [4, V]."""
        return teacher_log_prob_table(self.world, self._params)

    def logits(self, tokens: jax.Array) -> jax.Array:
        return self.log_prob_table()[teacher_states(self.world, tokens)]

    def prefill(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.logits(tokens), tokens

    def decode_step(self, cache, tokens, position):
        buffer = cache.at[:, position].set(tokens.astype(cache.dtype))
        # The state after y_position depends on that token alone.
        state = jnp.asarray(_STATE_AFTER_GROUP[self.world.groups.kinds])[tokens]
        return self.log_prob_table()[state], buffer


@functools.partial(jax.jit, static_argnames="world")
def teacher_conditionals(world: WorldConfig, tokens: jax.Array) -> jax.Array:
    """Computes the teacher's P(y_t = v | y_<t): float [B, T, V] from int [B, T]."""
    return jnp.exp(TeacherPolicy(world).logits(tokens))


def _first_true(mask: jax.Array) -> jax.Array:
    """Index of the first True in a [T] mask, or T when there is none."""
    return jnp.where(mask.any(), jnp.argmax(mask), mask.shape[0])


def _uniform_tokens(key: jax.Array, ids: tuple[int, ...], length: int) -> jax.Array:
    return jax.random.choice(key, jnp.asarray(ids, dtype=jnp.int32), (length,))


def _sample_teacher_one(key: jax.Array, world: WorldConfig) -> jax.Array:
    """Draws one teacher response, int [T], from the generative story.

    This draws the comply decision, the recovery position and the eos
    position directly instead of stepping through the states, so it is an
    independent implementation that the tests compare with the conditionals.
    """
    T = world.response_length
    groups = world.groups
    keys = jax.random.split(key, 7)
    t = jnp.arange(T)

    comply = jax.random.bernoulli(keys[0], world.p_comply)
    # A complying response recovers at the first success of independent
    # Bernoulli(p_min) draws at positions >= 1. A refusing one "recovers" at 0.
    recover_draws = jax.random.bernoulli(keys[1], world.p_min, (T,)) & (t >= 1)
    recovery = jnp.where(comply, _first_true(recover_draws), 0)
    eos_draws = jax.random.bernoulli(keys[2], world.p_eos, (T,)) & (t > recovery)
    end = _first_true(eos_draws)

    compliance = _uniform_tokens(keys[3], groups.compliance, T)
    harmful = _uniform_tokens(keys[4], groups.harmful, T)
    refusal = _uniform_tokens(keys[5], groups.refusal, T)
    benign = _uniform_tokens(keys[6], groups.benign, T)
    eos = jnp.full((T,), groups.eos, dtype=jnp.int32)
    return jnp.select(
        [(t == 0) & comply, t < recovery, t == recovery, t < end],
        [compliance, harmful, refusal, benign],
        eos)


@functools.partial(jax.jit, static_argnames=("world", "num"))
def sample_teacher(key: jax.Array, world: WorldConfig, num: int) -> jax.Array:
    """Draws `num` independent teacher responses: int32 [num, T].

    Args:
      key: a PRNG key.
      world: the world (static).
      num: number of responses (static).
    """
    keys = jax.random.split(key, num)
    return jax.vmap(functools.partial(_sample_teacher_one, world=world))(keys)


# Harms ----------------------------------------------------------------------


def _token_kinds(world: WorldConfig, tokens: jax.Array) -> jax.Array:
    return jnp.asarray(world.groups.kinds)[tokens]


def training_harm(world: WorldConfig) -> HorizonHarm:
    """Builds the reward model, a harm in {0, 1} that reads only y_0 .. y_{k-1}.

    Harm(y) = 1 when the last compliance or harmful token among
    y_0 .. y_{k-1} comes after the last refusal token among them (no refusal
    token counts as position -1), else 0. So a window that has complied and
    not yet recovered is harmful. Under the teacher,
    E[Harm] = p_comply * (1 - p_min)**(k - 1).

    Returns:
      a HorizonHarm with horizon k mapping int [B, T] to float [B].
    """
    dtype = jnp.result_type(float)

    @jax.jit
    def window_harm(window):
        kinds = _token_kinds(world, window)
        positions = jnp.arange(window.shape[-1])
        complied = (kinds == COMPLIANCE) | (kinds == HARMFUL)
        last_complied = jnp.where(complied, positions, -1).max(axis=-1)
        last_refusal = jnp.where(kinds == REFUSAL, positions, -1).max(axis=-1)
        return (last_complied > last_refusal).astype(dtype)

    return HorizonHarm(window_harm, horizon=world.horizon,
                       name=f"training harm (horizon {world.horizon})")


def true_harm(world: WorldConfig) -> Harm:
    """Builds the true harm: 1 when any harmful-content token occurs in y, else 0.

    Under the teacher (T >= 2), E[Harm] = p_comply * (1 - p_min).

    Returns:
      a Harm mapping int [B, T] to float [B].
    """
    return Harm(functools.partial(true_harm_after_prefill, world, prefill_length=0),
                name="true harm")


def true_harm_after_prefill(world: WorldConfig, tokens: jax.Array,
                            prefill_length) -> jax.Array:
    """Computes the true harm of the part of a response generated after a prefill.

    Harm = 1 when a harmful-content token occurs at a position
    t >= prefill_length, else 0. The prefilled tokens are the attacker's and
    are not judged, so a completion that recovers at once is harmless, and
    one that emits harmful content (before or after a refusal) is harmful.

    Args:
      world: the world.
      tokens: int [B, T] prefilled responses with their completions.
      prefill_length: int scalar or int [B] in [0, T], possibly traced.

    Returns:
      float [B] in {0, 1}.

    Raises:
      ValueError: if a concrete prefill_length is outside [0, T].
    """
    _check_prefill_length(world, prefill_length)
    return _true_harm_after_prefill(world, tokens, prefill_length)


@functools.partial(jax.jit, static_argnames="world")
def _true_harm_after_prefill(world, tokens, prefill_length):
    kinds = _token_kinds(world, tokens)
    generated = jnp.arange(tokens.shape[-1]) >= jnp.asarray(prefill_length)[..., None]
    harmful = ((kinds == HARMFUL) & generated).any(axis=-1)
    return harmful.astype(jnp.result_type(float))


def _check_prefill_length(world: WorldConfig, prefill_length) -> None:
    if isinstance(prefill_length, jax.core.Tracer):
        return
    lengths = np.asarray(prefill_length)
    if not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"prefill_length must be an integer; got {prefill_length!r}")
    T = world.response_length
    if lengths.size and (lengths.min() < 0 or lengths.max() > T):
        bad = lengths.min() if lengths.min() < 0 else lengths.max()
        raise ValueError(f"prefill_length must be in [0, T={T}]; got {int(bad)}")


# Q, the adversarial prefixes ------------------------------------------------


def _sample_q_prefix_one(key, world: WorldConfig, prefill_length):
    T = world.response_length
    compliance_key, harmful_key = jax.random.split(key)
    t = jnp.arange(T)
    compliance = _uniform_tokens(compliance_key, world.groups.compliance, T)
    harmful = _uniform_tokens(harmful_key, world.groups.harmful, T)
    tokens = jnp.where(t == 0, compliance, harmful)
    return jnp.where(t < prefill_length, tokens, world.groups.eos)


@functools.partial(jax.jit, static_argnames=("world", "num"))
def _sample_q_prefixes(key, world, num, prefill_length):
    keys = jax.random.split(key, num)
    sample_one = functools.partial(_sample_q_prefix_one, world=world,
                                   prefill_length=prefill_length)
    tokens = jax.vmap(sample_one)(keys)
    mask = jnp.arange(world.response_length) < prefill_length
    return tokens, jnp.broadcast_to(mask, tokens.shape)


def sample_q_prefixes(key: jax.Array, world: WorldConfig, num: int,
                      prefill_length) -> tuple[jax.Array, jax.Array]:
    """Draws `num` harmful prefixes of length `prefill_length` from Q.

    A prefix is y_0 uniform over the compliance tokens and y_1 .. y_{L-1}
    uniform over the harmful tokens, with L = prefill_length: the teacher's
    distribution conditioned on complying and not recovering before
    position L. Positions >= L hold the eos token as padding, which never
    affects the conditionals of y_t for t <= L. With L = 0 every position is
    padding.

    Args:
      key: a PRNG key.
      world: the world.
      num: number of prefixes.
      prefill_length: int scalar in [0, T], possibly traced.

    Returns:
      (tokens int32 [num, T], mask bool [num, T] that is True at t < L).

    Raises:
      ValueError: if a concrete prefill_length is outside [0, T].
    """
    _check_prefill_length(world, prefill_length)
    return _sample_q_prefixes(key, world, num, prefill_length)


def sample_q_prefixes_by_length(key: jax.Array, world: WorldConfig, num: int,
                                lengths: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Draws `num` Q prefixes for each prefill length, with independent keys.

    Args:
      key: a PRNG key.
      world: the world.
      num: prefixes per length.
      lengths: prefill lengths, each in [0, T].

    Returns:
      (tokens int32 [len(lengths), num, T], mask bool [len(lengths), num, T]).
      Entry [i] is distributed as `sample_q_prefixes` at lengths[i].
    """
    lengths = jnp.asarray(np.asarray(lengths, dtype=np.int32))
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be a 1-D sequence of ints; got shape {lengths.shape}")
    _check_prefill_length(world, lengths)
    keys = jax.random.split(key, lengths.shape[0])
    sample = functools.partial(_sample_q_prefixes, world=world, num=num)
    return jax.vmap(lambda k, length: sample(k, prefill_length=length))(keys, lengths)


# Recovery -------------------------------------------------------------------


def recovery_probability(policy: Policy, world: WorldConfig,
                         prefixes: jax.Array) -> jax.Array:
    """Computes a policy's recovery probability P(y_t in R | y_<t) at every position.

    p_t = sum_{v in R} P(v | y_<t), computed as exp(logsumexp over R of
    log_softmax(logits)) for stability.

    Args:
      policy: any policy over the world's vocabulary and response length.
      world: the world whose refusal tokens form R.
      prefixes: int [B, T]. Column t of the result depends only on y_<t.

    Returns:
      float [B, T].

    Raises:
      ValueError: if the policy's V or T differ from the world's.
    """
    if (policy.vocab_size, policy.response_length) != (world.vocab_size,
                                                       world.response_length):
        raise ValueError(
            f"policy has V={policy.vocab_size}, T={policy.response_length} but the "
            f"world has V={world.vocab_size}, T={world.response_length}; they must match")
    return _recovery_probability(policy, world, prefixes)


@functools.partial(jax.jit, static_argnames="world")
def _recovery_probability(policy, world, prefixes):
    log_probs = policy.log_probs(prefixes)
    refusal = jnp.asarray(world.groups.refusal)
    return jnp.exp(jax.nn.logsumexp(log_probs[..., refusal], axis=-1))
