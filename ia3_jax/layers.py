"""T5X-compatible building blocks: projections, norms, attention, MLP, embeddings.

Parameter names and shapes follow T5X (`query/kernel [embed, joined_kv]`, ...),
so T5X and HF checkpoints map one to one. Every block that holds a projection
routes it through `Projecting.project`, the single override point that
parameter-efficient methods ((IA)^3, LoRA, BitFit, ...) subclass.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax.config import T5Config

Array = jax.Array
Initializer = Callable[..., Array]

NEG_INF = -1e10  # additive bias for masked attention logits (T5X convention)


def logical(init: Initializer, axes: Sequence[Optional[str]]) -> Initializer:
  """Annotates a param initializer with logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: Array, axes: Sequence[Optional[str]]) -> Array:
  """Logical sharding constraint on an activation (no-op without rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


def default_kernel_init(scale: float = 1.0) -> Initializer:
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class Dense(nn.Module):
  """Bias-free projection with a 2-D `kernel [in, out]` (T5X DenseGeneral)."""

  features: int
  kernel_axes: tuple[str, str]
  dtype: Any = jnp.float32
  kernel_init: Initializer = default_kernel_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", logical(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class LayerNorm(nn.Module):
  """T5 RMS norm: no mean subtraction, no bias, computed in float32."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", logical(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding `embedding [vocab, embed]`, also usable as the output layer."""

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", logical(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, query: Array) -> Array:
    return jnp.dot(query.astype(self.dtype), self.embedding.T.astype(self.dtype))


def relative_position_bucket(relative_position: Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
  """T5's bucketing of `memory_position - query_position` (exact near, log far)."""
  n = -relative_position
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
               / np.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(n.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
  """Learned per-head bias `rel_embedding [heads, buckets]`, one per stack."""

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array, bidirectional: bool) -> Array:
    """Returns a bias of shape [1, heads, q_len, k_len]."""
    rel_embedding = self.param(
        "rel_embedding",
        logical(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), jnp.float32)
    rel = key_positions[None, :] - query_positions[:, None]
    buckets = relative_position_bucket(rel, bidirectional=bidirectional,
                                       num_buckets=self.num_buckets,
                                       max_distance=self.max_distance)
    values = jnp.take(rel_embedding, buckets, axis=1)  # [heads, q, k]
    return values[None].astype(self.dtype)


def mask_to_bias(mask: Array, dtype: Any) -> Array:
  """Boolean attention mask -> additive bias (0 where attended, NEG_INF where masked)."""
  return jnp.where(mask, 0.0, NEG_INF).astype(dtype)


def padding_mask(query_valid: Array, key_valid: Array) -> Array:
  """[B, q] x [B, k] validity -> [B, 1, q, k] mask."""
  return (query_valid[:, None, :, None] & key_valid[:, None, None, :])


def causal_mask(length: int) -> Array:
  idx = jnp.arange(length)
  return (idx[None, :] <= idx[:, None])[None, None]


class Projecting(nn.Module):
  """Mixin giving a block one overridable way to create its projections.

  Subclasses of the attention or MLP blocks override `project` (call
  `super().project` and modify its input or output) to add (IA)^3 scaling,
  LoRA deltas, biases, ... without copying the network. `task_id [B]` is
  threaded through so mixed-task adapters can pick a row per example.
  """

  config: T5Config

  def project(self, x: Array, name: str, features: int, kernel_axes: tuple[str, str],
              task_id: Optional[Array], kernel_init: Optional[Initializer] = None) -> Array:
    del task_id  # the base network has no per-task parameters
    return Dense(features, kernel_axes, dtype=self.config.activation_dtype,
                 kernel_init=kernel_init or default_kernel_init(), name=name)(x)


class MultiHeadDotProductAttention(Projecting):
  """T5 attention: no 1/sqrt(d) scaling at run time (it lives in the query init)."""

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array, *,
               task_id: Optional[Array] = None, deterministic: bool = True,
               decode: bool = False, decode_position: Optional[Array] = None) -> Array:
    """`bias` is additive, broadcastable to [B, heads, q_len, k_len] (k_len of the cache when decoding)."""
    cfg = self.config
    dtype = cfg.activation_dtype
    joined = cfg.joined_kv
    query_init = default_kernel_init(1.0 / np.sqrt(cfg.head_dim))
    q = self.project(inputs_q, "query", joined, ("embed", "joined_kv"), task_id, query_init)
    k = self.project(inputs_kv, "key", joined, ("embed", "joined_kv"), task_id)
    v = self.project(inputs_kv, "value", joined, ("embed", "joined_kv"), task_id)
    q, k, v = (self._split_heads(t) for t in (q, k, v))
    if decode:
      k, v = self._update_cache(k, v, decode_position)
    k, v, bias = self.extend_kv(k, v, bias, task_id)

    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias.astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if cfg.dropout_rate > 0 and not deterministic:
      weights = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(weights, deterministic=False)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    out = constrain(out, ("batch", "length", "heads", "kv"))
    out = out.reshape(out.shape[:2] + (joined,))
    return self.project(out, "out", cfg.emb_dim, ("joined_kv", "embed"), task_id)

  def _split_heads(self, x: Array) -> Array:
    x = x.reshape(x.shape[:2] + (self.config.num_heads, self.config.head_dim))
    return constrain(x, ("batch", "length", "heads", "kv"))

  def extend_kv(self, k: Array, v: Array, bias: Array,
                task_id: Optional[Array]) -> tuple[Array, Array, Array]:
    """Hook for methods that add keys/values (prefix tuning). Identity here."""
    del task_id
    return k, v, bias

  def _update_cache(self, k: Array, v: Array, position: Optional[Array]) -> tuple[Array, Array]:
    """Autoregressive cache: writes this step's key/value at `position`.

    The first (initialising) call sees the full decode length and only
    allocates the cache; later calls see one token each.
    """
    initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    if not initialized:
      return k, v
    if k.shape[1] != 1:
      raise ValueError(f"decode=True expects one token per step, got length {k.shape[1]}")
    start = (0, position, 0, 0)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), start)
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), start)
    return cached_k.value, cached_v.value


ACTIVATION_FNS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),  # HF "gelu_new", T5X nn.gelu
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}


class MlpBlock(Projecting):
  """T5 feed-forward: `wi` (one activation) or gated `wi_0, wi_1`, then `wo`."""

  @nn.compact
  def __call__(self, inputs: Array, *, task_id: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    cfg = self.config
    acts = cfg.mlp_activations
    branches = []
    for i, act in enumerate(acts):
      name = "wi" if len(acts) == 1 else f"wi_{i}"
      h = self.project(inputs, name, cfg.mlp_dim, ("embed", "mlp"), task_id)
      branches.append(ACTIVATION_FNS[act](h))
    x = functools.reduce(jnp.multiply, branches)
    x = constrain(x, ("batch", "length", "mlp"))
    if cfg.dropout_rate > 0 and not deterministic:
      x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=False)
    return self.project(x, "wo", cfg.emb_dim, ("mlp", "embed"), task_id)
