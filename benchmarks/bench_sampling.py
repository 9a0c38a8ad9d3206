"""Sampling throughput: hi_jax's `sample_responses` against PyTorch eager.

Both sample B full responses of T tokens from the same transformer with the
same weights and a KV cache. hi_jax runs prefill, cache fork and a
`fori_loop` of decode steps in one jitted program; PyTorch runs the same
steps op by op (`TorchGPT.sample`, `torch.multinomial` for the draws).
"""

from __future__ import annotations

import jax
import numpy as np
import torch

from benchmarks import models
from benchmarks.records import comparison
from benchmarks.timing import time_calls, time_pair
from benchmarks.torch_gpt import TorchGPT, load_flax_params
from hi_jax import sampling
from hi_jax.transformer import TransformerConfig, TransformerPolicy

# Model of the sampling sweep: about 3.3M parameters.
MODEL = dict(vocab_size=256, width=256, depth=4, num_heads=4, mlp_ratio=4)

# Tolerance of the logits comparison; random weights give logits of order 1.
LOGITS_RTOL = 1e-4
LOGITS_ATOL = 1e-4


def check_logits(policy: TransformerPolicy, model: TorchGPT, batch: int = 4) -> float:
    """Compares PyTorch's logits with hi_jax's teacher-forced logits.

    Checks both PyTorch paths, one full causal pass and step-by-step
    decoding with the KV cache, on responses sampled by hi_jax.

    Returns:
      The largest absolute difference.

    Raises:
      RuntimeError: if any logit differs by more than the tolerance.
    """
    tokens = np.asarray(sampling.sample_responses(jax.random.key(1), policy, batch))
    expected = np.asarray(policy.logits(tokens))
    with torch.inference_mode():
        tokens_torch = torch.from_numpy(tokens.astype(np.int64))
        paths = {"teacher-forced": model.teacher_forced_logits(tokens_torch).numpy(),
                 "cached": model.cached_logits(tokens_torch).numpy()}
    worst = 0.0
    for path, actual in paths.items():
        if not np.allclose(actual, expected, rtol=LOGITS_RTOL, atol=LOGITS_ATOL):
            raise RuntimeError(
                f"PyTorch {path} logits differ from hi_jax's by up to "
                f"{np.abs(actual - expected).max():.3g} (rtol={LOGITS_RTOL}, "
                f"atol={LOGITS_ATOL}); the weight copy or the reference model is wrong")
        worst = max(worst, float(np.abs(actual - expected).max()))
    return worst


def _decode_step_breakdown(policy: TransformerPolicy, batch: int) -> dict[str, float]:
    """Times one jitted `decode_step` at `batch` rows and runs XLA's cost analysis on it.

    The cost analysis compiles the step with its cache donated, as inside
    the sampling loop, where XLA may update the cache in place. Returns the
    median seconds, FLOPs and bytes accessed per step, and the cache size.
    """
    tokens = np.zeros((batch, policy.response_length), np.int32)
    _, cache = jax.jit(lambda p, y: p.prefill(y))(policy, tokens)
    step = jax.jit(lambda p, c, y, s: p.decode_step(c, y, s))
    current = np.zeros((batch,), np.int32)
    position = np.int32(policy.response_length // 2)
    timing = time_calls(lambda: step(policy, cache, current, position), repeats=10)
    seconds = timing.median_s
    donated = jax.jit(lambda p, c, y, s: p.decode_step(c, y, s), donate_argnums=1)
    cost = donated.lower(policy, cache, current, position).compile().cost_analysis() or {}
    return {"hi_jax_decode_step_s": seconds,
            "xla_decode_step_flops": cost.get("flops"),
            "xla_decode_step_bytes_accessed": cost.get("bytes accessed"),
            "cache_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(cache))}


def _torch_decode_step_seconds(model: TorchGPT, batch: int) -> float:
    """Median seconds of one PyTorch decode step at `batch` rows (a breakdown)."""
    cache = model.new_cache(batch)
    token = torch.zeros((batch, 1), dtype=torch.long)
    slot = model.config.prefix_length + model.config.response_length // 2
    with torch.inference_mode():
        return time_calls(lambda: model(token, cache, slot), repeats=10).median_s


def run(quick: bool, peak_flops: float) -> list[dict]:
    batches = (1, 32, 256) if quick else (1, 8, 32, 256)
    lengths = (16,) if quick else (16, 32)
    records = []
    for length in lengths:
        config = TransformerConfig(response_length=length, **MODEL)
        policy = models.random_policy(config)
        model = load_flax_params(config, policy.params)
        logits_error = check_logits(policy, model)
        flops_per_token = models.response_flops_per_token(config)
        for batch in batches:
            key = jax.random.key(batch)
            generator = torch.Generator().manual_seed(batch)
            with torch.inference_mode():
                hi_jax, reference = time_pair(
                    lambda: sampling.sample_responses(key, policy, batch),
                    lambda: model.sample(batch, generator))
            tokens = batch * length
            hi_jax_rate = tokens / hi_jax.median_s
            reference_rate = tokens / reference.median_s
            if batch >= 256:
                target, target_ratio = ">= 1.2x and >= 40% of peak", 1.2
            else:
                target, target_ratio = ">= 2x", 2.0
            record = comparison(
                f"sampling B={batch} T={length}", "sampling", "PyTorch eager, KV cache",
                hi_jax, reference, target=target, target_ratio=target_ratio,
                batch=batch, response_length=length, num_params=policy.num_params(),
                matrix_params=models.matrix_params(config),
                flops_per_token=flops_per_token,
                hi_jax_tokens_per_s=hi_jax_rate, baseline_tokens_per_s=reference_rate,
                peak_fraction=hi_jax_rate * flops_per_token / peak_flops,
                baseline_peak_fraction=reference_rate * flops_per_token / peak_flops,
                max_logits_difference=logits_error,
                baseline_decode_step_s=_torch_decode_step_seconds(model, batch),
                **_decode_step_breakdown(policy, batch))
            if batch >= 256:
                record["target_met"] = bool(record["target_met"]
                                            and record["peak_fraction"] >= 0.4)
            records.append(record)
    return records
