"""Transformer policies with random weights, and their FLOP counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hi_jax.transformer import TransformerConfig, TransformerPolicy


def random_policy(config: TransformerConfig, seed: int = 0) -> TransformerPolicy:
    """Builds a policy with normal weights large enough to give non-uniform logits.

    The default initialisation (standard deviation 0.02) gives nearly
    uniform logits, and a wrong implementation could still pass a logits
    comparison against it. Here every matrix is normal with standard
    deviation 1 / sqrt(fan-in), LayerNorm scales are 1 plus that noise, and
    biases and embeddings get the same noise. The weights come from numpy,
    so building them compiles nothing.
    """
    shapes = jax.eval_shape(lambda key: TransformerPolicy.init(key, config),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        stddev = 1.0 / np.sqrt(config.width)
        if leaf.ndim == 2 and "kernel" in name:
            stddev = 1.0 / np.sqrt(leaf.shape[0])
        values = stddev * rng.standard_normal(leaf.shape)
        if "scale" in name:
            values = values + 1.0
        return jnp.asarray(values, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes.params)
    return TransformerPolicy(params, config)


def matrix_params(config: TransformerConfig) -> int:
    """Counts the weights in dense kernels, the ones that cost 2 FLOPs per token each."""
    D, V = config.width, config.vocab_size
    per_block = 3 * D * D + D * D + 2 * config.mlp_ratio * D * D
    return config.depth * per_block + D * V


def attention_flops(config: TransformerConfig, num_keys: float) -> float:
    """Counts attention FLOPs for one query over `num_keys` keys, summed over layers.

    Scores and the weighted sum of values are 2 * num_keys * width FLOPs each.
    """
    return config.depth * 4.0 * num_keys * config.width


def response_flops_per_token(config: TransformerConfig) -> float:
    """Computes the mean FLOPs per response token: 2 x matrix weights plus attention.

    Response token y_t attends to the L0 + t + 1 inputs up to and including
    itself; the attention term is averaged over t. Masked slots that an
    implementation may compute anyway are not counted.
    """
    L0, T = config.prefix_length, config.response_length
    mean_keys = L0 + (T + 1) / 2
    return 2.0 * matrix_params(config) + attention_flops(config, mean_keys)
