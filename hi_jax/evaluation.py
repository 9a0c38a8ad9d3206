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

from hi_jax import world as world_lib
from hi_jax.estimators import Estimate, estimate_profile
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
    """The per-position KL at given prefixes, int [N, T] (for example Q): [T]."""
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
    completes them; a completion is harmful when it emits harmful content
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
    """All summary quantities of one model, on the keys and prefixes shared by all models.

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
