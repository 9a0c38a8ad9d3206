"""hi_jax: where alignment pressure can act in a response, measured in JAX.

Dimension letters used in shapes throughout: B batch, T response positions,
V vocabulary, M continuations per prefix, N outer samples, P parameters.
"""

from hi_jax import (equilibrium, estimators, exact, harms, objectives, policy, sampling,
                    sharding, theory, world)
from hi_jax.estimators import Estimate, MonteCarloProfile, estimate_profile, profile_to_dict
from hi_jax.exact import ExactProfile, enumerate_responses, exact_profile
from hi_jax.harms import DecayingHarm, Harm, HorizonHarm, TableHarm
from hi_jax.policy import Policy, TabularPolicy
from hi_jax.sampling import sample_continuations, sample_from_prefixes, sample_responses
from hi_jax.transformer import TransformerConfig, TransformerPolicy

from hi_jax.equilibrium import exact_equilibrium, exact_kl_profile

# `hi_jax.training` (optax, orbax) and `hi_jax.evaluation` are imported on
# demand: `from hi_jax import training`.

__version__ = "0.1.0"
