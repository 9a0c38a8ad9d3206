"""A whole I_t profile: `hi_jax.estimate_profile` against a plain PyTorch version.

Both run the same Rao-Blackwellised estimator at the same sample counts on
the same transformer and harm. For each of N sampled responses and each
position t they branch on every candidate token v, sample M continuations
of (y_<t, v) from a forked KV cache, and estimate Var(h_t | y<t) with the
U-statistic; they also take one gradient of the C_t surrogate
sum_v p_v hhat_v log p(v | y<t) per position and the Hutchinson Fisher
trace with the same number of probes. The PyTorch version batches the V * M
continuations of one prefix and loops over responses and positions in
Python. hi_jax compiles the whole profile into one XLA program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import models
from benchmarks.records import comparison
from benchmarks.timing import time_calls, time_pair
from benchmarks.torch_gpt import TorchGPT, load_flax_params
from hi_jax import DecayingHarm, estimate_profile, estimators, sampling
from hi_jax.transformer import TransformerConfig

MODEL = dict(vocab_size=8, response_length=8, width=64, depth=2, num_heads=4,
             mlp_ratio=4)
NUM_CONTINUATIONS = 4
NUM_PROBES = 4
HARM_DECAY = 0.8
HARM_BIAS = -0.5


def make_harm(vocab_size: int, seed: int = 0) -> DecayingHarm:
    weights = np.random.default_rng(seed).standard_normal(vocab_size)
    return DecayingHarm(weights, decay=HARM_DECAY, bias=HARM_BIAS)


def torch_harm(harm: DecayingHarm, tokens: torch.Tensor) -> torch.Tensor:
    """Computes `harm` on int [B, T] PyTorch tokens: float [B]."""
    weights = torch.from_numpy(np.array(harm.token_weights, np.float32))
    discount = harm.decay ** torch.arange(tokens.shape[1], dtype=torch.float32)
    return torch.sigmoid(harm.bias + (discount * weights[tokens]).sum(-1))


def _branch_variance(harm_values: torch.Tensor, probs: torch.Tensor):
    """Estimates Var(h_t | y<t) from [V, M] harms, and returns the C_t coefficients [V].

    The unbiased estimate is sum_v p_v h_v^2 - (sum_v p_v h_v)^2 with each
    h_v^2 replaced by the U-statistic (S_v^2 - sum_m H_vm^2) / (M (M - 1)). Values are centred on
    the weighted mean first, which leaves the estimate unchanged.
    """
    M = harm_values.shape[1]
    raw_mean = harm_values.mean(-1)
    centre = (probs * raw_mean).sum()
    centred = harm_values - centre
    mean = raw_mean - centre
    square = (centred.sum(-1)**2 - (centred**2).sum(-1)) / (M * (M - 1))
    weighted_mean = (probs * mean).sum()
    mean_square = weighted_mean**2 - (probs**2 * mean**2).sum() + (probs**2 * square).sum()
    return (probs * square).sum() - mean_square, probs * raw_mean


def _continue_branches(model: TorchGPT, cache, tokens: torch.Tensor, position: int,
                       num: int, generator: torch.Generator) -> torch.Tensor:
    """Samples `num` continuations of (tokens[:position], v) per v: int [V * num, T]."""
    cfg = model.config
    V, T, L0 = cfg.vocab_size, cfg.response_length, cfg.prefix_length
    rows = V * num
    forked = [(keys.repeat(rows, 1, 1, 1), values.repeat(rows, 1, 1, 1))
              for keys, values in cache]
    candidates = torch.arange(V).repeat_interleave(num)
    buffer = tokens.repeat(rows, 1)
    buffer[:, position] = candidates
    if position == T - 1:
        return buffer
    logits = model(candidates[:, None], forked, L0 + position)[:, -1]
    for s in range(position + 1, T):
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        buffer[:, s] = token[:, 0]
        if s < T - 1:
            logits = model(token, forked, L0 + s)[:, -1]
    return buffer


def torch_profile(model: TorchGPT, harm: DecayingHarm, num_sequences: int,
                  num_continuations: int, num_probes: int, seed: int = 0) -> dict:
    """Computes the Rao-Blackwellised profile in plain PyTorch: I_t, ||G_t||^2 and tr F_t.

    Returns a dict of numpy arrays: `info` and `fisher` [N, T] per response,
    `g_norm_sq` [T] (U-statistic over responses) and `harm` [N].
    """
    cfg = model.config
    T, L0 = cfg.response_length, cfg.prefix_length
    generator = torch.Generator().manual_seed(seed)
    params = {name: p.detach() for name, p in model.named_parameters()}
    info = np.zeros((num_sequences, T))
    fisher = np.zeros((num_sequences, T))
    harm_values = np.zeros(num_sequences)
    grads = []
    for i in range(num_sequences):
        with torch.no_grad():
            tokens = model.sample(1, generator)[0]
            ids = torch.cat([model.head_ids(1), tokens[None]], dim=1)
            cache = model.new_cache(1)
            model(ids, cache, 0)
            harm_values[i] = torch_harm(harm, tokens[None])[0]

        log_probs = torch.log_softmax(model.teacher_forced_logits(tokens[None])[0], -1)
        probs = log_probs.detach().exp()
        coefficients = torch.zeros_like(probs)
        with torch.no_grad():
            for t in range(T):
                branches = _continue_branches(model, cache, tokens, t,
                                              num_continuations, generator)
                values = torch_harm(harm, branches).view(-1, num_continuations)
                variance, coefficients[t] = _branch_variance(values, probs[t])
                info[i, t] = variance.item()

        per_position = []
        for t in range(T):
            grad = torch.autograd.grad((coefficients[t] * log_probs[t]).sum(),
                                       list(model.parameters()), retain_graph=t < T - 1)
            per_position.append(torch.cat([g.reshape(-1) for g in grad]))
        grads.append(torch.stack(per_position).numpy())  # [T, P]

        def log_probs_of(p):
            logits = functional_call(model, p, (ids,))[0, L0 - 1:L0 - 1 + T]
            return F.log_softmax(logits, -1)

        for _ in range(num_probes):
            probe = {name: torch.randint(0, 2, p.shape, generator=generator).float() * 2 - 1
                     for name, p in params.items()}
            # The fused CPU attention kernels have no forward-mode derivative.
            with sdpa_kernel(SDPBackend.MATH):
                _, directional = jvp(log_probs_of, (params,), (probe,))
            fisher[i] += ((probs * directional.detach()**2).sum(-1) / num_probes).numpy()

    grads = np.stack(grads)  # [N, T, P]
    total = grads.sum(0)
    g_norm_sq = ((total**2).sum(-1) - (grads**2).sum((0, 2))) / (
        num_sequences * (num_sequences - 1))
    return {"info": info, "fisher": fisher, "g_norm_sq": g_norm_sq, "harm": harm_values}


def hi_jax_breakdown(policy, harm, num_sequences: int, num_continuations: int,
                     num_probes: int) -> dict[str, float]:
    """Median seconds of the parts of hi_jax's profile, each jitted alone over N units.

    The parts are the ones `estimators._unit` runs per response: sampling
    and prefilling the response, the branched continuations with their
    harms, the C_t gradients (`jax.jacrev` over T positions), the Hutchinson
    traces, and inside those the Rademacher probes alone. They are vmapped
    over all N units at once, where `estimate_profile` maps over groups of
    units, so they need not add up to its time exactly.
    """
    V, T = policy.vocab_size, policy.response_length
    M = num_continuations
    keys = jax.random.split(jax.random.key(1), num_sequences)
    leaves = jax.tree.leaves(policy.params)

    def response(key):
        tokens = sampling.sample_responses(key, policy, 1)[0]
        return tokens, sampling.prefill_one(policy, tokens)

    def log_probs_of(tokens):
        return lambda params: policy.replace_params(params).log_probs(tokens[None])[0]

    def branches(key):
        tokens, prefilled = response(key)
        branch_keys = jax.random.split(key, (T, V))

        # Decode loops of static length per bucket of positions, as in
        # `estimators._unit`.
        def bucket(first, last):
            def branch(k, t, v):
                return sampling.branch_prefilled(k, policy, prefilled, tokens, t, v, M,
                                                 num_steps=T - 1 - first)
            return jax.vmap(jax.vmap(branch, in_axes=(0, None, 0)),
                            in_axes=(0, 0, None))(branch_keys[first:last],
                                                  jnp.arange(first, last), jnp.arange(V))

        continuations = estimators._by_buckets(bucket, T)
        return harm(continuations.reshape(-1, T))

    def gradients(key):
        tokens, _ = response(key)
        coefficients = jnp.ones((T, V))
        return jax.jacrev(lambda p: (coefficients * log_probs_of(tokens)(p)).sum(-1))(
            policy.params)

    def hutchinson(key):
        tokens, _ = response(key)
        log_probs = log_probs_of(tokens)
        probs = jnp.exp(log_probs(policy.params))
        return estimators._hutchinson_fisher_traces(key, log_probs, policy.params, probs,
                                                    num_probes)

    def probes(key):
        probe_keys = jax.random.split(key, (num_probes, len(leaves)))
        return [jax.vmap(lambda k: estimators.rademacher_from_bits(k, leaf.shape,
                                                                   leaf.dtype))(
            probe_keys[:, i]) for i, leaf in enumerate(leaves)]

    parts = {"sample_and_prefill": lambda k: response(k)[0], "branches": branches,
             "gradients": gradients, "hutchinson": hutchinson,
             "hutchinson_probes_only": probes}
    seconds = {}
    for name, part in parts.items():
        batched = jax.jit(jax.vmap(part))
        seconds[name] = time_calls(lambda: batched(keys), repeats=3).median_s
    return seconds


def _max_abs_z(mean_a, se_a, mean_b, se_b) -> float:
    scale = np.sqrt(np.asarray(se_a)**2 + np.asarray(se_b)**2)
    return float(np.max(np.abs(np.asarray(mean_a) - np.asarray(mean_b)) / scale))


def run(quick: bool, peak_flops: float) -> list[dict]:
    del peak_flops
    num_sequences = 32 if quick else 128
    config = TransformerConfig(**MODEL)
    policy = models.random_policy(config)
    model = load_flax_params(config, policy.params)
    harm = make_harm(config.vocab_size)
    key = jax.random.key(0)
    settings = dict(num_sequences=num_sequences, num_continuations=NUM_CONTINUATIONS,
                    num_probes=NUM_PROBES)

    results = {}

    def run_hi_jax():
        results["hi_jax"] = estimate_profile(key, policy, harm, info_method="rao_blackwell",
                                             fisher_method="hutchinson", **settings)
        return results["hi_jax"]

    def run_torch():
        results["torch"] = torch_profile(model, harm, **settings)

    hi_jax, reference = time_pair(run_hi_jax, run_torch, repeats=3)

    # Both are Monte Carlo estimates of the same I_t from independent draws,
    # so their difference in standard errors should be of order 1.
    profile, torch_result = results["hi_jax"], results["torch"]
    torch_info = torch_result["info"]
    torch_info_se = torch_info.std(0, ddof=1) / np.sqrt(num_sequences)
    torch_fisher = torch_result["fisher"]
    torch_fisher_se = torch_fisher.std(0, ddof=1) / np.sqrt(num_sequences)
    V, T, M = config.vocab_size, config.response_length, NUM_CONTINUATIONS
    # The breakdown compiles five more programs, so only the full sweep runs it.
    breakdown = None if quick else hi_jax_breakdown(policy, harm, **settings)
    return [comparison(
        f"I_t profile N={num_sequences}", "profile",
        "plain PyTorch, loop over responses and positions", hi_jax, reference,
        target=">= 10x", target_ratio=10.0, num_sequences=num_sequences,
        num_continuations=M, num_probes=NUM_PROBES, vocab_size=V, response_length=T,
        num_params=policy.num_params(), continuations_per_profile=num_sequences * T * V * M,
        hi_jax_info=np.asarray(profile.I.mean).tolist(),
        baseline_info=torch_info.mean(0).tolist(),
        info_max_abs_z=_max_abs_z(profile.I.mean, profile.I.stderr,
                                  torch_info.mean(0), torch_info_se),
        fisher_max_abs_z=_max_abs_z(profile.fisher_trace_mean.mean,
                                    profile.fisher_trace_mean.stderr,
                                    torch_fisher.mean(0), torch_fisher_se),
        hi_jax_g_norm_sq=np.asarray(profile.G_norm_sq.mean).tolist(),
        baseline_g_norm_sq=torch_result["g_norm_sq"].tolist(),
        hi_jax_breakdown_s=breakdown)]
