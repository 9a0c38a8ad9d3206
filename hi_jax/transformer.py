"""A small decoder-only transformer policy with an explicit KV cache.

The model reads the input sequence [BOS, prompt..., y_0, ..., y_{T-1}] of
L0 + T tokens, where L0 = 1 + len(prompt) and BOS has the id V (one past the
output vocabulary). The logits of y_t come from the output at index
L0 - 1 + t. The architecture is a plain GPT: learned token and position
embeddings, pre-LayerNorm blocks of causal multi-head self-attention and a
GELU MLP, a final LayerNorm and an untied output layer of V logits. There is
no dropout.

The KV cache is an ordinary pytree, a tuple with one dict per layer:
`cache[i]['key']` and `cache[i]['value']` are float [B, H, S, Dh] with
S = L0 + T slots, H heads and Dh = width / H. Slot j contains the key and
value of input token j. The cache stores no decoding index, because the position is
an argument of `decode_step`, so callers may vmap over positions. Heads come
before slots so that a decode step's attention products read the cache in
its stored layout: with slots first, XLA copied both buffers of every
layer into that layout at every step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hi_jax.policy import Policy, PyTree

# Floating dtypes a config may name.
_DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")

# Standard deviation of the normal initialisation of embeddings and weights.
_INIT_STDDEV = 0.02


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"TransformerConfig.{name} must be an int >= {minimum}; got "
            f"{value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(
            f"TransformerConfig.{name} must be an int >= {minimum}; got {value}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a `TransformerPolicy`, hashable so that it can be static data.

    `prompt` is normalised to a tuple of ints and `max_len=None` to the
    required length 1 + len(prompt) + response_length.
    """

    # V, the output vocabulary size, at least 2. The BOS token is id V.
    vocab_size: int
    # T, the number of response tokens, at least 1.
    response_length: int
    # D, the residual stream width, at least 1 and divisible by num_heads.
    width: int = 64
    # Number of transformer blocks, at least 1.
    depth: int = 2
    # H, the number of attention heads, at least 1.
    num_heads: int = 4
    # Ratio of the MLP hidden width to `width`, an int of at least 1.
    mlp_ratio: int = 4
    # Number of positions the position embedding covers: None or at least
    # 1 + len(prompt) + response_length.
    max_len: int | None = None
    # Token ids in [0, V) fed after BOS and before the response, possibly none.
    prompt: tuple[int, ...] = ()
    # Name of the dtype of parameters, activations and cache: float32,
    # float64, bfloat16, float16, or None for jax's default float (float64
    # when jax_enable_x64 is on).
    dtype: str | None = None

    def __post_init__(self):
        _check_int("vocab_size", self.vocab_size, 2)
        _check_int("response_length", self.response_length, 1)
        _check_int("width", self.width, 1)
        _check_int("depth", self.depth, 1)
        _check_int("num_heads", self.num_heads, 1)
        _check_int("mlp_ratio", self.mlp_ratio, 1)
        if self.width % self.num_heads != 0:
            raise ValueError(
                f"TransformerConfig.width must be divisible by num_heads="
                f"{self.num_heads}; got width={self.width}")

        if isinstance(self.prompt, (str, bytes)):
            raise ValueError(
                "TransformerConfig.prompt must be a sequence of int token ids in "
                f"[0, {self.vocab_size - 1}]; got the string {self.prompt!r}")
        try:
            prompt = tuple(self.prompt)
        except TypeError:
            raise ValueError(
                "TransformerConfig.prompt must be a sequence of int token ids in "
                f"[0, {self.vocab_size - 1}]; got {self.prompt!r}") from None
        for i, token in enumerate(prompt):
            is_int = isinstance(token, (int, np.integer)) and not isinstance(token, bool)
            if not is_int or not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"TransformerConfig.prompt[{i}] must be an int token id in "
                    f"[0, {self.vocab_size - 1}]; got {token!r}")
        object.__setattr__(self, "prompt", tuple(int(token) for token in prompt))

        required_len = 1 + len(self.prompt) + self.response_length
        if self.max_len is None:
            object.__setattr__(self, "max_len", required_len)
        else:
            _check_int("max_len", self.max_len, required_len)
            object.__setattr__(self, "max_len", int(self.max_len))

        if self.dtype is not None and self.dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"TransformerConfig.dtype must be None or one of {_DTYPE_NAMES}; "
                f"got {self.dtype!r}")

    @property
    def prefix_length(self) -> int:
        """L0 = 1 + len(prompt), the number of input tokens before y_0."""
        return 1 + len(self.prompt)

    @property
    def num_slots(self) -> int:
        """S = L0 + T, the number of KV cache slots per layer."""
        return self.prefix_length + self.response_length

    @property
    def head_dim(self) -> int:
        """Dh = width / num_heads."""
        return self.width // self.num_heads


# Flax modules --------------------------------------------------------------


def _dense(features: int, param_dtype, name: str, stddev: float = _INIT_STDDEV):
    return nn.Dense(
        features,
        kernel_init=nn.initializers.normal(stddev),
        bias_init=nn.initializers.zeros,
        param_dtype=param_dtype,
        name=name)


class _CausalSelfAttention(nn.Module):
    """Multi-head self-attention over the KV cache slots up to each query."""

    config: TransformerConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, start):
        """Attends from inputs at slots start ... start + L - 1.

        Args:
          x: float [B, L, D] normalised inputs.
          layer_cache: None, when x is the whole input sequence, or a dict of
            float [B, H, S, Dh] 'key' and 'value' buffers that receive the
            keys and values of x at slots start ... start + L - 1.
          start: int scalar, the slot of x[:, 0]; must be 0 without a cache.

        Returns:
          (float [B, L, D], dict of the float [B, H, S, Dh] keys and values
          attended to, with S = L when there is no cache).
        """
        cfg = self.config
        batch, length, _ = x.shape
        heads, head_dim = cfg.num_heads, cfg.head_dim
        residual_stddev = _INIT_STDDEV / math.sqrt(2 * cfg.depth)

        qkv = _dense(3 * cfg.width, self.param_dtype, "qkv")(x)
        query, key, value = jnp.split(qkv, 3, axis=-1)
        query = query.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
        key = key.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
        value = value.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)

        if layer_cache is None:
            keys, values = key, value
        else:
            zero = jnp.zeros_like(start)
            index = (zero, zero, start, zero)
            keys = jax.lax.dynamic_update_slice(
                layer_cache["key"], key.astype(layer_cache["key"].dtype), index)
            values = jax.lax.dynamic_update_slice(
                layer_cache["value"], value.astype(layer_cache["value"].dtype), index)

        # Query i is at slot start + i and attends to slots 0 ... start + i.
        # Later slots are masked, so stale cache entries are never read.
        num_slots = keys.shape[2]
        query_slots = start + jnp.arange(length)
        mask = jnp.arange(num_slots)[None, :] <= query_slots[:, None]  # [L, S]

        if length == 1:
            # A decode step: without the query axis of length 1, the products
            # are plain batched matrix-vector products over (B, H).
            scores = jnp.einsum("bhd,bhsd->bhs", query[:, :, 0], keys) * head_dim**-0.5
            scores = jnp.where(mask[0], scores, jnp.finfo(scores.dtype).min)
            weights = jax.nn.softmax(scores, axis=-1)
            out = jnp.einsum("bhs,bhsd->bhd", weights, values)[:, None]  # [B, 1, H, Dh]
        else:
            scores = jnp.einsum("bhld,bhsd->bhls", query, keys) * head_dim**-0.5
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
            weights = jax.nn.softmax(scores, axis=-1)
            out = jnp.einsum("bhls,bhsd->blhd", weights, values)
        out = out.reshape(batch, length, cfg.width)
        out = _dense(cfg.width, self.param_dtype, "out", residual_stddev)(out)
        return out, {"key": keys, "value": values}


class _Mlp(nn.Module):
    """Two dense layers with a GELU between them."""

    config: TransformerConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        residual_stddev = _INIT_STDDEV / math.sqrt(2 * cfg.depth)
        hidden = _dense(cfg.mlp_ratio * cfg.width, self.param_dtype, "hidden")(x)
        hidden = nn.gelu(hidden)
        return _dense(cfg.width, self.param_dtype, "out", residual_stddev)(hidden)


class _Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    config: TransformerConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, start):
        h = nn.LayerNorm(param_dtype=self.param_dtype, name="attention_norm")(x)
        h, layer_cache = _CausalSelfAttention(
            self.config, self.param_dtype, name="attention")(h, layer_cache, start)
        x = x + h
        h = nn.LayerNorm(param_dtype=self.param_dtype, name="mlp_norm")(x)
        x = x + _Mlp(self.config, self.param_dtype, name="mlp")(h)
        return x, layer_cache


class _Decoder(nn.Module):
    """Embeddings, `depth` blocks, a final LayerNorm and the output layer."""

    config: TransformerConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, cache, start):
        """Runs input ids at slots start ... start + L - 1.

        Args:
          ids: int [B, L] input token ids in [0, V], V being BOS.
          cache: None, when ids is the whole input sequence, or a tuple of
            `depth` dicts of float [B, H, S, Dh] 'key' and 'value' buffers.
          start: int scalar slot of ids[:, 0]; must be 0 without a cache.

        Returns:
          (logits float [B, L, V], the tuple of per-layer keys and values).
        """
        cfg = self.config
        length = ids.shape[1]
        # dynamic_slice needs all indices of one dtype, also under x64.
        start = jnp.asarray(start, jnp.int32)
        token_embed = nn.Embed(
            cfg.vocab_size + 1, cfg.width,
            embedding_init=nn.initializers.normal(_INIT_STDDEV),
            param_dtype=self.param_dtype, name="token_embed")
        position_table = self.param(
            "position_embed", nn.initializers.normal(_INIT_STDDEV),
            (cfg.max_len, cfg.width), self.param_dtype)

        positions = jax.lax.dynamic_slice(
            position_table, (start, jnp.zeros_like(start)), (length, cfg.width))
        x = token_embed(ids) + positions[None]

        new_cache = []
        for layer in range(cfg.depth):
            layer_cache = None if cache is None else cache[layer]
            x, layer_cache = _Block(
                cfg, self.param_dtype, name=f"block_{layer}")(x, layer_cache, start)
            new_cache.append(layer_cache)

        x = nn.LayerNorm(param_dtype=self.param_dtype, name="final_norm")(x)
        logits = _dense(cfg.vocab_size, self.param_dtype, "head")(x)
        return logits, tuple(new_cache)


@functools.lru_cache(maxsize=None)
def _decoder(config: TransformerConfig) -> _Decoder:
    # Applying a module needs no param_dtype, so one instance per config serves
    # every policy; `TransformerPolicy.init` builds its own.
    return _Decoder(config)


# Policy ---------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class TransformerPolicy(Policy):
    """A decoder-only transformer over responses of T tokens after a fixed prompt.

    The parameters are the Flax parameter dict of the model and the only
    pytree leaves; the `TransformerConfig` is static. The logits of y_t are
    those of the model at input index L0 - 1 + t of
    [BOS, prompt..., y_0, ..., y_{T-1}], so they depend on the prompt and y_<t
    only.
    """

    def __init__(self, params: PyTree, config: TransformerConfig):
        self._params = params
        self.config = config
        self.vocab_size = config.vocab_size
        self.response_length = config.response_length

    @classmethod
    def init(cls, key: jax.Array, config: TransformerConfig) -> "TransformerPolicy":
        """Initialises the parameters from `key`.

        Embeddings and dense kernels are normal with standard deviation 0.02,
        the output projections of attention and MLP 0.02 / sqrt(2 * depth),
        and biases are zero. The parameter dtype is `config.dtype`, or jax's
        default float when that is None.

        Raises:
          ValueError: if config.dtype is float64 and jax_enable_x64 is off.
        """
        if config.dtype is None:
            dtype = jnp.result_type(float)
        else:
            dtype = jnp.dtype(config.dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError(
                "TransformerConfig.dtype='float64' needs jax_enable_x64; enable it "
                "with jax.config.update('jax_enable_x64', True) or use float32")
        model = _Decoder(config, param_dtype=dtype)
        ids = jnp.zeros((1, config.num_slots), jnp.int32)
        # Jitted because eager Flax init dispatches op by op and takes seconds.
        variables = jax.jit(lambda k: model.init(k, ids, None, 0))(key)
        return cls(variables["params"], config)

    # Policy interface -----------------------------------------------------

    @property
    def params(self) -> PyTree:
        return self._params

    def replace_params(self, params: PyTree) -> "TransformerPolicy":
        return TransformerPolicy(params, self.config)

    def _static(self) -> tuple:
        return (self.config,)

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(children[0], *static)

    def num_params(self) -> int:
        """P, the number of scalar parameters."""
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self._params))

    def _apply(self, ids, cache, start):
        return _decoder(self.config).apply({"params": self._params}, ids, cache, start)

    def _check_tokens_shape(self, name: str, tokens, ndim: int) -> None:
        T = self.response_length
        expected = "[B, T]" if ndim == 2 else "[B]"
        if tokens.ndim != ndim or (ndim == 2 and tokens.shape[1] != T):
            raise ValueError(
                f"{name} must have shape {expected} with T={T}; got {tokens.shape}")

    def _input_ids(self, tokens: jax.Array) -> jax.Array:
        """[BOS, prompt..., tokens...] as int32 [B, L0 + T]."""
        cfg = self.config
        batch = tokens.shape[0]
        head = jnp.asarray((cfg.vocab_size,) + cfg.prompt, jnp.int32)
        head = jnp.broadcast_to(head, (batch, cfg.prefix_length))
        return jnp.concatenate([head, tokens.astype(jnp.int32)], axis=1)

    def logits(self, tokens: jax.Array) -> jax.Array:
        """Teacher-forced logits from one causal forward pass.

        Args:
          tokens: int [B, T] response tokens in [0, V).

        Returns:
          float [B, T, V]; entry [b, t] is the logit vector of y_t given the
          prompt and tokens[b, :t].
        """
        logits, _ = self.prefill(tokens)
        return logits

    def prefill(self, tokens: jax.Array) -> tuple[jax.Array, PyTree]:
        """Encodes whole responses and returns their logits and the KV cache.

        The cache contains the keys and values of all L0 + T input tokens. It is
        valid for decoding from any position s: `decode_step` at s overwrites
        slot L0 + s before attending, and attention masks the slots after it.

        Args:
          tokens: int [B, T] response tokens in [0, V).

        Returns:
          (logits float [B, T, V] as in `logits`, cache: a tuple of `depth`
          dicts of float [B, H, S, Dh] 'key' and 'value', S = L0 + T).
        """
        tokens = jnp.asarray(tokens)
        self._check_tokens_shape("tokens", tokens, 2)
        L0, T = self.config.prefix_length, self.response_length
        outputs, cache = self._apply(self._input_ids(tokens), None, 0)
        return outputs[:, L0 - 1:L0 - 1 + T], cache

    def decode_step(self, cache: PyTree, tokens: jax.Array,
                    position: jax.Array) -> tuple[jax.Array, PyTree]:
        """Writes the keys and values of y_position and returns the logits of y_{position+1}.

        Works under jit and vmap with a traced `position`.

        Args:
          cache: a cache from `prefill` or `decode_step` whose slots before
            L0 + position contain the prompt and y_<position.
          tokens: int [B], the tokens y_position.
          position: int scalar in [0, T - 1]. At T - 1 the returned logits
            are meaningless. A traced position outside that range is clamped
            by `jax.lax.dynamic_update_slice` and gives wrong results.

        Returns:
          (logits float [B, V], the cache with slot L0 + position written).

        Raises:
          ValueError: if tokens is not 1-D, or a concrete position is out of range.
        """
        tokens = jnp.asarray(tokens)
        self._check_tokens_shape("tokens", tokens, 1)
        T = self.response_length
        if isinstance(position, (int, np.integer)) and not 0 <= position < T:
            raise ValueError(f"position must be in [0, {T - 1}]; got {position}")
        slot = self.config.prefix_length + jnp.asarray(position, jnp.int32)
        outputs, cache = self._apply(tokens.astype(jnp.int32)[:, None], cache, slot)
        return outputs[:, 0], cache
