"""Monte Carlo estimators of the harm-information profile.

Every estimate comes from N independent outer samples ("units"). Unit i
draws one response y^i from the policy; its prefixes y^i_<t for t = 0..T-1
are the prefixes at which the per-position quantities are estimated. Units
are independent, so each per-position mean has an honest standard error
from their spread.

Harm information I_t (the first two methods are unbiased):

* Rao-Blackwellised ("rao_blackwell"): at y<t, branch on every candidate
  token v with its exact probability p_v and estimate h_v = h_t(y<t v) from
  M continuations. Var(h_t | y<t) = sum_v p_v h_v^2 - (sum_v p_v h_v)^2 is
  estimated with the U-statistic (S_v^2 - sum_m H_vm^2) / (M (M - 1)) for
  each h_v^2, so E[estimate] = Var exactly; cross terms h_v h_w (v != w) use
  independent continuations and need no correction. With `top_k`, the K
  most probable tokens are enumerated and the remaining mass p_R is covered
  by two independent draws w1, w2 from the remainder:
  sum_{v not in top} p_v f(v) ~ p_R f(w).
* Pick-freeze ("pick_freeze"): E[h_t(y_<=t)^2] equals
  E[Harm(y_<=t, z1) Harm(y_<=t, z2)] for two independent continuations, so
  S_t = U-statistic of the M continuations of y_<=t and
  I_t = S_t - S_{t-1}. The sum over t telescopes to an unbiased Var(Harm).
  No vocabulary branching: V times fewer continuations.
* Plug-in ("plug_in"): sum_v p_v hhat_v^2 - (sum_v p_v hhat_v)^2 with plain
  means. Biased upward by sum_v p_v (1 - p_v) sigma_v^2 / M; offered only to
  show that bias.
* Nested Monte Carlo ("nested"): the estimator written without the policy's
  probabilities. Sample B tokens v_1..v_B from p(. | y<t), estimate each
  h_t(y<t v_b) by the mean of M continuations, and take the sample variance
  (divisor B - 1) of those B means. The continuation noise adds to the
  spread, so its expectation is I_t + E[Var(Harm | y_<=t)] / M
  = I_t + (sum_{s>t} I_s) / M. Offered as the baseline that the other
  methods are measured against.

Gradient contributions: C_t(y<t) = sum_v p_v h_v grad log p_v, computed as
one reverse pass of sum_v stop_gradient(p_v hhat_v) log p_theta(v | y<t) per
position ("nested" uses (1 / B) sum_b hhat_b log p_theta(v_b | y<t) over its
sampled tokens, also unbiased). ||G_t||^2 is estimated without the upward
bias of a squared mean by the U-statistic over independent groups of units,
(||sum_k g_k||^2 - sum_k ||g_k||^2) / (K (K - 1)), where g_k is the mean of
C over group k. With one unit per group this is the U-statistic over units.

Fisher trace tr F_t(y<t) = sum_v p_v ||grad log p_v||^2: exact by per-token
gradients, or by Hutchinson: with a Rademacher probe z over the parameters,
one jvp gives d_v = grad log p_v . z for all v and positions at once, and
E_z[sum_v p_v d_v^2] = tr F.

References: "Why Is RLHF Alignment Shallow? A Gradient Analysis" (Robin Young).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hi_jax import sampling, sharding
from hi_jax.harms import Harm, as_harm, check_harm_values
from hi_jax.policy import Policy

INFO_METHODS = ("rao_blackwell", "pick_freeze", "plug_in", "nested")
FISHER_METHODS = ("exact", "hutchinson")
MAX_GROUPS = 32
# NOTE: a sanity bound, not a measured limit. It rejects counts whose
# T x B x M continuations per unit would overflow or exhaust memory.
MAX_BRANCHES = 4096
# Continuations from different positions need different numbers of decode
# steps. Positions are split into at most this many contiguous buckets, each
# with one decode loop of static length (the longest in the bucket). More
# buckets discard fewer steps but compile more loops. With T positions in
# buckets of n, about (n - 1) / T of the decode steps are discarded.
MAX_DECODE_LOOPS = 8
# Units are sampled in chunks of whole groups, all units of a chunk in one
# vmap. A chunk contains as many groups as keep the forked caches of its
# continuations within this many bytes (at least one group). Larger chunks
# run fewer, larger operations. But on a CPU, caches much larger than its
# last-level cache are read from memory at every decode step. On the 2-core
# machine of docs/benchmarks.md, a whole I_t profile took 0.89 s with 38 MB
# chunks, 0.93 s with 75 MB and 1.27 s with 300 MB (before the cache layout
# of `transformer` changed).
MAX_CHUNK_CACHE_BYTES = 2**26


class Estimate(NamedTuple):
    """A Monte Carlo estimate: `mean` and its standard error `stderr`.

    Both have the same shape. A stderr of NaN marks a statistic whose
    standard error is not defined (a maximum over samples) or a ratio that
    is undefined (see `MonteCarloProfile`).
    """

    mean: jax.Array
    stderr: jax.Array


class MonteCarloProfile(NamedTuple):
    """Monte Carlo estimates of the per-position quantities; see `ExactProfile`.

    Each field is an `Estimate` with arrays of shape [T] (scalars for `h0`
    and `var_harm`). Estimates of non-negative quantities may come out
    negative through sampling noise; they are reported as they are.

    Attributes:
      h0: E[Harm].
      var_harm: Var(Harm), as the sum over t of the per-unit I_t estimates.
      I: harm information I_t.
      G_norm_sq: ||G_t||^2, the unbiased U-statistic. Its stderr is a
        jackknife over groups. When the estimate is within a few stderrs of
        zero, its distribution is skewed and the stderr shrinks with it, so
        read the stderr as an order of magnitude there.
      cs_pointwise: E_{y<t}[Var(h_t | y<t) * tr F_t(y<t)].
      fisher_trace_mean: E_{y<t}[tr F_t(y<t)].
      fisher_trace_max: the largest tr F_t over the sampled prefixes (stderr
        NaN: not defined for a maximum).
      fisher_bound: F_bar * I_t with F_bar the largest sampled Fisher trace
        over all positions; its stderr treats F_bar as fixed.
      ratio_g_to_cs: ||G_t||^2 / cs_pointwise (at most 1 in expectation).
      ratio_cs_to_bound: cs_pointwise / fisher_bound (at most 1).
        Ratios carry jackknife stderrs and are undefined (NaN) at positions
        where the denominator's estimate is not above twice its stderr plus
        ten float roundings of its scale. There it cannot be distinguished from zero
        (a constant harm, or positions beyond a horizon) and the ratio would
        be noise over noise.
      settings: the estimator settings, a dict.
    """

    h0: Estimate
    var_harm: Estimate
    I: Estimate
    G_norm_sq: Estimate
    cs_pointwise: Estimate
    fisher_trace_mean: Estimate
    fisher_trace_max: Estimate
    fisher_bound: Estimate
    ratio_g_to_cs: Estimate
    ratio_cs_to_bound: Estimate
    settings: dict


@dataclasses.dataclass(frozen=True)
class EstimatorSettings:
    """Static settings of `estimate_profile`; see its docstring."""

    num_sequences: int
    num_continuations: int
    info_method: str
    top_k: int | None
    num_branches: int | None
    fisher_method: str
    num_probes: int
    num_groups: int


def estimate_profile(key: jax.Array, policy: Policy, harm, num_sequences: int = 256,
                     num_continuations: int = 8, info_method: str = "rao_blackwell",
                     top_k: int | None = None, fisher_method: str = "exact",
                     num_probes: int = 4, num_groups: int | None = None,
                     mesh: jax.sharding.Mesh | None = None,
                     num_branches: int | None = None) -> MonteCarloProfile:
    """Estimates I_t, ||G_t||^2, the Fisher traces and the bound per position.

    Args:
      key: a JAX PRNG key (`jax.random.key` or a raw uint32 [2] key).
      policy: any `Policy`.
      harm: a callable from int [B, T] responses to float [B] in [0, 1].
      num_sequences: N >= 3, independent outer samples (prefixes).
      num_continuations: M >= 2 continuations per branch, needed for the
        unbiased U-statistics.
      info_method: "rao_blackwell", "pick_freeze", or the biased "plug_in"
        and "nested".
      top_k: with "rao_blackwell" or "plug_in", the number K in [1, V - 1] of
        most probable candidates to enumerate (the rest is covered by two
        sampled remainder tokens); None enumerates all V.
      num_branches: with "nested", the number B >= 2 of tokens sampled at
        each prefix; None samples V of them, as many branches as
        "rao_blackwell" enumerates.
      fisher_method: "exact" (per-token gradients) or "hutchinson".
      num_probes: Rademacher probes per prefix for "hutchinson", >= 1.
      num_groups: K >= 3 groups of units for the ||G_t||^2 U-statistic and
        the jackknife standard errors; must divide N. The default is the
        largest divisor of N not above 32.
      mesh: a one-axis `jax.sharding.Mesh` over which the outer samples of
        each group are sharded (for example `sharding.batch_mesh()` over all
        local devices); N / num_groups must be divisible by its size. None
        runs on the default device. The numbers do not depend on the mesh,
        up to float32 rounding (about 1e-6 relative).

    Returns:
      A `MonteCarloProfile` of [T] estimates.

    Raises:
      TypeError: if `key` is not a PRNG key.
      ValueError: for settings out of range, or if the harm returns values
        outside [0, 1], NaN, or the wrong shape.
    """
    harm = as_harm(harm)
    settings = _validate_settings(key, policy, num_sequences, num_continuations,
                                  info_method, top_k, fisher_method, num_probes,
                                  num_groups, num_branches)
    harm.check_compatible(policy.vocab_size, policy.response_length)
    _probe_harm(harm, policy)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    unit_sharding = None
    if mesh is not None:
        unit_sharding = sharding.unit_sharding(mesh, settings.num_sequences,
                                               settings.num_groups)
    raw = _estimate_raw(key, policy, harm, settings, _groups_per_chunk(policy, settings),
                        unit_sharding)
    raw = jax.device_get(raw)
    check_harm_values(harm.name, np.array([raw["harm_min"], raw["harm_max"]]))
    if raw["harm_nan"] > 0:
        check_harm_values(harm.name, np.array([np.nan]))
    return _summarise(raw, settings)


def _validate_settings(key, policy, num_sequences, num_continuations, info_method,
                       top_k, fisher_method, num_probes, num_groups, num_branches):
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a hi_jax Policy; got {type(policy).__name__}")
    check_prng_key(key)
    V = policy.vocab_size
    _check_int("num_sequences", num_sequences, 3)
    _check_int("num_continuations", num_continuations, 2,
               "unbiased estimators need at least 2 continuations per branch")
    if info_method not in INFO_METHODS:
        raise ValueError(f"info_method must be one of {INFO_METHODS}; got {info_method!r}")
    if fisher_method not in FISHER_METHODS:
        raise ValueError(
            f"fisher_method must be one of {FISHER_METHODS}; got {fisher_method!r}")
    if top_k is not None:
        if info_method not in ("rao_blackwell", "plug_in"):
            raise ValueError(f"top_k applies to info_method 'rao_blackwell' or "
                             f"'plug_in', which enumerate tokens; got info_method="
                             f"{info_method!r}")
        _check_int("top_k", top_k, 1)
        if top_k > V - 1:
            raise ValueError(f"top_k must be in [1, V - 1] = [1, {V - 1}], or None to "
                             f"enumerate all tokens; got {top_k}")
    if num_branches is not None:
        if info_method != "nested":
            raise ValueError(f"num_branches applies to info_method 'nested' only; got "
                             f"info_method={info_method!r}")
        _check_int("num_branches", num_branches, 2,
                   "the sample variance needs at least 2 branches")
        if num_branches > MAX_BRANCHES:
            raise ValueError(f"num_branches must be in [2, MAX_BRANCHES] = [2, "
                             f"{MAX_BRANCHES}]; got {num_branches}")
    elif info_method == "nested":
        num_branches = V
    _check_int("num_probes", num_probes, 1)
    if num_groups is None:
        num_groups = default_num_groups(num_sequences)
        if num_groups < 3:
            raise ValueError(
                f"num_sequences={num_sequences} has no divisor in [3, {MAX_GROUPS}] to "
                "use as num_groups; pass num_groups explicitly or choose a "
                "num_sequences with such a divisor")
    _check_int("num_groups", num_groups, 3)
    if num_sequences % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide num_sequences="
                         f"{num_sequences}")
    return EstimatorSettings(int(num_sequences), int(num_continuations), info_method,
                             None if top_k is None else int(top_k),
                             None if num_branches is None else int(num_branches),
                             fisher_method,
                             int(num_probes), int(num_groups))


def default_num_groups(num_sequences: int) -> int:
    """Returns the default number of groups: the largest divisor of N up to `MAX_GROUPS`."""
    return max(d for d in range(1, min(num_sequences, MAX_GROUPS) + 1)
               if num_sequences % d == 0)


def _check_int(name, value, minimum, reason=""):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        suffix = f" ({reason})" if reason else ""
        raise ValueError(f"{name} must be >= {minimum}; got {value}{suffix}")


def check_prng_key(key, name: str = "key") -> None:
    """Raises TypeError unless `key` is a typed PRNG key or a raw uint32 [2] key."""
    if isinstance(key, jax.Array) or isinstance(key, np.ndarray):
        dtype = key.dtype
        if jnp.issubdtype(dtype, jax.dtypes.prng_key) and key.shape == ():
            return
        if dtype == jnp.uint32 and key.shape == (2,):
            return
        raise TypeError(f"{name} must be a single PRNG key (jax.random.key(seed)); "
                        f"got an array of dtype {dtype} and shape {key.shape}")
    raise TypeError(f"{name} must be a PRNG key (jax.random.key(seed)); got "
                    f"{type(key).__name__} {key!r}")


def _probe_harm(harm: Harm, policy: Policy) -> None:
    """Checks the harm's output shape and values on a few token arrays, eagerly."""
    V, T = policy.vocab_size, policy.response_length
    probe = np.stack([np.zeros(T, np.int32), np.full(T, V - 1, np.int32),
                      np.arange(T, dtype=np.int32) % V])
    check_harm_values(harm.name, harm(jnp.asarray(probe)), batch_size=probe.shape[0])


def _u_square(values: jax.Array) -> jax.Array:
    """Unbiased estimate of (E x)^2 from M i.i.d. values on the last axis."""
    M = values.shape[-1]
    total = values.sum(-1)
    return (total**2 - (values**2).sum(-1)) / (M * (M - 1))


def _tree_sq_norm_per_row(tree, rows: int) -> jax.Array:
    return sum(jnp.sum(leaf.reshape(rows, -1)**2, axis=1) for leaf in jax.tree.leaves(tree))


def _candidates(key, probs, top_k, V):
    """Branch candidates and weights for one prefix.

    Returns:
      tokens int [C], weights float [C] (p_v for enumerated tokens, p_R for
      each remainder draw), and `is_remainder` bool [C].
    """
    if top_k is None:
        return (jnp.arange(V), probs, jnp.zeros((V,), bool))
    top_probs, top_tokens = jax.lax.top_k(probs, top_k)
    remainder_mass = jnp.clip(1.0 - top_probs.sum(), 0.0, 1.0)
    masked = jnp.log(probs).at[top_tokens].set(-jnp.inf)
    # When the remainder has no mass its draws carry zero weight.
    masked = jnp.where(remainder_mass > 0, masked, jnp.zeros_like(masked))
    draws = jax.random.categorical(key, masked, shape=(2,))
    tokens = jnp.concatenate([top_tokens, draws])
    weights = jnp.concatenate([top_probs, jnp.full((2,), remainder_mass)])
    is_remainder = jnp.arange(top_k + 2) >= top_k
    return tokens, weights, is_remainder


def _branch_info(harm_values, weights, is_remainder, plug_in):
    """Var(h_t | y<t) estimate and C_t coefficients from branched continuations.

    Args:
      harm_values: float [C, M], harm of the M continuations of each candidate.
      weights: float [C]; see `_candidates`.
      is_remainder: bool [C]; at most two True entries, the remainder draws.
      plug_in: use the biased plug-in form.

    Returns:
      (variance estimate scalar, per-candidate coefficient [C] of
      log p(candidate) in the C_t surrogate).
    """
    enumerated = jnp.where(is_remainder, 0.0, weights)
    # Remainder draws each stand for half the remainder mass.
    remainder = jnp.where(is_remainder, weights / 2, 0.0)
    # The variance estimate is exactly invariant to shifting all harm values
    # by one constant (the weights sum to 1), so centring on the weighted
    # mean changes nothing but the float32 cancellation error.
    raw_h_hat = harm_values.mean(-1)  # [C]
    centre = jax.lax.stop_gradient(((enumerated + remainder) * raw_h_hat).sum())
    harm_values = harm_values - centre
    h_hat = raw_h_hat - centre
    h_sq = (h_hat**2) if plug_in else _u_square(harm_values)  # [C]
    first_moment_sq_terms = enumerated * h_sq + remainder * h_sq
    mean_enumerated = (enumerated * h_hat).sum()
    if plug_in:
        mean_remainder = (remainder * h_hat).sum()
        mean_sq = (mean_enumerated + mean_remainder)**2
    else:
        # (sum_v p_v h_v)^2 over enumerated tokens with U-statistic diagonals.
        enum_sq = mean_enumerated**2 - (enumerated**2 * h_hat**2).sum() \
            + (enumerated**2 * h_sq).sum()
        remainder_draws = jnp.where(is_remainder, weights * h_hat, 0.0)
        # p_R^2 h_w1 h_w2 uses the two independent draws; the product of all
        # remainder terms minus their squares leaves exactly that cross term.
        cross_remainder = remainder_draws.sum()**2 - (remainder_draws**2).sum()
        mean_sq = enum_sq + 2 * mean_enumerated * (remainder * h_hat).sum() \
            + cross_remainder / 2
    variance = first_moment_sq_terms.sum() - mean_sq
    coefficients = (enumerated + remainder) * raw_h_hat
    return variance, coefficients


def _unit(key, policy: Policy, harm: Harm, settings: EstimatorSettings):
    """Compute all per-position statistics of one outer sample.

    Returns a dict of float [T] arrays (`harm`, a scalar), the response
    `tokens` int [T], and `coefficients` float [T, V], the stop-gradient
    weights of log p(v | y<t) whose gradient is the C_t estimate.
    """
    V, T = policy.vocab_size, policy.response_length
    M = settings.num_continuations
    keys = dict(zip(("prefix", "continuation", "remainder", "probe"),
                    jax.random.split(key, 4)))
    tokens = sampling.sample_responses(keys["prefix"], policy, 1)[0]  # [T]
    prefilled = sampling.prefill_one(policy, tokens)
    logp = jax.nn.log_softmax(prefilled[0], axis=-1)  # [T, V]
    probs = jnp.exp(logp)
    positions = jnp.arange(T)
    harm_seen = []

    if settings.info_method == "pick_freeze":
        starts = jnp.arange(T + 1)
        cont_keys = jax.random.split(keys["continuation"], T + 1)

        def continue_bucket(first, last):
            def one(k, s):
                return sampling.continue_prefilled(k, policy, prefilled, tokens, s, M,
                                                   num_steps=T - first)
            return jax.vmap(one)(cont_keys[first:last], starts[first:last])

        continuations = _by_buckets(continue_bucket, T + 1)  # [T + 1, M, T]
        harm_values = harm(continuations.reshape(-1, T)).reshape(T + 1, M)
        harm_seen.append(harm_values)
        squares = _u_square(harm_values)  # [T + 1]; index s: h_{s-1}^2
        variance = squares[1:] - squares[:-1]
        h_mean = harm_values.mean(-1)
        # Single-sample C_t with the independent baseline from y<t.
        coefficients = jnp.zeros((T, V)).at[positions, tokens].set(
            h_mean[1:] - h_mean[:-1])
    else:
        cand_keys = jax.random.split(keys["remainder"], T)
        if settings.info_method == "nested":
            tokens_c = jax.vmap(lambda k, lp: jax.random.categorical(
                k, lp, shape=(settings.num_branches,)))(cand_keys, logp)  # [T, B]
        else:
            tokens_c, weights, is_remainder = jax.vmap(
                lambda k, p: _candidates(k, p, settings.top_k, V))(cand_keys, probs)
        C = tokens_c.shape[1]
        cont_keys = jax.random.split(keys["continuation"], (T, C))

        def branch_bucket(first, last):
            def branch(k, t, v):
                return sampling.branch_prefilled(k, policy, prefilled, tokens, t, v, M,
                                                 num_steps=T - 1 - first)
            return jax.vmap(jax.vmap(branch, in_axes=(0, None, 0)))(
                cont_keys[first:last], positions[first:last], tokens_c[first:last])

        continuations = _by_buckets(branch_bucket, T)  # [T, C, M, T]
        harm_values = harm(continuations.reshape(-1, T)).reshape(T, C, M)
        harm_seen.append(harm_values)
        if settings.info_method == "nested":
            branch_means = harm_values.mean(-1)  # [T, B]
            variance = branch_means.var(-1, ddof=1)
            # Each sampled token stands for 1 / B of the expectation over v.
            cand_coefficients = branch_means / C
        else:
            variance, cand_coefficients = jax.vmap(
                lambda h, w, r: _branch_info(h, w, r, settings.info_method == "plug_in")
            )(harm_values, weights, is_remainder)
        coefficients = jax.vmap(
            lambda c, tok: jnp.zeros((V,), c.dtype).at[tok].add(c))(
                cand_coefficients, tokens_c)
    coefficients = jax.lax.stop_gradient(coefficients)

    def log_probs_of(params):
        return policy.replace_params(params).log_probs(tokens[None])[0]  # [T, V]

    if settings.fisher_method == "exact":
        fisher = _exact_fisher_traces(log_probs_of, policy.params, probs)
    else:
        fisher = _hutchinson_fisher_traces(keys["probe"], log_probs_of, policy.params,
                                           probs, settings.num_probes)

    all_harm = jnp.concatenate([h.reshape(-1) for h in harm_seen])
    return dict(harm=harm(tokens[None])[0], variance=variance, fisher=fisher,
                cs=variance * fisher, tokens=tokens, coefficients=coefficients,
                harm_min=all_harm.min(),
                harm_max=all_harm.max(), harm_nan=jnp.isnan(all_harm).sum())


def _by_buckets(fn, count: int) -> jax.Array:
    """Concatenates fn(first, last) over contiguous buckets of range(count).

    `fn` returns an array whose leading axis has last - first entries; see
    `MAX_DECODE_LOOPS`.
    """
    edges = np.linspace(0, count, min(count, MAX_DECODE_LOOPS) + 1).round().astype(int)
    parts = [fn(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return jnp.concatenate(parts, axis=0)


def _exact_fisher_traces(log_probs_of, params, probs):
    """tr F_t = sum_v p_v ||grad log p_v(y<t)||^2 by T*V reverse passes: [T]."""
    T, V = probs.shape
    _, vjp = jax.vjp(lambda p: log_probs_of(p).reshape(-1), params)
    basis = jnp.eye(T * V, dtype=probs.dtype)

    def sq_norm(row):
        (grad,) = vjp(row)
        return sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(grad))

    sq_norms = jax.lax.map(sq_norm, basis, batch_size=V).reshape(T, V)
    return (probs * sq_norms).sum(-1)


def rademacher_from_bits(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Draws independent uniform signs (+1 or -1) of `shape`, 32 from each random word.

    `jax.random.rademacher` runs the generator once per value. Every bit of
    a generated uint32 word is an independent fair coin, so this draws
    ceil(size / 32) words and unpacks their bits, which makes the probes of
    a Hutchinson estimate about as cheap as reading them.
    """
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating-point type for signs of -1 and +1; "
                         f"got {jnp.dtype(dtype)}")
    if any(int(n) < 0 for n in shape):
        raise ValueError(f"shape must have non-negative sizes; got {tuple(shape)}")
    size = int(np.prod(shape, dtype=np.int64))
    words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    signs = 1 - 2 * bits.reshape(-1)[:size].astype(dtype)
    return signs.reshape(shape)


def _hutchinson_fisher_traces(key, log_probs_of, params, probs, num_probes):
    """Hutchinson estimate of tr F_t with Rademacher probes and forward-mode jvp: [T]."""
    leaves, treedef = jax.tree.flatten(params)

    def one_probe(probe_key):
        probe_keys = jax.random.split(probe_key, len(leaves))
        probe = [rademacher_from_bits(k, leaf.shape, leaf.dtype)
                 for k, leaf in zip(probe_keys, leaves)]
        _, directional = jax.jvp(log_probs_of, (params,),
                                 (jax.tree.unflatten(treedef, probe),))
        return (probs * directional**2).sum(-1)

    return jax.vmap(one_probe)(jax.random.split(key, num_probes)).mean(0)


def _groups_per_chunk(policy: Policy, settings: EstimatorSettings) -> int:
    """Number of groups whose units are vmapped together; see `MAX_CHUNK_CACHE_BYTES`.

    The largest divisor of num_groups whose units' forked caches fit in the
    budget, and at least 1.
    """
    K = settings.num_groups
    per_group = settings.num_sequences // K
    T, V, M = policy.response_length, policy.vocab_size, settings.num_continuations
    if settings.info_method == "pick_freeze":
        rows = (T + 1) * M
    elif settings.info_method == "nested":
        rows = T * settings.num_branches * M
    else:
        rows = T * (V if settings.top_k is None else settings.top_k + 2) * M
    cache = jax.eval_shape(policy.prefill, jax.ShapeDtypeStruct((1, T), jnp.int32))[1]
    row_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
    unit_bytes = max(per_group * rows * row_bytes, 1)
    fitting = max(MAX_CHUNK_CACHE_BYTES // unit_bytes, 1)
    return max(g for g in range(1, K + 1) if K % g == 0 and g <= fitting)


@functools.partial(jax.jit, static_argnames=("harm", "settings", "chunk", "unit_sharding"))
def _estimate_raw(key, policy, harm, settings: EstimatorSettings, chunk: int,
                  unit_sharding=None):
    """Computes all per-unit and per-group statistics, vmapping `chunk` groups together."""
    K = settings.num_groups
    per_group = settings.num_sequences // K
    T = policy.response_length
    unit_keys = jax.random.split(key, settings.num_sequences)
    unit_keys = unit_keys.reshape((K // chunk, chunk, per_group) + unit_keys.shape[1:])
    if unit_sharding is not None:
        unit_keys = jax.lax.with_sharding_constraint(unit_keys, unit_sharding)

    def group_gradients(tokens, coefficients):
        # The group's sum of C_t as one reverse pass per position over the
        # summed surrogate, rather than per-unit gradients summed afterwards.
        def surrogate(params):
            log_probs = policy.replace_params(params).log_probs(tokens)  # [n, T, V]
            return (coefficients * log_probs).sum(axis=(0, 2))  # [T]

        return jax.jacrev(surrogate)(policy.params)

    def groups(keys):
        # Sampling is vmapped over every unit of the chunk's groups. The
        # gradients, whose outputs have T x P entries, are mapped per group.
        stats = jax.vmap(jax.vmap(lambda k: _unit(k, policy, harm, settings)))(keys)
        tokens, coefficients = stats.pop("tokens"), stats.pop("coefficients")
        grads = jax.lax.map(lambda tc: group_gradients(*tc), (tokens, coefficients))
        return stats, grads

    stats, grad_sums = jax.lax.map(groups, unit_keys)
    stats = {name: value.reshape((K,) + value.shape[2:]) for name, value in stats.items()}
    grad_sums = jax.tree.map(lambda g: g.reshape((K,) + g.shape[2:]), grad_sums)
    # Group means g_k of C_t; the U-statistic needs only their inner products.
    group_means = jax.tree.map(lambda g: g / per_group, grad_sums)  # [K, T, ...]
    total = jax.tree.map(lambda g: g.sum(0), group_means)  # [T, ...]
    dots = sum(jnp.sum((g * s[None]).reshape(K, T, -1), axis=-1)
               for g, s in zip(jax.tree.leaves(group_means), jax.tree.leaves(total)))
    sq_norms = sum(jnp.sum(g.reshape(K, T, -1)**2, axis=-1)
                   for g in jax.tree.leaves(group_means))  # [K, T]
    total_sq = _tree_sq_norm_per_row(total, T)  # [T]
    flat = {name: value.reshape((settings.num_sequences,) + value.shape[2:])
            for name, value in stats.items()}
    flat["group_dots"] = dots
    flat["group_sq_norms"] = sq_norms
    flat["total_sq"] = total_sq
    flat["harm_min"] = stats["harm_min"].min()
    flat["harm_max"] = stats["harm_max"].max()
    flat["harm_nan"] = stats["harm_nan"].sum()
    return flat


def _mean_stderr(values: np.ndarray) -> Estimate:
    n = values.shape[0]
    return Estimate(values.mean(0), values.std(0, ddof=1) / np.sqrt(n))


def _jackknife(leave_one_out: np.ndarray, full: np.ndarray) -> Estimate:
    """Jackknife standard error from K leave-one-group-out values [K, ...]."""
    K = leave_one_out.shape[0]
    spread = ((leave_one_out - leave_one_out.mean(0))**2).sum(0)
    return Estimate(full, np.sqrt((K - 1) / K * spread))


def _undefined_unless(ratio: Estimate, denominator: Estimate, floor: float) -> Estimate:
    """NaN where the denominator is not above twice its stderr plus `floor`."""
    defined = denominator.mean > 2 * denominator.stderr + floor
    return Estimate(np.where(defined, ratio.mean, np.nan),
                    np.where(defined, ratio.stderr, np.nan))


def _safe_ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _summarise(raw: dict, settings: EstimatorSettings) -> MonteCarloProfile:
    K = settings.num_groups
    n = settings.num_sequences
    per_group = n // K
    info = np.asarray(raw["variance"])  # [N, T]
    cs = np.asarray(raw["cs"])
    fisher = np.asarray(raw["fisher"])
    harm = np.asarray(raw["harm"])

    # ||G_t||^2 U-statistic over groups and its leave-one-group-out values.
    dots, sq_norms, total_sq = raw["group_dots"], raw["group_sq_norms"], raw["total_sq"]
    g_norm_sq = (total_sq - sq_norms.sum(0)) / (K * (K - 1))
    loo_total_sq = total_sq[None] - 2 * dots + sq_norms
    loo_sq_sum = sq_norms.sum(0)[None] - sq_norms
    g_loo = (loo_total_sq - loo_sq_sum) / ((K - 1) * (K - 2))

    def group_loo(values):
        by_group = values.reshape((K, per_group) + values.shape[1:]).sum(1)
        return (by_group.sum(0)[None] - by_group) / (n - per_group)

    fisher_max_all = fisher.max()
    cs_loo, info_loo = group_loo(cs), group_loo(info)
    cs_mean, info_mean = cs.mean(0), info.mean(0)
    nan_t = np.full(info.shape[1], np.nan)
    ratio_g = _jackknife(_safe_ratio(g_loo, cs_loo), _safe_ratio(g_norm_sq, cs_mean))
    ratio_cs = _jackknife(_safe_ratio(cs_loo, fisher_max_all * info_loo),
                          _safe_ratio(cs_mean, fisher_max_all * info_mean))
    info_estimate = _mean_stderr(info)
    cs_estimate = _mean_stderr(cs)
    # Conditional variances are at most 1/4 for harms in [0, 1].
    rounding = 10 * np.finfo(info.dtype).eps * 0.25
    ratio_g = _undefined_unless(ratio_g, cs_estimate, rounding * max(fisher_max_all, 1.0))
    ratio_cs = _undefined_unless(ratio_cs, info_estimate, rounding)
    settings_dict = dataclasses.asdict(settings)
    return MonteCarloProfile(
        h0=_mean_stderr(harm),
        var_harm=_mean_stderr(info.sum(1)),
        I=info_estimate,
        G_norm_sq=_jackknife(g_loo, g_norm_sq),
        cs_pointwise=cs_estimate,
        fisher_trace_mean=_mean_stderr(fisher),
        fisher_trace_max=Estimate(fisher.max(0), nan_t),
        fisher_bound=Estimate(fisher_max_all * info_estimate.mean,
                              fisher_max_all * info_estimate.stderr),
        ratio_g_to_cs=ratio_g,
        ratio_cs_to_bound=ratio_cs,
        settings=settings_dict,
    )


def profile_to_dict(profile) -> dict[str, Any]:
    """JSON-ready dict of a `MonteCarloProfile` or `ExactProfile`.

    Monte Carlo fields become {"mean": [...], "stderr": [...]}; exact fields
    become lists. NaN and infinities become None (JSON has no NaN).
    """
    out = {}
    for name, value in profile._asdict().items():
        if name == "G" or value is None:
            continue
        if name == "settings":
            out[name] = dict(value)
        elif isinstance(value, Estimate):
            out[name] = {"mean": _to_json(value.mean), "stderr": _to_json(value.stderr)}
        else:
            out[name] = _to_json(value)
    return out


def _to_json(array):
    array = np.asarray(array, dtype=float)
    if array.ndim == 0:
        value = float(array)
        return value if np.isfinite(value) else None
    return [_to_json(a) for a in array]
