"""Bayesian fit of the equilibrium scaling law of the per-position KL.

For a decoupled (tabular) model, the optimum of lam * E_P[Harm] +
KL(P || P_base) has D_KL^(t) = (lam**2 / 2) * I_t + O(lam**3), with I_t the
harm information under P_base. `fit_kl_scaling` fits the free-exponent form

    log D_KL^(t) = a * log(lam) + b * log(I_t) + c + noise,
    noise ~ Normal(0, sigma),

with NUTS in numpyro, so that the exponents a (predicted 2) and b
(predicted 1) and the constant c (predicted log(1/2)) come with posterior
intervals.

References:
  Robin Young, "Why Is RLHF Alignment Shallow? A Gradient Analysis".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS

# Prior scales. The data span many units of log D, so these priors are wide
# enough that the likelihood decides the posterior.
_EXPONENT_PRIOR_SCALE = 10.0
_INTERCEPT_PRIOR_SCALE = 10.0
_NOISE_PRIOR_SCALE = 1.0

# The model has four parameters (a, b, c, sigma).
MIN_OBSERVATIONS = 5

PARAMETERS = ("a", "b", "c", "sigma")


class ParameterSummary(NamedTuple):
    """Posterior summary of one scalar parameter.

    Attributes:
      mean: posterior mean.
      std: posterior standard deviation.
      lower, upper: the equal-tailed interval holding `ScalingFit.interval`
        of the posterior mass.
      r_hat: split Gelman-Rubin statistic over chains (NaN with one chain
        shorter than 4 draws).
      effective_sample_size: effective number of independent draws.
    """
    mean: float
    std: float
    lower: float
    upper: float
    r_hat: float
    effective_sample_size: float


class ScalingFit(NamedTuple):
    """Result of `fit_kl_scaling`.

    Attributes:
      summary: parameter name ("a", "b", "c", "sigma") -> ParameterSummary.
      samples: parameter name -> float [C * S] posterior draws of all chains.
      interval: the posterior mass inside each [lower, upper].
      num_observations: N, the number of (lam, I_t, D_KL^(t)) triples fitted.
    """
    summary: dict[str, ParameterSummary]
    samples: dict[str, np.ndarray]
    interval: float
    num_observations: int

    def to_dict(self) -> dict:
        """Returns the summary as plain floats for JSON."""
        return {"interval": self.interval, "num_observations": self.num_observations,
                **{name: _finite_or_none(s._asdict()) for name, s in self.summary.items()}}


def _finite_or_none(values: dict) -> dict:
    return {key: (float(value) if np.isfinite(value) else None)
            for key, value in values.items()}


def kl_scaling_model(log_lam, log_info, log_kl=None):
    """The numpyro model of the scaling law, with centred predictors.

    Centring (subtracting the means of the data) decorrelates the intercept
    from the slopes, which NUTS samples much faster. The model records c on
    the original scale as a deterministic site:

        log_kl - mean(log_kl) = a * (log_lam - mean) + b * (log_info - mean)
                                + alpha + noise,
        c = mean(log_kl) + alpha - a * mean(log_lam) - b * mean(log_info).

    Priors: a, b ~ Normal(0, 10), alpha ~ Normal(0, 10), sigma ~ HalfNormal(1).

    Args:
      log_lam: float [N], log(lam) of each observation.
      log_info: float [N], log(I_t) of each observation.
      log_kl: float [N], log(D_KL^(t)), or None to sample from the prior
        predictive. Its mean is taken from the data, so it is required when
        the centring constant matters (always, for fitting).
    """
    lam_mean = jnp.mean(log_lam)
    info_mean = jnp.mean(log_info)
    kl_mean = 0.0 if log_kl is None else jnp.mean(log_kl)
    a = numpyro.sample("a", dist.Normal(0.0, _EXPONENT_PRIOR_SCALE))
    b = numpyro.sample("b", dist.Normal(0.0, _EXPONENT_PRIOR_SCALE))
    alpha = numpyro.sample("alpha", dist.Normal(0.0, _INTERCEPT_PRIOR_SCALE))
    sigma = numpyro.sample("sigma", dist.HalfNormal(_NOISE_PRIOR_SCALE))
    numpyro.deterministic("c", kl_mean + alpha - a * lam_mean - b * info_mean)
    mean = a * (log_lam - lam_mean) + b * (log_info - info_mean) + alpha
    observed = None if log_kl is None else log_kl - kl_mean
    with numpyro.plate("observations", log_lam.shape[0]):
        numpyro.sample("centred_log_kl", dist.Normal(mean, sigma), obs=observed)


def fit_kl_scaling(key: jax.Array, lam, info, kl, num_warmup: int = 500,
                   num_samples: int = 1000, num_chains: int = 2,
                   interval: float = 0.9) -> ScalingFit:
    """Fits log D_KL^(t) = a * log(lam) + b * log(I_t) + c + noise with NUTS.

    Chains run one after another (`chain_method="sequential"`), so the fit
    needs no extra devices.

    Args:
      key: PRNG key of the sampler.
      lam: float [N], harm weights, finite and > 0.
      info: float [N], harm information I_t under P_base, finite and > 0.
      kl: float [N], per-position KL at the optimum, finite and > 0.
      num_warmup: NUTS adaptation steps per chain, >= 1.
      num_samples: kept draws per chain, >= 1.
      num_chains: independent chains, >= 1; r_hat needs >= 2.
      interval: posterior mass of the reported interval, in (0, 1).

    Returns:
      ScalingFit with the posterior mean, standard deviation, interval,
      r_hat and effective sample size of a, b, c and sigma.

    Raises:
      ValueError: if the arrays differ in shape, have fewer than
        MIN_OBSERVATIONS entries, contain a value that is not finite and
        > 0, or if lam or info takes a single value (its exponent is then
        not identified); or if a sampler setting is out of range.
    """
    log_lam, log_info, log_kl = _check_observations(lam, info, kl)
    for name, value in (("num_warmup", num_warmup), ("num_samples", num_samples),
                        ("num_chains", num_chains)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if not 0.0 < interval < 1.0:
        raise ValueError(f"interval must be in (0, 1); got {interval!r}")

    mcmc = MCMC(NUTS(kl_scaling_model), num_warmup=int(num_warmup),
                num_samples=int(num_samples), num_chains=int(num_chains),
                chain_method="sequential", progress_bar=False)
    mcmc.run(key, jnp.asarray(log_lam), jnp.asarray(log_info), jnp.asarray(log_kl))
    by_chain = {name: np.asarray(value)
                for name, value in mcmc.get_samples(group_by_chain=True).items()}

    tail = (1.0 - interval) / 2.0
    summary, samples = {}, {}
    for name in PARAMETERS:
        draws = by_chain[name]  # [C, S]
        pooled = draws.reshape(-1)
        lower, upper = np.quantile(pooled, [tail, 1.0 - tail])
        summary[name] = ParameterSummary(
            mean=float(pooled.mean()), std=float(pooled.std()), lower=float(lower),
            upper=float(upper), r_hat=_r_hat(draws),
            effective_sample_size=float(effective_sample_size(draws)))
        samples[name] = pooled
    return ScalingFit(summary, samples, float(interval), int(log_lam.shape[0]))


def _r_hat(draws: np.ndarray) -> float:
    """Split Gelman-Rubin statistic, or NaN when the chains are too short to split."""
    if draws.shape[1] < 4:
        return float("nan")
    return float(split_gelman_rubin(draws))


def _check_observations(lam, info, kl) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = {"lam": np.asarray(lam, np.float64), "info": np.asarray(info, np.float64),
              "kl": np.asarray(kl, np.float64)}
    shapes = {name: array.shape for name, array in arrays.items()}
    if len(set(shapes.values())) != 1 or arrays["lam"].ndim != 1:
        raise ValueError(f"lam, info and kl must be 1-D arrays of the same length [N]; "
                         f"got shapes {shapes}")
    count = arrays["lam"].shape[0]
    if count < MIN_OBSERVATIONS:
        raise ValueError(f"the fit needs at least {MIN_OBSERVATIONS} observations for "
                         f"its 4 parameters; got {count}")
    for name, array in arrays.items():
        bad = ~(np.isfinite(array) & (array > 0))
        if bad.any():
            index = int(np.argmax(bad))
            raise ValueError(f"{name} must be finite and > 0 to take its log; got "
                             f"{float(array[index])!r} at index {index}")
    for name in ("lam", "info"):
        if np.ptp(np.log(arrays[name])) == 0:
            value = float(arrays[name][0])
            raise ValueError(f"{name} takes the single value {value!r}, so its exponent "
                             "is not identified; use at least two values")
    return tuple(np.log(arrays[name]) for name in ("lam", "info", "kl"))
