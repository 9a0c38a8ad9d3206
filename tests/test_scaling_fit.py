"""The Bayesian fit of log D = a log(lam) + b log(I) + c in hi_jax.scaling_fit."""

import math

import jax
import numpy as np
import pytest

from hi_jax import scaling_fit


def synthetic_data(seed, a=2.0, b=1.0, c=math.log(0.5), sigma=0.05, count=40):
    """Draws lam and I log-uniformly and D from the model with known parameters."""
    rng = np.random.default_rng(seed)
    lam = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), count))
    info = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), count))
    kl = np.exp(a * np.log(lam) + b * np.log(info) + c + sigma * rng.normal(size=count))
    return lam, info, kl


def test_fit_recovers_known_parameters():
    truth = {"a": 2.0, "b": 1.0, "c": math.log(0.5), "sigma": 0.05}
    lam, info, kl = synthetic_data(0)
    fit = scaling_fit.fit_kl_scaling(jax.random.key(1), lam, info, kl, num_warmup=200,
                                     num_samples=400, num_chains=2)
    assert fit.num_observations == 40
    assert fit.interval == 0.9
    for name, value in truth.items():
        summary = fit.summary[name]
        # The model is the one that generated the data, so each posterior
        # mean lies within 4 posterior standard deviations of the truth
        # except with probability below 1e-4.
        assert abs(summary.mean - value) < 4 * summary.std, (name, summary)
        assert summary.lower < summary.mean < summary.upper, name
        assert summary.r_hat < 1.05, (name, summary.r_hat)
        assert fit.samples[name].shape == (800,)
    saved = fit.to_dict()
    assert set(saved) == {"interval", "num_observations", "a", "b", "c", "sigma"}
    assert saved["a"]["mean"] == pytest.approx(fit.summary["a"].mean)


@pytest.mark.parametrize("change,message", [
    ({"lam": np.ones(3)}, "same length"),
    ({"kl": np.zeros(8)}, r"kl must be finite and > 0 to take its log; got 0.0"),
    ({"info": np.full(8, np.nan)}, "info must be finite and > 0"),
    ({"lam": np.full(8, 0.1)}, "lam takes the single value 0.1"),
])
def test_fit_rejects_invalid_observations(change, message):
    data = {"lam": np.geomspace(1e-3, 1e-1, 8), "info": np.geomspace(1e-2, 1e-1, 8),
            "kl": np.geomspace(1e-9, 1e-3, 8)}
    data.update(change)
    with pytest.raises(ValueError, match=message):
        scaling_fit.fit_kl_scaling(jax.random.key(0), **data)


def test_fit_needs_five_observations():
    lam, info, kl = synthetic_data(0, count=4)
    with pytest.raises(ValueError, match="at least 5 observations"):
        scaling_fit.fit_kl_scaling(jax.random.key(0), lam, info, kl)


@pytest.mark.parametrize("setting,value", [("num_warmup", 0), ("num_samples", 1.5),
                                           ("num_chains", True), ("interval", 1.0)])
def test_fit_rejects_invalid_sampler_settings(setting, value):
    lam, info, kl = synthetic_data(0, count=8)
    with pytest.raises(ValueError, match=setting):
        scaling_fit.fit_kl_scaling(jax.random.key(0), lam, info, kl, **{setting: value})
