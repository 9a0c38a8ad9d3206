"""Fisher traces: exact per-token gradients against jvp-Hutchinson, at equal error.

For the T prefixes of one sampled response, tr F_t = sum_v p_v
||grad log p_v||^2. The exact path (`estimators._exact_fisher_traces`)
takes T * V reverse passes and has no error. The Hutchinson path
(`estimators._hutchinson_fisher_traces`) takes one jvp per Rademacher probe
for all positions at once. A pilot run measures the per-probe spread of
each prefix's estimate. That spread fixes the number of probes K that
brings every prefix to the target relative standard error, and the
benchmark times K probes. `torch.func` per-sample gradients (vmap of grad
over the T * V log-probabilities) are the outside baseline for the exact
path.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import models
from benchmarks.records import comparison
from benchmarks.timing import time_calls, time_once, time_pair
from benchmarks.torch_gpt import load_flax_params
from hi_jax import estimators, sampling
from hi_jax.transformer import TransformerConfig

# About 1.26M parameters at V = 256.
MODEL = dict(vocab_size=256, response_length=8, width=128, depth=6, num_heads=4,
             mlp_ratio=4)
TARGET_RELATIVE_STDERR = 0.05
PILOT_PROBES = 64


def _torch_exact_traces(model, tokens: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Computes tr F_t from torch.func per-sample gradients of each log p_v: float [T]."""
    cfg = model.config
    V, T, L0 = cfg.vocab_size, cfg.response_length, cfg.prefix_length
    params = {name: p.detach() for name, p in model.named_parameters()}
    ids = torch.cat([model.head_ids(1), torch.from_numpy(tokens.astype(np.int64))[None]],
                    dim=1)

    def selected_log_prob(p, selector):
        # selector is one row of the [T * V] identity: it picks one log p_v(y<t).
        logits = functional_call(model, p, (ids,))[0, L0 - 1:L0 - 1 + T]
        return (F.log_softmax(logits, -1).reshape(-1) * selector).sum()

    # vmap needs the attention kernel written in plain operators.
    with sdpa_kernel(SDPBackend.MATH):
        grads = vmap(grad(selected_log_prob), in_dims=(None, 0), chunk_size=V)(
            params, torch.eye(T * V))
    sq_norms = sum((g.reshape(T * V, -1)**2).sum(-1) for g in grads.values())
    return (torch.from_numpy(probs.copy()) * sq_norms.view(T, V)).sum(-1).numpy()


def _probe_generation_seconds(params, num_probes: int) -> float:
    """Median seconds to draw `num_probes` Rademacher probes the size of `params`.

    The draws are those `_hutchinson_fisher_traces` makes, without the jvps,
    so this is the part of the Hutchinson time spent in the random number
    generator.
    """
    leaves = jax.tree.leaves(params)

    @jax.jit
    def draw(key):
        def one(probe_key):
            keys = jax.random.split(probe_key, len(leaves))
            return [estimators.rademacher_from_bits(k, leaf.shape, leaf.dtype)
                    for k, leaf in zip(keys, leaves)]

        return jax.vmap(one)(jax.random.split(key, num_probes))

    return time_calls(lambda: draw(jax.random.key(0)), repeats=3).median_s


def run(quick: bool, peak_flops: float) -> list[dict]:
    del peak_flops
    # The quick sweep halves T; V and the parameter count stay.
    config = TransformerConfig(**{**MODEL, "response_length": 4 if quick else 8})
    policy = models.random_policy(config)
    tokens = sampling.sample_responses(jax.random.key(0), policy, 1)[0]

    def log_probs_of(params):
        return policy.replace_params(params).log_probs(tokens[None])[0]  # [T, V]

    params = policy.params
    probs = jnp.exp(log_probs_of(params))

    exact_fn = jax.jit(lambda p, q: estimators._exact_fisher_traces(log_probs_of, p, q))

    @jax.jit
    def per_probe(keys, p, q):
        return jax.vmap(lambda k: estimators._hutchinson_fisher_traces(
            k, log_probs_of, p, q, 1))(keys)

    pilot = np.asarray(per_probe(jax.random.split(jax.random.key(1), PILOT_PROBES),
                                 params, probs))  # [PILOT_PROBES, T]
    relative_spread = pilot.std(0, ddof=1) / pilot.mean(0)
    probes_needed = np.ceil((relative_spread / TARGET_RELATIVE_STDERR)**2).astype(int)
    num_probes = int(max(probes_needed.max(), 1))

    hutchinson_fn = jax.jit(functools.partial(
        lambda k, p, q, n: estimators._hutchinson_fisher_traces(k, log_probs_of, p, q, n),
        n=num_probes))
    key = jax.random.key(2)
    results = {}

    def run_hutchinson():
        results["hutchinson"] = hutchinson_fn(key, params, probs)
        return results["hutchinson"]

    def run_exact():
        results["exact"] = exact_fn(params, probs)
        return results["exact"]

    hutchinson, exact = time_pair(run_hutchinson, run_exact, repeats=3)
    exact_traces = np.asarray(results["exact"])
    relative_error = np.abs(np.asarray(results["hutchinson"]) / exact_traces - 1)

    model = load_flax_params(config, params)
    probs_np = np.asarray(probs, np.float32)
    tokens_np = np.asarray(tokens)
    compute_torch = lambda: results.__setitem__(
        "torch", _torch_exact_traces(model, tokens_np, probs_np))
    # One PyTorch call takes tens of seconds, and eager mode compiles nothing.
    torch_timing = time_once(compute_torch) if quick else time_calls(compute_torch,
                                                                      repeats=2, warmup=0)
    torch_difference = float(np.max(np.abs(results["torch"] / exact_traces - 1)))

    V, T = config.vocab_size, config.response_length
    common = dict(vocab_size=V, response_length=T, num_params=policy.num_params(),
                  exact_traces=exact_traces.tolist())
    return [
        comparison(
            f"Fisher Hutchinson vs exact V={V}", "fisher",
            "exact per-token gradients (JAX, T*V reverse passes)", hutchinson, exact,
            target=">= 10x at equal error", target_ratio=10.0,
            target_relative_stderr=TARGET_RELATIVE_STDERR, pilot_probes=PILOT_PROBES,
            num_probes=num_probes, probes_needed_per_prefix=probes_needed.tolist(),
            hutchinson_relative_error=relative_error.tolist(),
            ratio_to_torch_per_sample=torch_timing.median_s / hutchinson.median_s,
            hutchinson_probe_generation_s=_probe_generation_seconds(params, num_probes),
            **common),
        comparison(
            f"Fisher exact vs torch.func V={V}", "fisher",
            "torch.func vmap(grad) per-sample gradients", exact, torch_timing,
            target=None, max_relative_difference=torch_difference, **common),
    ]
