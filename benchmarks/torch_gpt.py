"""A PyTorch eager copy of hi_jax's TransformerPolicy, with a KV cache.

The architecture follows `hi_jax.transformer`: input [BOS, prompt..., y_0,
..., y_{T-1}] with BOS = V, learned token and position embeddings,
pre-LayerNorm blocks (LayerNorm epsilon 1e-6 as in Flax) of causal
multi-head attention and a tanh-approximated GELU MLP, a final LayerNorm
and an output layer of V logits. `load_flax_params` copies a policy's
weights, so both models compute the same function up to float rounding.

The cache is a list with one (keys, values) pair per layer, each float
[B, H, S, Dh] with S = L0 + T slots. Slot j contains the key and value of
input token j.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hi_jax.transformer import TransformerConfig

# Flax's LayerNorm default epsilon.
_LAYER_NORM_EPS = 1e-6

Cache = list[tuple[torch.Tensor, torch.Tensor]]


class _Attention(nn.Module):

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.out = nn.Linear(config.width, config.width)

    def forward(self, x, layer_cache, start: int):
        batch, length, width = x.shape
        query, key, value = self.qkv(x).split(width, dim=-1)
        shape = (batch, length, self.num_heads, self.head_dim)
        query = query.view(shape).transpose(1, 2)  # [B, H, L, Dh]
        key = key.view(shape).transpose(1, 2)
        value = value.view(shape).transpose(1, 2)
        if layer_cache is not None:
            keys, values = layer_cache
            keys[:, :, start:start + length] = key
            values[:, :, start:start + length] = value
            key = keys[:, :, :start + length]
            value = values[:, :, :start + length]
        # One new token attends to every filled slot; a block that starts at
        # slot 0 is causal. Other blocks would need an offset mask.
        if length == 1:
            out = F.scaled_dot_product_attention(query, key, value)
        elif start == 0:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        else:
            raise ValueError(
                f"a block of {length} tokens must start at slot 0; got start={start}")
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.out(out)


class _Mlp(nn.Module):

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.hidden = nn.Linear(config.width, config.mlp_ratio * config.width)
        self.out = nn.Linear(config.mlp_ratio * config.width, config.width)

    def forward(self, x):
        return self.out(F.gelu(self.hidden(x), approximate="tanh"))


class _Block(nn.Module):

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.width, eps=_LAYER_NORM_EPS)
        self.attention = _Attention(config)
        self.mlp_norm = nn.LayerNorm(config.width, eps=_LAYER_NORM_EPS)
        self.mlp = _Mlp(config)

    def forward(self, x, layer_cache, start: int):
        x = x + self.attention(self.attention_norm(x), layer_cache, start)
        return x + self.mlp(self.mlp_norm(x))


class TorchGPT(nn.Module):
    """The decoder of a `TransformerPolicy` as a PyTorch module."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.dtype not in (None, "float32"):
            raise ValueError(f"TorchGPT supports float32 only; got dtype {config.dtype!r}")
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size + 1, config.width)
        self.position_embed = nn.Parameter(torch.zeros(config.max_len, config.width))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(config.width, eps=_LAYER_NORM_EPS)
        self.head = nn.Linear(config.width, config.vocab_size)

    def forward(self, ids: torch.Tensor, cache: Cache | None = None,
                start: int = 0) -> torch.Tensor:
        """Logits float [B, L, V] of input ids int [B, L] at slots start ... start + L - 1.

        With a cache, the keys and values of the ids are written into it in
        place and attention reads the slots before them from it.
        """
        length = ids.shape[1]
        x = self.token_embed(ids) + self.position_embed[start:start + length]
        for layer, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[layer], start)
        return self.head(self.final_norm(x))

    def new_cache(self, batch: int) -> Cache:
        """Allocates an empty cache of `batch` rows."""
        cfg = self.config
        shape = (batch, cfg.num_heads, cfg.num_slots, cfg.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.depth)]

    def head_ids(self, batch: int) -> torch.Tensor:
        """[BOS, prompt...] repeated for `batch` rows: int [B, L0]."""
        cfg = self.config
        head = torch.tensor((cfg.vocab_size,) + cfg.prompt, dtype=torch.long)
        return head.expand(batch, cfg.prefix_length)

    def teacher_forced_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits float [B, T, V] of every response token y_t given y_<t, in one pass."""
        L0, T = self.config.prefix_length, self.config.response_length
        ids = torch.cat([self.head_ids(tokens.shape[0]), tokens], dim=1)
        return self(ids)[:, L0 - 1:L0 - 1 + T]

    def cached_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Computes the logits of `teacher_forced_logits` one decode step at a time."""
        batch = tokens.shape[0]
        L0, T = self.config.prefix_length, self.config.response_length
        cache = self.new_cache(batch)
        logits = [self(self.head_ids(batch), cache, 0)[:, -1]]
        for t in range(T - 1):
            logits.append(self(tokens[:, t:t + 1], cache, L0 + t)[:, -1])
        return torch.stack(logits, dim=1)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Samples `batch` responses with the KV cache: int [B, T]."""
        L0, T = self.config.prefix_length, self.config.response_length
        cache = self.new_cache(batch)
        logits = self(self.head_ids(batch), cache, 0)[:, -1]
        tokens = torch.empty((batch, T), dtype=torch.long)
        for t in range(T):
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            tokens[:, t] = token[:, 0]
            if t < T - 1:
                logits = self(token, cache, L0 + t)[:, -1]
        return tokens


def _copy(target: torch.Tensor, value, transpose: bool = False) -> None:
    array = np.array(value, dtype=np.float32)
    if transpose:
        array = np.ascontiguousarray(array.T)
    if tuple(array.shape) != tuple(target.shape):
        raise ValueError(f"weight shape {array.shape} does not match {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(torch.from_numpy(array))


def _copy_dense(linear: nn.Linear, params) -> None:
    # Flax kernels are [in, out]; torch weights are [out, in].
    _copy(linear.weight, params["kernel"], transpose=True)
    _copy(linear.bias, params["bias"])


def _copy_norm(norm: nn.LayerNorm, params) -> None:
    _copy(norm.weight, params["scale"])
    _copy(norm.bias, params["bias"])


def load_flax_params(config: TransformerConfig, params) -> TorchGPT:
    """Builds a `TorchGPT` with the weights of a `TransformerPolicy`'s params."""
    model = TorchGPT(config)
    _copy(model.token_embed.weight, params["token_embed"]["embedding"])
    _copy(model.position_embed, params["position_embed"])
    for layer, block in enumerate(model.blocks):
        block_params = params[f"block_{layer}"]
        _copy_norm(block.attention_norm, block_params["attention_norm"])
        _copy_dense(block.attention.qkv, block_params["attention"]["qkv"])
        _copy_dense(block.attention.out, block_params["attention"]["out"])
        _copy_norm(block.mlp_norm, block_params["mlp_norm"])
        _copy_dense(block.mlp.hidden, block_params["mlp"]["hidden"])
        _copy_dense(block.mlp.out, block_params["mlp"]["out"])
    _copy_norm(model.final_norm, params["final_norm"])
    _copy_dense(model.head, params["head"])
    return model.eval()
