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

from ia3_jax.errors import ConfigError
from ia3_jax.model import storage
from ia3_jax.model.config import T5Config

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


def _is_low_precision(dtype: Any) -> bool:
  return jnp.dtype(dtype).itemsize < 4


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec: str, a: Array, b: Array) -> Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _low_precision_einsum_fwd(spec, a, b):
  return _low_precision_einsum(spec, a, b), (a, b)


def _contracts_trailing(spec: str) -> bool:
  """Whether the first operand of a two-operand einsum is summed over its last indices only.

  XLA:CPU runs low-precision products with float32 results only through its
  YNNPACK dot fusions; a product summed over a leading or middle index of
  its first operand falls back to a kernel without bf16 x bf16 -> f32.
  """
  inputs, out = spec.replace("...", "*").split("->")
  lhs, rhs = inputs.split(",")
  summed = [c for c in lhs if c not in out]
  return bool(summed) and "*" not in summed and set(lhs[-len(summed):]) == set(summed)


def _cotangent_einsum(spec: str, x: Array, y: Array, dtype: Any) -> Array:
  """One operand's cotangent: in `dtype` with float32 sums where XLA:CPU can, else float32."""
  if not _contracts_trailing(spec):
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  out = jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)
  return out.astype(dtype)


def _low_precision_einsum_bwd(spec, res, g):
  # Each operand's cotangent is itself a two-operand einsum; computing it from
  # a cotangent rounded to the operands' dtype keeps the backward products in
  # low precision with float32 sums too (JAX's own transpose of a
  # preferred_element_type=float32 product would multiply in float32).
  a, b = res
  inputs, out = spec.split("->")
  sa, sb = inputs.split(",")
  g = g.astype(a.dtype)
  da = _cotangent_einsum(f"{out},{sb}->{sa}", g, b, a.dtype)
  db = _cotangent_einsum(f"{out},{sa}->{sb}", g, a, b.dtype)
  return da, db


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def einsum(spec: str, a: Array, b: Array, dtype: Any) -> Array:
  """Two-operand `jnp.einsum` with inputs cast to `dtype` and float32 sums and result.

  For float32 it is exactly `jnp.einsum`. For a low-precision `dtype`
  (bfloat16) both the forward and the backward products take `dtype`
  inputs and accumulate in float32 (XLA:CPU's bf16 x bf16 -> f32 kernels
  are about twice as fast as its f32 ones, and as its bf16 -> bf16 ones).
  `spec` must name every index of an operand in the output or in the other
  operand (true of projections and attention products).
  """
  a, b = a.astype(dtype), b.astype(dtype)
  if not _is_low_precision(dtype):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  if not _contracts_trailing(spec):  # no low-precision kernel for it on CPU
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
  return _low_precision_einsum(spec, a, b)


def matmul(x: Array, y: Array, dtype: Any, output_dtype: Any = None) -> Array:
  """`x [..., K] @ y [K, N]` via `einsum`: inputs in `dtype`, float32 sums; the
  result in `output_dtype` (float32 when None)."""
  out = einsum("...k,kn->...n", x, y, dtype)
  return out if output_dtype is None else out.astype(output_dtype)


class Dense(nn.Module):
  """Bias-free projection with a 2-D `kernel [in, out]` (T5X DenseGeneral).

  Inputs and kernel are cast to `dtype`, the products accumulated in
  float32, and the result returned in `output_dtype` (default: `dtype`).
  """

  features: int
  kernel_axes: tuple[str, str]
  dtype: Any = jnp.float32
  kernel_init: Initializer = default_kernel_init()
  output_dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", logical(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), jnp.float32)
    kernel = storage.materialize(kernel, self.dtype, after=x)  # cast or dequantised, per layer
    return matmul(x, kernel, self.dtype, self.output_dtype or self.dtype)


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
    """Logits `query @ embedding.T` (inputs in `dtype`, float32 accumulation and result)."""
    return matmul(query, self.embedding.T, self.dtype)


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
    """`bias` is additive, broadcastable to [B, heads, q_len, k_len] (k_len of the cache when decoding).

    Grouped (cross-)attention: `inputs_kv` may have fewer rows than
    `inputs_q`, Bkv dividing Bq; query rows b*g .. b*g + g - 1 (g = Bq / Bkv,
    the `jnp.repeat` layout) then all attend to key/value row b, whose keys
    and values are computed once instead of g times. `bias` must then be
    broadcastable to [Bkv, heads, 1, k_len], and `task_id` rows must agree
    within a group (the key/value projections see `task_id[::g]`).
    `bias` is then either shared by a group, broadcastable to
    [Bkv, heads, 1, k_len], or per query row, [Bq, heads or 1, q_len or 1,
    k_len] (e.g. T5X's masking of padded decoder rows; see `group_bias`).
    """
    cfg = self.config
    dtype = cfg.activation_dtype
    joined = cfg.joined_kv
    groups = attention_groups(inputs_q.shape[0], inputs_kv.shape[0])
    kv_task_id = task_id if groups == 1 or task_id is None else task_id[::groups]
    # T5X: the fan-in init's sample divided by sqrt(head_dim), i.e. a variance of
    # 1 / (emb_dim * head_dim) (HF: std (d_model * d_kv)^-0.5).
    query_init = default_kernel_init(1.0 / cfg.head_dim)
    q = self.project(inputs_q, "query", joined, ("embed", "joined_kv"), task_id, query_init)
    k = self.project(inputs_kv, "key", joined, ("embed", "joined_kv"), kv_task_id)
    v = self.project(inputs_kv, "value", joined, ("embed", "joined_kv"), kv_task_id)
    q, k, v = (self._split_heads(t) for t in (q, k, v))
    if decode:
      k, v = self._update_cache(k, v, decode_position)
    k, v, bias = self.extend_kv(k, v, bias, kv_task_id)
    batch_q, len_q = q.shape[:2]
    if groups > 1:  # each key/value row serves its group's queries in one product
      q = q.reshape((k.shape[0], groups * len_q) + q.shape[2:])
      bias = group_bias(bias, groups, batch_q, len_q)

    dropout = cfg.dropout_rate > 0 and not deterministic
    if cfg.attention_impl == "dot_product_attention" and not dropout:
      out = dot_product_attention(q, k, v, bias, dtype, cfg.dpa_implementation)
    else:
      q, k, v = (heads_major(t) for t in (q, k, v))
      if dropout:
        weights = attention_weights(q, k, bias, dtype)
        # One mask per query row, shared over its query positions (T5X); the
        # rows of a group get independent masks, as they would if repeated.
        shape = weights.shape
        if groups > 1:
          weights = weights.reshape(shape[:2] + (groups, len_q) + shape[3:])
        weights = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(weights, deterministic=False)
        out = weighted_sum(weights.reshape(shape), v, dtype)
      else:
        out = attention_core(q, k, v, bias, dtype)
      out = heads_major(out.astype(dtype))
    out = out.reshape((batch_q, len_q) + out.shape[2:])
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


def group_bias(bias: Array, groups: int, batch_q: int, len_q: int) -> Array:
  """A per-query-row bias [Bq, h, q_len or 1, k] in the grouped logits' layout
  [Bq / g, h, g * q_len, k]; a bias with fewer rows (shared by a group) is returned as is."""
  if groups == 1 or bias.shape[0] != batch_q:
    return bias
  heads, k_len = bias.shape[1], bias.shape[-1]
  bias = jnp.broadcast_to(bias, (batch_q, heads, len_q, k_len))
  bias = bias.reshape((batch_q // groups, groups, heads, len_q, k_len)).swapaxes(1, 2)
  return bias.reshape((batch_q // groups, heads, groups * len_q, k_len))


def attention_groups(batch_q: int, batch_kv: int) -> int:
  """How many query rows each key/value row serves (grouped attention); raises if it does not divide."""
  if batch_kv < 1 or batch_q % batch_kv:
    raise ValueError(f"attention: {batch_kv} key/value rows cannot serve {batch_q} query rows "
                     "(the query batch must be a multiple of the key/value batch)")
  return batch_q // batch_kv


def heads_major(x: Array) -> Array:
  """[B, len, heads, d] <-> [B, heads, len, d] (its own inverse)."""
  return jnp.swapaxes(x, 1, 2)


def attention_weights(q: Array, k: Array, bias: Array, dtype: Any) -> Array:
  """softmax(q k^T + bias) [B, h, q, k] in `dtype`, from float32 logits (T5: no 1/sqrt(d)),
  for heads-major q, k [B, h, len, d].

  Heads-major operands make both attention products plain batched matmuls; with
  [B, len, h, d] ones XLA:CPU fused the softmax and the weighted sum into one
  library call that ran 3x slower in the forward pass (inference).
  """
  logits = einsum("bhqd,bhkd->bhqk", q, k, dtype) + bias.astype(jnp.float32)
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def weighted_sum(weights: Array, v: Array, dtype: Any) -> Array:
  """The attention output [B, h, q, d] (float32): `weights` [B, h, q, k] times heads-major `v`."""
  return einsum("bhqk,bhkd->bhqd", weights, v, dtype)


def _normalised_first(q: Array, k: Array, v: Array, bias: Array, dtype: Any) -> Array:
  return weighted_sum(attention_weights(q, k, bias, dtype), v, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention_core(q: Array, k: Array, v: Array, bias: Array, dtype: Any) -> Array:
  """softmax(q k^T + bias) v [B, h, q, d] (float32) for heads-major q, k, v [B, h, len, d].

  Evaluated in float32, it normalises after the weighted sum (exp(logits - max)
  v / sum exp): XLA:CPU's YNNPACK runs a batched [256 x 64 x 256] product alone
  on one core but a fusion of it with row sums on all of them (fp32 rank
  classification 4-8% faster on 2 cores). In bf16 the normalised weights are
  rounded, as `jax.nn.dot_product_attention` does. Differentiated, it is
  `attention_weights` then `weighted_sum`: the backward pass needs the
  normalised weights anyway, and training computes exactly what it did.
  """
  if _is_low_precision(dtype):
    return _normalised_first(q, k, v, bias, dtype)
  logits = einsum("bhqd,bhkd->bhqk", q, k, dtype) + bias.astype(jnp.float32)
  unnormalized = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
  return weighted_sum(unnormalized, v, dtype) / unnormalized.sum(axis=-1, keepdims=True)


def _attention_core_fwd(*primals: jax.custom_derivatives.CustomVJPPrimal):
  # Only the perturbed inputs get a cotangent (as plain autodiff would): a frozen
  # layer's query needs none, and the step's traced program holds no dead products.
  *arrays, dtype = primals
  values = [p.value for p in arrays]
  which = [i for i, p in enumerate(arrays) if p.perturbed]

  def of_perturbed(*diff: Array) -> Array:
    args = list(values)
    for i, x in zip(which, diff):
      args[i] = x
    return _normalised_first(*args, dtype)
  out, vjp_fn = jax.vjp(of_perturbed, *(values[i] for i in which))
  return out, (vjp_fn, dict.fromkeys(which))  # the dict's keys travel in its structure


def _attention_core_bwd(dtype: Any, res: tuple[Callable, dict], g: Array) -> tuple:
  del dtype
  vjp_fn, which = res
  cotangents = [None] * 4  # None: a symbolic zero
  if not isinstance(g, jax.custom_derivatives.SymbolicZero):
    for i, ct in zip(which, vjp_fn(g)):
      cotangents[i] = ct
  return tuple(cotangents)


attention_core.defvjp(_attention_core_fwd, _attention_core_bwd, symbolic_zeros=True)


def check_dpa_implementation(implementation: Optional[str], dtype: Any) -> None:
  """One-line error for a `jax.nn.dot_product_attention` implementation this backend or
  activation dtype lacks."""
  if implementation != "cudnn":
    return
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ConfigError(f"T5Config.dpa_implementation='cudnn' needs bfloat16 or float16 "
                      f"activations, got dtype {jnp.dtype(dtype).name!r} (use None or 'xla')")
  backend = jax.default_backend()
  if backend not in ("gpu", "cuda"):
    raise ConfigError(f"T5Config.dpa_implementation='cudnn' needs a CUDA GPU; the JAX backend "
                      f"here is {backend!r} (use None or 'xla')")


def dot_product_attention(q: Array, k: Array, v: Array, bias: Array, dtype: Any,
                          implementation: Optional[str] = None) -> Array:
  """The T5 attention core through `jax.nn.dot_product_attention`: [B, q, h, d] in `dtype`.

  The same numbers as `attention_weights` then the weighted sum: `scale=1.0`
  (the query init holds T5's scaling), the relative-position bias with the
  padding/causal mask folded in (NEG_INF) as `bias`, float32 logits and
  softmax, probabilities in `dtype` for the product with `v`. cuDNN wants
  the bias at full [q, k] size and in the inputs' dtype.
  """
  check_dpa_implementation(implementation, dtype)
  q, k, v = (t.astype(dtype) for t in (q, k, v))
  bias = bias.astype(jnp.float32)
  if implementation == "cudnn":
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (q.shape[1], k.shape[1])).astype(dtype)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0,
                                     implementation=implementation)
  return out.astype(dtype)


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
