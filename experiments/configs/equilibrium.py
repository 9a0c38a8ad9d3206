"""Default config of `hi-jax sweep`: equilibrium scaling on random tabular worlds.

On a 2-core CPU without an accelerator `hi-jax sweep` with this config took
about 50 s (46 s and 50 s measured, including start-up and compilation).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Root PRNG seed, an integer >= 0.
    # Random worlds, >= 1. Each world has its own key derived from seed, so
    # the worlds are the seeds of the grid.
    config.num_worlds = 8

    # Each world: a random TabularPolicy as P_base and a HorizonHarm that
    # reads the first `horizon` tokens through a table of uniform [0, 1) values.
    config.vocab_size = 3  # V >= 2.
    config.response_length = 4  # T >= 1. The sweep enumerates all V**T responses.
    config.horizon = 2  # Harm horizon k in [1, T]; positions t >= k lie beyond it.
    config.logit_scale = 1.0  # Std of the random base logits, >= 0.
    # Recovery token set R of the deep objective: distinct token ids in
    # [0, V), leaving at least one token out.
    config.recovery_tokens = (0,)
    # P_base(R | u) at every prefix u, in (0, 1). The base logits of R are
    # shifted to give it, so one Gibbs curve fits every prefix.
    config.base_recovery = 0.1
    # Adversarial prefix distribution Q of the deep objective: "harm_weighted"
    # (Q(y) proportional to P_base(y) * Harm(y)), "base" (Q = P_base) or
    # "uniform" over all V**T responses.
    config.prefix_source = "harm_weighted"

    # Standard objective lam * E_P[Harm] + KL(P || P_base), minimised by
    # L-BFGS with exact gradients from the base policy.
    config.standard = ml_collections.ConfigDict()
    # Harm weights lam, each finite and > 0 (the plots take logs).
    config.standard.lams = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    # L-BFGS iterations per point, >= 1.
    # NOTE: the objective is evaluated from log-probabilities whose absolute
    # rounding is about 1e-16, so it cannot resolve logit errors below about
    # 1e-8. At lam = 1e-3 that leaves a relative KL error of up to about 3e-5
    # that more steps do not remove (measured on the default worlds).
    config.standard.lbfgs_steps = 200
    # L-BFGS stops once max |dH / d logit| <= tolerance, >= 0. With 0 it runs
    # every step.
    config.standard.tolerance = 0.0

    # Deep objective: the standard one plus
    # mu * E_{y ~ Q}[sum_t gamma**t * (1 - P(y_t in R | y<t))], minimised by
    # Adam warm-up steps and then L-BFGS. Its grid is lams x mus x gammas.
    config.deep = ml_collections.ConfigDict()
    config.deep.lams = (1.0,)  # Harm weights, each finite and >= 0.
    config.deep.mus = (0.25, 1.0, 4.0)  # Recovery penalties mu, each finite and > 0.
    config.deep.gammas = (0.5, 0.8, 1.0)  # Discounts gamma, each in (0, 1].
    # Adam iterations before L-BFGS, >= 0. The deep objective is not convex
    # in the logits, and the warm-up avoids poor stationary points.
    config.deep.adam_steps = 3000
    config.deep.learning_rate = 0.05  # Adam learning rate, > 0.
    config.deep.lbfgs_steps = 2000  # L-BFGS iterations per point, >= 1.
    config.deep.tolerance = 0.0  # As standard.tolerance, >= 0.

    # Grid points of one world and objective that run as one vmapped
    # program, >= 1; 1 runs every point separately.
    config.max_batch_size = 32

    # Bayesian fit of log D_KL^(t) = a log(lam) + b log(I_t) + c with NUTS,
    # on the standard points at positions t < k.
    config.fit = ml_collections.ConfigDict()
    # Only points with lam <= max_lam enter the fit, > 0. The prediction
    # (lam**2 / 2) * I_t has a relative error of order lam.
    config.fit.max_lam = 0.1
    config.fit.num_warmup = 500  # NUTS adaptation steps per chain, >= 1.
    config.fit.num_samples = 1000  # Posterior draws per chain, >= 1.
    config.fit.num_chains = 2  # Chains, run one after another, >= 1.
    config.fit.interval = 0.9  # Posterior mass of the reported intervals, in (0, 1).
    return config
