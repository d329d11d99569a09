"""Llama-family decoder-only language models (Llama 2/3, Mistral, Qwen2) in the T5X style.

The param tree follows T5X's decoder-only network, so the projections carry the
same names as in the T5 blocks and every PEFT mixin ((IA)^3, LoRA, BitFit)
applies through `Blocks.override` unchanged:

  token_embedder/embedding                                [vocab, embed]
  decoder/layers_i/pre_self_attention_layer_norm/scale    (HF input_layernorm)
  decoder/layers_i/self_attention/query/kernel            [embed, heads * head_dim]  (q_proj)
  decoder/layers_i/self_attention/{key,value}/kernel      [embed, kv_heads * head_dim] (k/v_proj)
  decoder/layers_i/self_attention/{query,key,value}/bias  (Qwen2: attention_bias)
  decoder/layers_i/self_attention/out/kernel              [heads * head_dim, embed]  (o_proj)
  decoder/layers_i/pre_mlp_layer_norm/scale               (HF post_attention_layernorm)
  decoder/layers_i/mlp/{wi_0,wi_1}/kernel                 [embed, mlp]  (gate_proj, up_proj)
  decoder/layers_i/mlp/wo/kernel                          [mlp, embed]  (down_proj)
  decoder/decoder_norm/scale                              (HF model.norm)
  decoder/logits_dense/kernel                             [embed, vocab] (lm_head; absent if tied)

Attention is grouped-query (`num_kv_heads` key/value heads, each serving
`num_heads / num_kv_heads` consecutive query heads, as HF's `repeat_kv`), scaled by
`head_dim^-0.5`, with rotary embeddings in HF's rotate-half convention at explicit
position ids. The mask is causal (optionally a sliding window) and masks padded keys,
so left and right padding both work; by default positions count only the valid tokens
(`attention_mask.cumsum() - 1`, as HF's `generate`), so a left-padded row gives the
logits of the unpadded one.

Rank classification (`objectives/decoder_scoring`) runs each prompt once (`prefill`,
filling the key/value cache) and its answer choices as rows continuing that cache
(`continuation_logits`, `shared_cache=True`: the rows of one prompt read its cached keys
and values in place, `prefix_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax.model import layers, network
from ia3_jax.model.decoder_config import DecoderConfig

Array = jax.Array


# --------------------------------------------------------------------------- rotary embeddings


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
  """Inverse frequencies [head_dim / 2] (float32, as HF computes them), with rope scaling."""
  dim = config.head_dim
  inv = (1.0 / (np.float32(config.rope_theta)
                ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
  scaling = config.rope_scaling
  if scaling is None:
    return inv
  if scaling["rope_type"] == "linear":
    return (inv / np.float32(scaling["factor"])).astype(np.float32)
  return _llama3_inv_freq(inv, scaling)


def _llama3_inv_freq(inv: np.ndarray, scaling: dict) -> np.ndarray:
  """Llama 3.1's frequency-dependent rescaling (long wavelengths / factor, smooth between)."""
  factor, low, high = (np.float32(scaling[k]) for k in ("factor", "low_freq_factor",
                                                         "high_freq_factor"))
  old = np.float32(scaling["original_max_position_embeddings"])
  low_wavelen, high_wavelen = old / low, old / high
  wavelen = np.float32(2 * np.pi) / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary_tables(config: DecoderConfig, position_ids: Array) -> tuple[Array, Array]:
  """(cos, sin), each [B, L, head_dim] float32, for positions [B, L]."""
  freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(config))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """`x [B, L, heads, D]` rotated: `x * cos + rotate_half(x) * sin` (HF convention)."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


# --------------------------------------------------------------------------- masks


def default_position_ids(attention_mask: Optional[Array], length: int) -> Array:
  """Positions [B, L]: valid tokens counted from 0 (pads get 1, as HF `generate`), or
  0..L-1 without a mask."""
  if attention_mask is None:
    return jnp.arange(length, dtype=jnp.int32)[None]
  mask = attention_mask.astype(jnp.int32)
  return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 1)


def attention_bias(query_index: Array, key_valid: Array, config: DecoderConfig) -> Array:
  """Additive bias [B, 1, q, k]: key j is seen from query index i when j <= i (and
  j > i - sliding_window), and `key_valid[b, j]`; indices count the sequence (pads too)."""
  keys = jnp.arange(key_valid.shape[-1])
  mask = keys[None, :] <= query_index[:, None]
  if config.sliding_window is not None:
    mask &= keys[None, :] > query_index[:, None] - config.sliding_window
  mask = mask[None, None] & key_valid.astype(bool)[:, None, None, :]
  return layers.mask_to_bias(mask, jnp.float32)


# --------------------------------------------------------------------------- blocks


class BiasedDense(layers.Dense):
  """`layers.Dense` plus a `bias [out]` (logical axis of the kernel's output)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = super().__call__(x)
    bias = self.param("bias", layers.logical(nn.initializers.zeros, (self.kernel_axes[1],)),
                      (self.features,), jnp.float32)
    return y + bias.astype(y.dtype)


class DecoderAttention(layers.Projecting):
  """Causal grouped-query self-attention with rotary embeddings (projection names as T5X)."""

  def project(self, x: Array, name: str, features: int, kernel_axes: tuple[str, str],
              task_id: Optional[Array], kernel_init: Optional[layers.Initializer] = None) -> Array:
    cfg = self.config
    biased = cfg.attention_out_bias if name == "out" else cfg.attention_bias
    if not biased:
      return super().project(x, name, features, kernel_axes, task_id, kernel_init)
    return BiasedDense(features, kernel_axes, dtype=cfg.activation_dtype,
                       kernel_init=kernel_init or layers.default_kernel_init(), name=name)(x)

  @nn.compact
  def __call__(self, x: Array, bias: Array, cos: Array, sin: Array, *,
               task_id: Optional[Array] = None, decode: bool = False,
               cache_index: Optional[Array] = None, shared_cache: bool = False) -> Array:
    """`x [B, L, E]`, `bias [B, 1, L, K]` (K: the cache length when decoding; the cache
    length + L with `shared_cache`), `cos`/`sin` [B, L, head_dim]; returns [B, L, E].
    With `shared_cache` the B rows continue the cache's B / k rows, k each (see
    `prefix_attention`); the cache is read, not written."""
    cfg = self.config
    dtype = cfg.activation_dtype
    q = self.project(x, "query", cfg.joined_kv, ("embed", "joined_kv"), task_id)
    k = self.project(x, "key", cfg.joined_kv_heads, ("embed", "joined_kv"), task_id)
    v = self.project(x, "value", cfg.joined_kv_heads, ("embed", "joined_kv"), task_id)
    q = apply_rotary(self._split(q, cfg.num_heads), cos, sin)
    k = apply_rotary(self._split(k, cfg.num_kv_heads), cos, sin)
    v = self._split(v, cfg.num_kv_heads)
    if shared_cache:
      cached = self.get_variable("cache", "cached_key")
      prompt = cached.shape[1]
      k, v, own_bias = self.extend_kv(k, v, bias[..., prompt:], task_id)
      out = prefix_attention(q, cached, self.get_variable("cache", "cached_value"), k, v,
                             jnp.concatenate([bias[..., :prompt], own_bias], axis=-1),
                             cfg.head_dim ** -0.5, dtype)
    else:
      if decode:
        k, v = self._update_cache(k, v, cache_index)
      k, v, bias = self.extend_kv(k, v, bias, task_id)
      out = grouped_attention(q, k, v, bias, cfg.head_dim ** -0.5, dtype)
    out = layers.constrain(out, ("batch", "length", "heads", "kv"))
    out = out.reshape(out.shape[:2] + (cfg.joined_kv,))
    return self.project(out, "out", cfg.emb_dim, ("joined_kv", "embed"), task_id)

  def extend_kv(self, k: Array, v: Array, bias: Array,
                task_id: Optional[Array]) -> tuple[Array, Array, Array]:
    """Hook for methods that add keys/values (prefix tuning), after the rotary embedding and
    the cache: `k, v [B, K, kv heads, D]`, `bias [B, 1, L, K]`. Identity here."""
    del task_id
    return k, v, bias

  def _split(self, x: Array, heads: int) -> Array:
    x = x.reshape(x.shape[:2] + (heads, self.config.head_dim))
    return layers.constrain(x, ("batch", "length", "heads", "kv"))

  def _update_cache(self, k: Array, v: Array, index: Optional[Array]) -> tuple[Array, Array]:
    """Writes this chunk's keys/values at `index`; the first (initialising) call only
    allocates the cache at the chunk's (full) length."""
    initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    if not initialized:
      return k, v
    start = (0, index, 0, 0)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype),
                                                  start)
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype),
                                                  start)
    return cached_k.value, cached_v.value


def grouped_attention(q: Array, k: Array, v: Array, bias: Array, scale: float,
                      dtype: Any) -> Array:
  """softmax(scale * q k^T + bias) v with `q [B, L, H, D]` and `k, v [B, K, Hkv, D]`, query
  head h reading kv head h // (H / Hkv); float32 logits and softmax; [B, L, H, D]."""
  b, length, heads, dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape((b, length, kv_heads, heads // kv_heads, dim))
  logits = layers.einsum("bqkgd,bskd->bkgqs", q, k, dtype) * scale
  logits = logits + bias.astype(jnp.float32)[:, :, None]
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  out = layers.einsum("bkgqs,bskd->bqkgd", weights, v, dtype).astype(dtype)
  return out.reshape((b, length, heads, dim))


def prefix_attention(q: Array, prefix_k: Array, prefix_v: Array, k: Array, v: Array,
                     bias: Array, scale: float, dtype: Any) -> Array:
  """`grouped_attention` of `q [N, T, H, D]` over a shared prefix and the rows' own keys.

  Row n reads the prefix of example n // (N / B) (`prefix_k, prefix_v [B, P, Hkv, D]`,
  never repeated: each example's prefix is read by all its rows), then its own `k, v
  [N, T, Hkv, D]`; `bias [N, 1, T, P + T]` covers both, in that order. One softmax over
  both; [N, T, H, D]."""
  n, length, heads, dim = q.shape
  b, prefix, kv_heads, _ = prefix_k.shape
  groups, rows = heads // kv_heads, n // b
  q = q.reshape((n, length, kv_heads, groups, dim))
  shared = layers.einsum("brqkgd,bskd->brkgqs", q.reshape((b, rows) + q.shape[1:]), prefix_k,
                         dtype).reshape((n, kv_heads, groups, length, prefix))
  own = layers.einsum("bqkgd,bskd->bkgqs", q, k, dtype)
  logits = jnp.concatenate([shared, own], axis=-1) * scale + bias.astype(jnp.float32)[:, :, None]
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  w_shared = weights[..., :prefix].reshape((b, rows, kv_heads, groups, length, prefix))
  out = (layers.einsum("brkgqs,bskd->brqkgd", w_shared, prefix_v, dtype).reshape(q.shape)
         + layers.einsum("bkgqs,bskd->bqkgd", weights[..., prefix:], v, dtype))
  return out.astype(dtype).reshape((n, length, heads, dim))


class GatedMlp(layers.Projecting):
  """SwiGLU: `wo(silu(wi_0(x)) * wi_1(x))` (HF down(silu(gate(x)) * up(x)))."""

  @nn.compact
  def __call__(self, x: Array, *, task_id: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    del deterministic  # no dropout
    cfg = self.config
    gate = self.project(x, "wi_0", cfg.mlp_dim, ("embed", "mlp"), task_id)
    up = self.project(x, "wi_1", cfg.mlp_dim, ("embed", "mlp"), task_id)
    h = layers.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return self.project(h, "wo", cfg.emb_dim, ("mlp", "embed"), task_id)


class DecoderOnlyLayer(nn.Module):
  """Pre-norm residual layer: x + attention(norm(x)), then x + mlp(norm(x))."""

  config: DecoderConfig
  blocks: "DecoderBlocks"

  @nn.compact
  def __call__(self, x: Array, bias: Array, cos: Array, sin: Array,
               cache_index: Optional[Array] = None, task_id: Optional[Array] = None,
               decode: bool = False, shared_cache: bool = False) -> Array:
    cfg, b = self.config, self.blocks
    norm = lambda name: b.layer_norm(cfg.rms_norm_eps, cfg.activation_dtype, name=name)
    y = norm("pre_self_attention_layer_norm")(x)
    y = b.attention(cfg, name="self_attention")(y, bias, cos, sin, task_id=task_id,
                                                decode=decode, cache_index=cache_index,
                                                shared_cache=shared_cache)
    x = x + y
    y = norm("pre_mlp_layer_norm")(x)
    x = x + b.mlp(cfg, name="mlp")(y, task_id=task_id)
    return layers.constrain(x, ("batch", "length", "embed"))


class DecoderOnlyStack(nn.Module):
  """The layers, final norm and output layer (param scope `decoder/`)."""

  config: DecoderConfig
  blocks: "DecoderBlocks"
  shared_embedding: nn.Module

  def prepend(self, x: Array, valid: Array, position_ids: Optional[Array],
              task_id: Optional[Array]) -> tuple[Array, Array, Optional[Array], int]:
    """Hook for methods that put vectors before a new sequence (prompt tuning): returns
    (embeddings, validity, positions or None, how many were put before). Identity here."""
    del task_id
    return x, valid, position_ids, 0

  @nn.compact
  def __call__(self, tokens: Array, attention_mask: Optional[Array] = None,
               position_ids: Optional[Array] = None, *, task_id: Optional[Array] = None,
               decode: bool = False, shared_cache: bool = False,
               logits_index: Optional[Array] = None,
               new_sequence: Optional[bool] = None) -> Array:
    cfg, b = self.config, self.blocks
    batch, length = tokens.shape
    valid = (jnp.ones((batch, length), bool) if attention_mask is None
             else attention_mask.astype(bool))
    x = self.shared_embedding(tokens)
    added = 0
    if not shared_cache and (new_sequence if new_sequence is not None else not decode):
      x, valid, position_ids, added = self.prepend(x, valid, position_ids, task_id)
      length = x.shape[1]
    index, key_valid = jnp.arange(length), valid
    cache_index = None
    if shared_cache:
      bias, position_ids = self._continuation(valid)
    else:
      if decode:
        cache_index, index, key_valid, position_ids = self._cache_step(valid, position_ids)
      if position_ids is None:
        position_ids = default_position_ids(valid, length)
      bias = attention_bias(index, key_valid, cfg)
    position_ids = jnp.broadcast_to(position_ids, (batch, length))
    cos, sin = rotary_tables(cfg, position_ids)
    x = layers.constrain(x, ("batch", "length", "embed"))
    caching = decode or shared_cache
    if b.scan_layers:
      x = network.scan_stack(b, b.decoder_layer, cfg, cfg.num_layers, x,
                             (bias, cos, sin, cache_index), task_id, remat=not caching,
                             decode=decode, shared_cache=shared_cache)
    layer_cls = b.decoder_layer
    if b.remat != "none" and not caching:  # decode, shared_cache: static (self is arg 0)
      layer_cls = nn.remat(layer_cls, prevent_cse=True, policy=network.REMAT_POLICIES[b.remat],
                           static_argnums=(7, 8))
    for i in range(0 if b.scan_layers else cfg.num_layers):
      layer = layer_cls(cfg, b, name=f"layers_{i}")
      x = layer(x, bias, cos, sin, cache_index, task_id, decode, shared_cache)
    if logits_index is not None:  # only these positions reach the output layer
      x = jnp.take_along_axis(x, logits_index.reshape((batch, -1, 1)) + added, axis=1)
    elif added:  # logits of the tokens only
      x = x[:, added:]
    x = b.layer_norm(cfg.rms_norm_eps, cfg.activation_dtype, name="decoder_norm")(x)
    if cfg.tie_word_embeddings:
      logits = self.shared_embedding.attend(x)
    else:
      logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.activation_dtype,
                            output_dtype=jnp.float32, name="logits_dense")(x)
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def _continuation(self, valid: Array) -> tuple[Array, Array]:
    """(bias [N, 1, T, P + T], positions [N, T]) of N rows of T tokens continuing the
    cache's B prompts (P slots), k = N / B rows per prompt: a row sees its prompt's valid
    tokens, then its own tokens causally; its positions count on from the prompt's valid
    tokens, and the sliding window counts positions (prompt padding takes no room)."""
    prompt_valid = self.get_variable("cache", "valid")
    rows = valid.shape[0] // prompt_valid.shape[0]
    prompt_valid = jnp.repeat(prompt_valid, rows, axis=0)
    prompt_pos = jnp.cumsum(prompt_valid.astype(jnp.int32), axis=-1) - 1
    own_pos = jnp.sum(prompt_valid, axis=-1, dtype=jnp.int32)[:, None] + default_position_ids(
        valid, valid.shape[1])
    key_pos = jnp.concatenate([prompt_pos, own_pos], axis=-1)
    causal = jnp.concatenate([jnp.ones((valid.shape[1], prompt_valid.shape[1]), bool),
                              jnp.tril(jnp.ones((valid.shape[1],) * 2, bool))], axis=-1)
    mask = causal[None] & jnp.concatenate([prompt_valid, valid], axis=-1)[:, None, :]
    if self.config.sliding_window is not None:
      mask &= key_pos[:, None, :] > own_pos[:, :, None] - self.config.sliding_window
    return layers.mask_to_bias(mask[:, None], jnp.float32), own_pos

  def _cache_step(self, valid: Array, position_ids: Optional[Array]
                  ) -> tuple[Optional[Array], Array, Array, Optional[Array]]:
    """(cache index, query indices, key validity over the cache, positions) for a chunk of
    tokens written at the cache index; the initialising call sees the full length."""
    initialized = self.has_variable("cache", "index")
    index_var = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
    valid_var = self.variable("cache", "valid", jnp.zeros, valid.shape, bool)
    length = valid.shape[1]
    if not initialized:
      return None, jnp.arange(length), valid, position_ids
    start = index_var.value
    valid_var.value = jax.lax.dynamic_update_slice(valid_var.value, valid, (0, start))
    index_var.value = start + length
    if position_ids is None:  # valid tokens so far, counted from 0 (pads: 1)
      counts = jnp.cumsum(valid_var.value.astype(jnp.int32), axis=-1) - 1
      here = jax.lax.dynamic_slice_in_dim(counts, start, length, axis=1)
      position_ids = jnp.where(valid, here, 1)
    return start, start + jnp.arange(length), valid_var.value, position_ids


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class DecoderBlocks(network.Blocks):
  """`network.Blocks` for decoder-only models: its `replace`/`override` (so `ia3_blocks`,
  `lora_blocks`, `bitfit_blocks` take it as `base=`), with the decoder-only classes.
  `decoder_layer` is one layer, `decoder` the stack; the encoder fields are unused.
  `remat` rematerialises each layer ("none", "full", "dots"); `scan_layers` runs them with
  `nn.scan` (params and the key/value cache stacked under `decoder/layers`), as for T5."""

  attention: Callable[..., nn.Module] = DecoderAttention
  mlp: Callable[..., nn.Module] = GatedMlp

  def __post_init__(self):
    for field, cls in (("decoder_layer", DecoderOnlyLayer), ("decoder", DecoderOnlyStack)):
      if getattr(self, field) is None:
        object.__setattr__(self, field, cls)
    super().__post_init__()


class DecoderOnly(nn.Module):
  """A Llama-family causal LM. Params: `token_embedder`, `decoder` (see the module doc)."""

  config: DecoderConfig
  blocks: DecoderBlocks = DecoderBlocks()

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
    self.decoder = self.blocks.decoder(cfg, self.blocks, self.token_embedder)

  def __call__(self, tokens: Array, attention_mask: Optional[Array] = None,
               position_ids: Optional[Array] = None, *, task_id: Optional[Array] = None,
               decode: bool = False, shared_cache: bool = False,
               logits_index: Optional[Array] = None,
               new_sequence: Optional[bool] = None) -> Array:
    """Float32 logits [B, L, vocab] of `tokens [B, L]` ([B, K, vocab] at the positions
    `logits_index [B, K]` alone when given: the others never reach the output layer).
    `new_sequence` (default: not decoding) marks a call that starts its sequences: the
    first chunk written to a cache, and the call that allocates it, pass True; methods
    that put vectors before a sequence (prompt tuning) do it there only.

    `attention_mask [B, L]` (1 = token, 0 = pad; default all ones) masks padded keys;
    `position_ids [B, L]` default to the valid tokens counted from 0. With `decode=True`
    the first call (see `init_cache`) allocates a cache of its length; each later call
    writes its chunk (a prompt, then one token per step) at the cache's index. With
    `shared_cache=True` (a filled cache of B prompts, see `continuation_logits`) the B * k
    rows of `tokens` continue the prompts, k rows each, reading the cache without writing.
    """
    return self.decoder(tokens, attention_mask, position_ids, task_id=task_id, decode=decode,
                        shared_cache=shared_cache, logits_index=logits_index,
                        new_sequence=new_sequence)


def init_params(model: DecoderOnly, rng: Array, *, batch_size: int = 1, length: int = 4,
                with_task_id: bool = False) -> Any:
  """Random params (unboxed float32 tree) for `model` (one compiled program, not op by op)."""
  init = jax.jit(lambda key: _init_boxed(model, key, batch_size, length, with_task_id))
  return nn.unbox(init(rng))


def _init_boxed(model, rng, batch_size, length, with_task_id):
  tokens = jnp.ones((batch_size, length), jnp.int32)
  kwargs = {"task_id": jnp.zeros((batch_size,), jnp.int32)} if with_task_id else {}
  return model.init(rng, tokens, **kwargs)["params"]


def abstract_params(model: DecoderOnly, *, with_task_id: bool = False) -> Any:
  """Boxed ShapeDtypeStructs of the params (no memory allocated); `nn.unbox` for shapes."""
  return jax.eval_shape(lambda rng: _init_boxed(model, rng, 1, 4, with_task_id),
                        jax.random.key(0))


def logical_axes(model: DecoderOnly, *, with_task_id: bool = False) -> Any:
  """Logical axis names (PartitionSpec of names) for every param of `model`."""
  return nn.get_partition_spec(abstract_params(model, with_task_id=with_task_id))


def init_cache(model: DecoderOnly, params: Any, batch_size: int, max_length: int, *,
               task_id: Optional[Array] = None) -> Any:
  """A zero key/value cache for `max_length` tokens (prompt and generated together; plus
  the slots of the vectors a method puts before each sequence, e.g. a soft prompt)."""
  dummy = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.apply({"params": params}, dummy, task_id=task_id,
                                              decode=True, new_sequence=True,
                                              mutable=["cache"])[1]["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("model",))
def forward(model: DecoderOnly, params: Any, tokens: Array,
            attention_mask: Optional[Array] = None, position_ids: Optional[Array] = None,
            task_id: Optional[Array] = None) -> Array:
  """Jitted `model.apply`: float32 logits [B, L, vocab]."""
  return model.apply({"params": params}, tokens, attention_mask, position_ids, task_id=task_id)


def sampling_logits(logits: Array, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> Array:
  """`logits [..., V]` as sampling draws from them: divided by `temperature`, then all but
  the `top_k` largest (ties kept; 0: no limit) and all outside the smallest set whose
  probability reaches `top_p` set to -inf (HF's Temperature, TopK and TopP warpers, in
  that order; at least one token stays)."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    keep = (above < top_p).at[..., 0].set(True)
    keep = jnp.put_along_axis(jnp.zeros_like(keep), order, keep, axis=-1, inplace=False)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def _check_sampling(temperature: float, top_k: int, top_p: float, rng: Optional[Array]) -> None:
  if temperature < 0:
    raise ValueError(f"generate: temperature must be >= 0 (0: greedy), got {temperature}")
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"generate: top_k must be >= 0 and top_p in (0, 1], got top_k={top_k}, "
                     f"top_p={top_p}")
  if temperature > 0 and rng is None:
    raise ValueError("generate: sampling (temperature > 0) needs rng=jax.random.key(...)")


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id",
                                             "temperature", "top_k", "top_p"))
def _generate(model, params, tokens, attention_mask, rng, task_id, *, max_new_tokens, eos_id,
              pad_id, temperature, top_k, top_p):
  batch, prompt = tokens.shape
  cache = init_cache(model, params, batch, prompt + max_new_tokens, task_id=task_id)

  def pick(logits, t):
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(tokens.dtype)  # ties: lowest id, as HF
    filtered = sampling_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(jax.random.fold_in(rng, t), filtered).astype(tokens.dtype)

  def run(cache, chunk, mask, t, done, first=False):
    logits, mutated = model.apply({"params": params, "cache": cache}, chunk, mask,
                                  task_id=task_id, decode=True, new_sequence=first,
                                  mutable=["cache"])
    token = jnp.where(done, pad_id, pick(logits[:, -1], t))
    if eos_id is not None:
      done = done | (token == eos_id)
    return mutated["cache"], token, done

  done = jnp.zeros((batch,), bool)
  cache, first, done = run(cache, tokens, attention_mask, 0, done, first=True)
  ones = jnp.ones((batch, 1), attention_mask.dtype)

  def step(carry, t):
    cache, last, done = carry
    cache, nxt, done = run(cache, last[:, None], ones, t, done)
    return (cache, nxt, done), nxt

  _, rest = jax.lax.scan(step, (cache, first, done), jnp.arange(1, max_new_tokens))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(model: DecoderOnly, params: Any, tokens: Array, attention_mask: Array,
             max_new_tokens: int, *, eos_id: Optional[int] = None, pad_id: int = 0,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: Optional[Array] = None, task_id: Optional[Array] = None) -> Array:
  """Continuations [B, max_new_tokens] of left-padded prompts `tokens [B, P]`, as HF
  `generate`: the prompt fills the key/value cache in one chunk, then one token per step
  (`lax.scan`, one jitted program). Greedy at `temperature=0`; else sampled from
  `sampling_logits(temperature, top_k, top_p)` with `rng` (one key per step, folded in).
  A row that emits `eos_id` is done: its later tokens are `pad_id`."""
  _check_sampling(temperature, top_k, top_p, rng)
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  return _generate(model, params, tokens, attention_mask, rng, task_id,
                   max_new_tokens=int(max_new_tokens), eos_id=eos_id, pad_id=int(pad_id),
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))


def greedy_generate(model: DecoderOnly, params: Any, tokens: Array, attention_mask: Array,
                    max_new_tokens: int, task_id: Optional[Array] = None,
                    eos_id: Optional[int] = None) -> Array:
  """Greedy `generate` (no stop at EOS unless `eos_id` is given)."""
  return generate(model, params, tokens, attention_mask, max_new_tokens, eos_id=eos_id,
                  task_id=task_id)


def prefill(model: DecoderOnly, params: Any, tokens: Array, attention_mask: Array, *,
            task_id: Optional[Array] = None,
            logits_index: Optional[Array] = None) -> tuple[Array, Any]:
  """Logits [B, P, vocab] of prompts `tokens [B, P]` (or [B, K, vocab] at `logits_index
  [B, K]`) and the key/value cache they fill (P slots: `continuation_logits` reads it)."""
  cache = init_cache(model, params, tokens.shape[0], tokens.shape[1], task_id=task_id)
  logits, mutated = model.apply({"params": params, "cache": cache}, tokens, attention_mask,
                                task_id=task_id, decode=True, logits_index=logits_index,
                                new_sequence=True, mutable=["cache"])
  return logits, mutated["cache"]


def continuation_logits(model: DecoderOnly, params: Any, cache: Any, tokens: Array, *,
                        task_id: Optional[Array] = None) -> Array:
  """Logits [B * k, T, vocab] of `tokens [B * k, T]`, rows b * k .. b * k + k - 1
  continuing prompt b of `cache` (from `prefill`): the prompt's keys and values are
  computed once and read by all k rows; positions count on from its valid tokens.
  `task_id` is per row [B * k]."""
  return model.apply({"params": params, "cache": cache}, tokens, task_id=task_id,
                     shared_cache=True)
