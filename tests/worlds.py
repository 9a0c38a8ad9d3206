"""Random tabular worlds shared by the oracle and estimator tests."""

import jax

from hi_jax import HorizonHarm, TableHarm, TabularPolicy


def random_world(V, T, seed, horizon=None):
    """Build a random tabular policy and a random table harm (with a horizon if given)."""
    key_policy, key_harm = jax.random.split(jax.random.key(seed))
    policy = TabularPolicy.random(key_policy, V, T, scale=1.5)
    if horizon is None:
        harm = TableHarm(jax.random.uniform(key_harm, (V,) * T))
    else:
        harm = HorizonHarm(jax.random.uniform(key_harm, (V,) * horizon), horizon)
    return policy, harm
