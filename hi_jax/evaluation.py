"""Evaluation of aligned models in the synthetic refusal world.

Every function takes explicit keys, so the base, standard-aligned and
deep-aligned models are compared on the same prefixes and the same random
draws. Each result is an `Estimate` (mean and stderr per position or per
prefill length) over independent samples; a stderr of 0 marks an exact value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hi_jax import sampling
from hi_jax import world as world_lib
from hi_jax.estimators import Estimate, estimate_profile
from hi_jax.harms import as_harm
from hi_jax.objectives import per_token_kl
from hi_jax.policy import Policy
from hi_jax.sampling import sample_from_prefixes, sample_responses


def _mean_stderr(values: jax.Array) -> Estimate:
    """Mean and standard error over axis 0 of float [N, ...]."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    return Estimate(values.mean(0), values.std(0, ddof=1) / np.sqrt(n))


@functools.partial(jax.jit, static_argnames=("num",))
def _on_policy_kl(key, policy, base_policy, num):
    tokens = sample_responses(key, policy, num)
    return per_token_kl(policy, base_policy, tokens)


def kl_per_position(key: jax.Array, policy: Policy, base_policy: Policy,
                    num: int) -> Estimate:
    """D_KL^(t) = E_{y<t ~ P_theta}[KL(P_theta(.|y<t) || P_base(.|y<t))]: [T].

    Prefixes are sampled from `policy`; the KL at each prefix is exact over
    the vocabulary. `num` (N >= 2) is the number of sampled responses.
    """
    return _mean_stderr(_on_policy_kl(key, policy, base_policy, num))


def kl_per_position_on_prefixes(policy: Policy, base_policy: Policy,
                                prefixes: jax.Array) -> Estimate:
    """Compute the per-position KL at given prefixes, int [N, T] (for example Q): [T]."""
    return _mean_stderr(jax.jit(per_token_kl)(policy, base_policy, prefixes))


def recovery_profile(policy: Policy, world, q_prefixes: jax.Array) -> Estimate:
    """P_theta(y_t in R | y<t) at every depth t over harmful prefixes int [N, T]: [T]."""
    return _mean_stderr(world_lib.recovery_probability(policy, world, q_prefixes))


@functools.partial(jax.jit, static_argnames=("world",))
def _complete_and_judge(key, policy, world, prefixes, prefill):
    completions = sample_from_prefixes(key, policy, prefixes, prefill, 1)[:, 0]
    return world_lib.true_harm_after_prefill(world, completions, prefill)


def harm_rate_vs_prefill(key: jax.Array, policy: Policy, world, num: int) -> Estimate:
    """True-harm rate of completions after prefilling l harmful tokens, l = 0..T-1: [T].

    For each l, N harmful teacher prefixes are cut to length l and the policy
    completes them. A completion is harmful when it emits harmful content
    after the prefill (see `world.true_harm_after_prefill`). At l = 0 this is
    the ordinary harmful-response rate.
    """
    T = world.response_length
    key_q, key_sample = jax.random.split(key)
    q_tokens, _ = world_lib.sample_q_prefixes_by_length(key_q, world, num, list(range(T)))
    # [T, N, T] prefixes, N per prefill length; one completion each.
    prefill = jnp.repeat(jnp.arange(T), num)
    harmful = _complete_and_judge(key_sample, policy, world,
                                  q_tokens.reshape(T * num, T), prefill)
    return _mean_stderr(harmful.reshape(T, num).T)


def bound_profile(key: jax.Array, policy: Policy, harm, num_sequences: int,
                  num_continuations: int, **options) -> dict[str, Estimate]:
    """I_t, ||G_t||^2, cs_pointwise and F_bar * I_t for `harm` under `policy`."""
    profile = estimate_profile(key, policy, harm, num_sequences=num_sequences,
                               num_continuations=num_continuations, **options)
    return {"harm_information": profile.I, "G_norm_sq": profile.G_norm_sq,
            "cs_pointwise": profile.cs_pointwise, "fisher_bound": profile.fisher_bound}


def evaluate_model(keys: dict[str, jax.Array], policy: Policy, base_policy: Policy,
                   world, q_prefixes: jax.Array, settings) -> dict[str, Estimate]:
    """Evaluate all summary quantities of one model on the keys and prefixes shared by all models.

    Args:
      keys: PRNG keys named "kl", "profile" and "attack"; pass the same keys
        for every model compared.
      policy: the model to evaluate.
      base_policy: the base model the KL is measured from.
      world: the `WorldConfig`.
      q_prefixes: int [N, T] harmful prefixes of full length (Q at l = T).
      settings: a ConfigDict with num_eval_sequences, num_continuations,
        info_method and fisher_method.

    Returns:
      A dict of `Estimate`s indexed by position (by prefill length for
      "harm_rate_vs_prefill").
    """
    harm = world_lib.training_harm(world)
    result = {
        "kl_per_position": kl_per_position(keys["kl"], policy, base_policy,
                                           settings.num_eval_sequences),
        "kl_per_position_on_q": kl_per_position_on_prefixes(policy, base_policy,
                                                            q_prefixes),
        "recovery_probability": recovery_profile(policy, world, q_prefixes),
        "harm_rate_vs_prefill": harm_rate_vs_prefill(keys["attack"], policy, world,
                                                     settings.num_eval_sequences),
    }
    result.update(bound_profile(keys["profile"], policy, harm,
                                settings.num_profile_sequences,
                                settings.num_continuations,
                                info_method=settings.info_method,
                                fisher_method=settings.fisher_method))
    return result


def estimate_to_dict(estimate: Estimate) -> dict[str, list]:
    """{"mean": [...], "stderr": [...]} with NaN and infinities as None."""

    def clean(values):
        return [float(v) if np.isfinite(v) else None for v in np.asarray(values).ravel()]

    return {"mean": clean(estimate.mean), "stderr": clean(estimate.stderr)}


def _tilt_covariance_unit(key, policy, base_policy, harm, num_continuations):
    """Per-position Cov_{y_t|y<t}(h_t, log P/P_base) at the prefixes of one sample: [T]."""
    V, T = policy.vocab_size, policy.response_length
    key_prefix, key_branch = jax.random.split(key)
    tokens = sample_responses(key_prefix, policy, 1)[0]
    prefilled = sampling.prefill_one(policy, tokens)
    log_probs = jax.nn.log_softmax(prefilled[0], axis=-1)  # [T, V]
    base_log_probs = base_policy.log_probs(tokens[None])[0]
    probs = jnp.exp(log_probs)
    log_ratio = log_probs - base_log_probs
    centred_ratio = log_ratio - (probs * log_ratio).sum(-1, keepdims=True)
    keys = jax.random.split(key_branch, (T, V))

    def branch(k, t, v):
        return sampling.branch_prefilled(k, policy, prefilled, tokens, t, v,
                                         num_continuations)

    continuations = jax.vmap(jax.vmap(branch, in_axes=(0, None, 0)), in_axes=(0, 0, None))(
        keys, jnp.arange(T), jnp.arange(V))  # [T, V, M, T]
    h_hat = harm(continuations.reshape(-1, T)).reshape(T, V, num_continuations).mean(-1)
    # sum_v p_v (r_v - rbar) = 0, so the covariance is linear in h_hat and
    # unbiased; centring h_hat changes it only by rounding, and removes that.
    centred_h = h_hat - (probs * h_hat).sum(-1, keepdims=True)
    return (probs * centred_h * centred_ratio).sum(-1)


@functools.partial(jax.jit, static_argnames=("harm", "num", "num_continuations"))
def _tilt_covariance(key, policy, base_policy, harm, num, num_continuations):
    keys = jax.random.split(key, num)
    return jax.vmap(lambda k: _tilt_covariance_unit(k, policy, base_policy, harm,
                                                    num_continuations))(keys)


def harm_tilt_covariance(key: jax.Array, policy: Policy, base_policy: Policy, harm,
                         num: int, num_continuations: int = 4) -> Estimate:
    """E_{y<t}[Cov_{y_t|y<t}(h_t, log P(y_t|y<t) / P_base(y_t|y<t))] per position: [T].

    At an optimum of lam * E[Harm] + KL(P || P_base) the tilt of each
    conditional away from the base is driven by the harm martingale, so
    beyond a harm's horizon, where h_t does not depend on y_t, this
    covariance is zero whatever the KL there. Estimated without bias from
    `num` (N >= 2) sampled prefixes, branching on every token with
    `num_continuations` (M >= 1) continuations each; h_t is under `policy`.
    """
    harm = as_harm(harm)
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"num must be an integer >= 2; got {num!r}")
    if (isinstance(num_continuations, bool) or not isinstance(num_continuations, int)
            or num_continuations < 1):
        raise ValueError(f"num_continuations must be an integer >= 1; got "
                         f"{num_continuations!r}")
    return _mean_stderr(_tilt_covariance(key, policy, base_policy, harm, num,
                                         num_continuations))
