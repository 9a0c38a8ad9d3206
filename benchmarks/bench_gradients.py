"""Per-position gradient contributions C_t against one forward and backward pass.

Two ways to get the T gradients of sum_v c_tv log p(v | y<t): per response
with `jax.jacrev` over the T positions, vmapped over the responses and
summed, and `jax.jacrev` of the batch-summed surrogate, which yields only
the T batch totals. `estimate_profile` needs only group totals and uses the
second. The reference cost is one `jax.grad` of the same surrogate summed
over the whole batch, a single forward and backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import models
from benchmarks.records import comparison
from benchmarks.timing import time_calls, time_pair
from hi_jax import sampling
from hi_jax.transformer import TransformerConfig

MODEL = dict(vocab_size=64, response_length=16, width=128, depth=2, num_heads=4,
             mlp_ratio=4)


def _surrogate(policy, params, tokens, coefficients):
    """Computes sum_v c_tv log p(v | y<t) per response and position: float [B, T]."""
    log_probs = policy.replace_params(params).log_probs(tokens)
    return (coefficients * log_probs).sum(-1)


@jax.jit
def per_response_jacobians(policy, tokens, coefficients):
    """Computes each response's C_t as `estimators._unit` does: leaves [B, T, ...]."""

    def one(tokens_one, coefficients_one):
        return jax.jacrev(lambda p: _surrogate(policy, p, tokens_one[None],
                                               coefficients_one[None])[0])(policy.params)

    return jax.vmap(one)(tokens, coefficients)


@jax.jit
def batch_jacobian(policy, tokens, coefficients):
    """Computes the batch sums of C_t, one reverse pass per position: leaves [T, ...]."""
    return jax.jacrev(lambda p: _surrogate(policy, p, tokens, coefficients).sum(0))(
        policy.params)


@jax.jit
def forward_backward(policy, tokens, coefficients):
    """Computes the gradient of the whole surrogate: one forward and backward pass."""
    return jax.grad(lambda p: _surrogate(policy, p, tokens, coefficients).sum())(
        policy.params)


def run(quick: bool, peak_flops: float) -> list[dict]:
    del peak_flops
    batch = 32
    config = TransformerConfig(**MODEL)
    policy = models.random_policy(config)
    key_tokens, key_coefficients = jax.random.split(jax.random.key(0))
    tokens = sampling.sample_responses(key_tokens, policy, batch)
    coefficients = jax.random.uniform(key_coefficients,
                                      (batch, config.response_length, config.vocab_size))

    args = (policy, tokens, coefficients)
    hi_jax, reference = time_pair(lambda: per_response_jacobians(*args),
                                  lambda: forward_backward(*args))
    batched = time_calls(lambda: batch_jacobian(*args))
    T = config.response_length
    return [comparison(
        f"G_t gradients B={batch} T={T}", "gradients",
        "one forward+backward pass over the batch", hi_jax, reference,
        target="none (cost relative to one backward pass)",
        batch=batch, response_length=T, num_params=policy.num_params(),
        cost_in_backward_passes=hi_jax.median_s / reference.median_s,
        batch_jacobian_s=batched.median_s,
        batch_jacobian_cost_in_backward_passes=batched.median_s / reference.median_s,
        per_response_jacobian_bytes=batch * T * policy.num_params() * 4)]
