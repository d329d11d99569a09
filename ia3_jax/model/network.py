"""The T5 encoder-decoder with the T5X parameter tree, and its override points.

`Blocks` names the classes used for each part of the network; a
parameter-efficient method supplies subclasses (module overrides) and the
parameter tree of the base network stays exactly T5X's.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ia3_jax.model import layers
from ia3_jax.model.config import T5Config

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Module classes (or partials of them) the network is built from."""

  attention: Callable[..., nn.Module] = layers.MultiHeadDotProductAttention
  mlp: Callable[..., nn.Module] = layers.MlpBlock
  layer_norm: Callable[..., nn.Module] = layers.LayerNorm
  encoder_layer: Callable[..., nn.Module] = None  # filled below (forward refs)
  decoder_layer: Callable[..., nn.Module] = None
  encoder: Callable[..., nn.Module] = None
  decoder: Callable[..., nn.Module] = None
  # Rematerialisation of each encoder/decoder layer in the backward pass:
  # "none", "full" (keep only layer inputs, recompute the rest) or "dots"
  # (keep matmul outputs, recompute elementwise ops), one layer's backward
  # step at a time (see `_call_layer`). Same params, same math.
  remat: str = "none"
  # Run each stack's layers with `nn.scan` over stacked params (T5X `scan_layers`):
  # one layer is compiled instead of all of them, params are `encoder/layers/...`
  # with a leading "layers" axis (`scan_params` / `unscan_params` convert), and
  # `remat` applies per layer. Decoding (the KV cache) needs the unrolled layers.
  scan_layers: bool = False

  def __post_init__(self):
    defaults = dict(encoder_layer=EncoderLayer, decoder_layer=DecoderLayer,
                    encoder=Encoder, decoder=Decoder)
    for field, cls in defaults.items():
      if getattr(self, field) is None:
        object.__setattr__(self, field, cls)
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Blocks.remat={self.remat!r}: choose from {sorted(REMAT_POLICIES)}")

  def replace(self, **changes) -> "Blocks":
    return dataclasses.replace(self, **changes)

  def override(self, field: str, mixin: type, **fields: Any) -> "Blocks":
    """These blocks with `field`'s module class extended by `mixin` (first in its MRO) and
    `fields` set on it. How a PEFT method applies to any network built from `Blocks` (T5 or
    decoder-only) and on top of another method; a class that has `mixin` already only gets
    the new `fields` (applying a method twice re-configures it)."""
    block = getattr(self, field)
    cls, kw = ((block.func, dict(block.keywords)) if isinstance(block, functools.partial)
               else (block, {}))
    if not issubclass(cls, mixin):
      cls = extend(mixin, cls)
    return self.replace(**{field: functools.partial(cls, **{**kw, **fields})})


@functools.cache
def extend(mixin: type, cls: type) -> type:
  """The module class `mixin` + `cls` (named so), made once per pair so that every model
  built with it shares one class (and one jit cache entry)."""
  name = mixin.__name__ + cls.__name__
  return type(name, (mixin, cls), {"__module__": mixin.__module__, "__qualname__": name})


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _call_layer(blocks: "Blocks", layer: nn.Module, args: tuple, task_id: Optional[Array],
                **static: Any) -> Array:
  """`layer(*args, task_id=task_id, **static)`, rematerialised per `blocks.remat`
  (never while decoding). `static` holds the Python-valued keywords."""
  if blocks.remat == "none" or static.get("decode"):
    return layer(*args, task_id=task_id, **static)

  def call(module, tid, *a):
    return module(*a, task_id=tid, **static)
  remat_call = nn.remat(call, prevent_cse=True, policy=REMAT_POLICIES[blocks.remat])

  # The backward step of one layer, in order. XLA's schedulers would otherwise
  # hoist the recomputation of several layers ahead of their backward steps,
  # and delay the small parameter gradients (norm scales, (IA)^3 vectors:
  # reductions over recomputed activations), keeping many layers'
  # activations alive at once. Data dependencies fix the order (XLA:CPU drops
  # optimization barriers before scheduling): the recomputation reads its
  # residuals only once the output's cotangent exists, and the input
  # cotangents are passed on only once the small parameter gradients exist.
  def forward(module, tid, *a):  # residuals: what remat saves (inputs, params)
    return nn.vjp(remat_call, module, tid, *a)

  def backward(vjp_fn, g):
    params_t, *inputs_t = jax.tree.map(lambda r: _after(r, g), vjp_fn)(g)
    small = [c for c in jax.tree.leaves(params_t)
             if jnp.issubdtype(c.dtype, jnp.floating) and c.size <= _SMALL_PARAM]
    return (params_t, *jax.tree.map(lambda c: _after(c, *small), inputs_t))
  return nn.custom_vjp(remat_call, forward, backward)(layer, task_id, *args)


_SMALL_PARAM = 65536  # scalars; larger params are kernels (their gradients are matmuls)


def _after(x: Any, *deps: Array) -> Any:
  """`x` if it is an activation (float, rank >= 3), made to depend on `deps`:
  `x + 0 * d[0]`, which XLA does not fold for floats and which equals `x`
  for finite `deps` (non-finite ones make the gradient non-finite anyway)."""
  if not (deps and isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
          and x.ndim >= 3):
    return x
  zero = sum(0 * d[(0,) * d.ndim] for d in deps)
  return x + zero.astype(x.dtype)


def scan_stack(blocks: "Blocks", layer_cls: Callable[..., nn.Module], cfg: Any, n: int,
               x: Array, args: tuple, task_id: Optional[Array], *, remat: bool = True,
               **static: Any) -> Array:
  """`n` layers of `layer_cls` as one `nn.scan` named "layers": params (and a decoding
  cache) stacked on axis 0, logical axis "layers". Each layer runs
  `layer(x, *args, task_id=task_id, **static)`: `args` and `task_id` are the same for every
  layer, `static` holds the Python-valued keywords. Rematerialised per `blocks.remat`
  unless `remat=False` (decoding)."""

  class Step(layer_cls):  # (carry, *broadcast) -> (carry, None), as nn.scan wants
    static_: tuple = ()

    def __call__(self, carry, *broadcast):
      *rest, tid = broadcast
      return super().__call__(carry, *rest, task_id=tid, **dict(self.static_)), None

  step = Step
  if remat and blocks.remat != "none":
    step = nn.remat(step, prevent_cse=False, policy=REMAT_POLICIES[blocks.remat])
  scanned = nn.scan(step, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * (len(args) + 1), length=n,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  x, _ = scanned(cfg, blocks, static_=tuple(sorted(static.items())), name="layers")(
      x, *args, task_id)
  return x


SCANNED = "layers"  # the scanned stack's name under encoder/ and decoder/
SCANNED_PATH = re.compile(r"/layers_\d+/")  # an unrolled layer in a "/"-joined param path


def scan_params(params: Any) -> Any:
  """An unrolled param tree (`encoder/layers_0/...`) in the scanned layout
  (`encoder/layers/...`, leaves stacked on a leading axis); scanned trees pass unchanged."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    if stack not in params or SCANNED in params[stack]:
      continue
    tree = dict(params[stack])
    names = sorted((k for k in tree if k.startswith("layers_")), key=lambda k: int(k[7:]))
    if names:
      per_layer = [tree.pop(k) for k in names]
      tree[SCANNED] = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                                   *per_layer)
    out[stack] = tree
  return out


def unscan_params(params: Any) -> Any:
  """Inverse of `scan_params` (unrolled trees pass unchanged)."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    if stack not in params or SCANNED not in params[stack]:
      continue
    tree = dict(params[stack])
    stacked = tree.pop(SCANNED)
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
      tree[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    out[stack] = tree
  return out


def _dropout(x: Array, cfg: T5Config, deterministic: bool) -> Array:
  if cfg.dropout_rate > 0 and not deterministic:
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=False)
  return x


class EncoderLayer(nn.Module):
  config: T5Config
  blocks: Blocks

  @nn.compact
  def __call__(self, x: Array, bias: Array, *, task_id: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    cfg, b = self.config, self.blocks
    norm = lambda name: b.layer_norm(cfg.layer_norm_epsilon, cfg.activation_dtype, name=name)
    y = norm("pre_attention_layer_norm")(x)
    y = b.attention(cfg, name="attention")(y, y, bias, task_id=task_id, deterministic=deterministic)
    x = x + _dropout(y, cfg, deterministic)
    y = norm("pre_mlp_layer_norm")(x)
    y = b.mlp(cfg, name="mlp")(y, task_id=task_id, deterministic=deterministic)
    x = x + _dropout(y, cfg, deterministic)
    return layers.constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  config: T5Config
  blocks: Blocks

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array, *,
               task_id: Optional[Array] = None, deterministic: bool = True,
               decode: bool = False, decode_position: Optional[Array] = None) -> Array:
    cfg, b = self.config, self.blocks
    norm = lambda name: b.layer_norm(cfg.layer_norm_epsilon, cfg.activation_dtype, name=name)
    y = norm("pre_self_attention_layer_norm")(x)
    y = b.attention(cfg, name="self_attention")(
        y, y, self_bias, task_id=task_id, deterministic=deterministic,
        decode=decode, decode_position=decode_position)
    x = x + _dropout(y, cfg, deterministic)
    y = norm("pre_cross_attention_layer_norm")(x)
    y = b.attention(cfg, name="encoder_decoder_attention")(
        y, encoded, cross_bias, task_id=task_id, deterministic=deterministic)
    x = x + _dropout(y, cfg, deterministic)
    y = norm("pre_mlp_layer_norm")(x)
    y = b.mlp(cfg, name="mlp")(y, task_id=task_id, deterministic=deterministic)
    x = x + _dropout(y, cfg, deterministic)
    return layers.constrain(x, ("batch", "length", "embed"))


def _relpos(cfg: T5Config) -> layers.RelativePositionBiases:
  return layers.RelativePositionBiases(
      cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
      cfg.num_heads, cfg.activation_dtype, name="relpos_bias")


class Encoder(nn.Module):
  config: T5Config
  blocks: Blocks
  shared_embedding: nn.Module

  def embed_inputs(self, tokens: Array, task_id: Optional[Array]) -> tuple[Array, Array]:
    """Returns (embeddings [B, L, E], valid [B, L]). Override point for prompt tuning."""
    del task_id
    return self.shared_embedding(tokens), tokens > 0

  @nn.compact
  def __call__(self, tokens: Array, *, task_id: Optional[Array] = None,
               deterministic: bool = True) -> tuple[Array, Array]:
    """Returns (encoded [B, L, E], valid [B, L]); `valid` masks cross-attention."""
    cfg = self.config
    x, valid = self.embed_inputs(tokens, task_id)
    x = _dropout(layers.constrain(x, ("batch", "length", "embed")), cfg, deterministic)
    positions = jnp.arange(x.shape[1])
    bias = _relpos(cfg)(positions, positions, bidirectional=True)
    bias = bias + layers.mask_to_bias(layers.padding_mask(valid, valid), cfg.activation_dtype)
    if self.blocks.scan_layers:
      x = scan_stack(self.blocks, self.blocks.encoder_layer, cfg, cfg.num_encoder_layers,
                     x, (bias,), task_id, deterministic=deterministic)
    for i in range(0 if self.blocks.scan_layers else cfg.num_encoder_layers):
      layer = self.blocks.encoder_layer(cfg, self.blocks, name=f"layers_{i}")
      x = _call_layer(self.blocks, layer, (x, bias), task_id, deterministic=deterministic)
    x = self.blocks.layer_norm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="encoder_norm")(x)
    return _dropout(x, cfg, deterministic), valid


class Decoder(nn.Module):
  config: T5Config
  blocks: Blocks
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: Array, encoder_valid: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None, *,
               task_id: Optional[Array] = None, deterministic: bool = True,
               decode: bool = False) -> Array:
    """Returns float32 logits [B, T, vocab].

    With `decode=True` the first call (inside `init`) allocates a cache for the
    full target length; each later call takes one token per example.
    """
    cfg = self.config
    dtype = cfg.activation_dtype
    x = self.shared_embedding(decoder_input_tokens)
    x = _dropout(layers.constrain(x, ("batch", "length", "embed")), cfg, deterministic)
    length = decoder_input_tokens.shape[1]
    position = None
    if decode:
      initialized = self.has_variable("cache", "position")
      pos_var = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      if initialized:
        position = pos_var.value
        pos_var.value = position + 1
    relpos = _relpos(cfg)
    # T5X: make_attention_mask(decoder_target_tokens > 0, encoder_input_tokens > 0) when
    # not decoding: a padded decoder row gets a fully masked cross-attention row
    # [B, 1, T, L]; otherwise every decoder row attends to every valid encoder
    # position, [Be, 1, 1, L] (also serves grouped rows, see `Transformer.decode`).
    cross_mask = encoder_valid[:, None, None, :]
    if position is None:
      positions = jnp.arange(length)
      self_mask = layers.causal_mask(length)
      if decoder_target_tokens is not None:
        valid = decoder_target_tokens > 0
        self_mask = self_mask & layers.padding_mask(valid, valid)
        if not decode:
          groups = layers.attention_groups(valid.shape[0], encoder_valid.shape[0])
          cross_mask = layers.padding_mask(valid, jnp.repeat(encoder_valid, groups, axis=0))
      self_bias = relpos(positions, positions, bidirectional=False)
    else:  # one step against a cache of `max_length` keys
      key_len = self._cache_length()
      keys = jnp.arange(key_len)
      self_mask = (keys <= position)[None, None, None, :]
      self_bias = relpos(position[None], keys, bidirectional=False)
    self_bias = self_bias + layers.mask_to_bias(self_mask, dtype)
    cross_bias = layers.mask_to_bias(cross_mask, dtype)
    if self.blocks.scan_layers:
      if decode:
        raise ValueError("decoding with Blocks(scan_layers=True): decode with the unrolled "
                         "model (Blocks(scan_layers=False), params through unscan_params)")
      x = scan_stack(self.blocks, self.blocks.decoder_layer, cfg, cfg.num_decoder_layers,
                     x, (encoded, self_bias, cross_bias), task_id, deterministic=deterministic)
    for i in range(0 if self.blocks.scan_layers else cfg.num_decoder_layers):
      layer = self.blocks.decoder_layer(cfg, self.blocks, name=f"layers_{i}")
      if decode:
        x = layer(x, encoded, self_bias, cross_bias, task_id=task_id,
                  deterministic=deterministic, decode=decode, decode_position=position)
      else:
        x = _call_layer(self.blocks, layer, (x, encoded, self_bias, cross_bias), task_id,
                        deterministic=deterministic)
    x = self.blocks.layer_norm(cfg.layer_norm_epsilon, dtype, name="decoder_norm")(x)
    x = _dropout(x, cfg, deterministic)
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(x * (cfg.emb_dim ** -0.5))
    else:
      logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), dtype=dtype,
                            output_dtype=jnp.float32, name="logits_dense")(x)
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def _cache_length(self) -> int:
    cache = self.variables["cache"]
    return cache["layers_0"]["self_attention"]["cached_key"].shape[1]


class Transformer(nn.Module):
  """T5 encoder-decoder. Params: `token_embedder`, `encoder`, `decoder` (T5X names)."""

  config: T5Config
  blocks: Blocks = Blocks()

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
    self.encoder = self.blocks.encoder(cfg, self.blocks, self.token_embedder)
    self.decoder = self.blocks.decoder(cfg, self.blocks, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, *, task_id: Optional[Array] = None,
             enable_dropout: bool = False) -> tuple[Array, Array]:
    """Returns (encoded [B, L, E], valid [B, L]) for reuse across decoder calls."""
    return self.encoder(encoder_input_tokens, task_id=task_id, deterministic=not enable_dropout)

  def decode(self, encoded: Array, encoder_valid: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Optional[Array] = None, *, task_id: Optional[Array] = None,
             enable_dropout: bool = False, decode: bool = False) -> Array:
    """Logits [B, T, vocab] (float32) for decoder inputs against an encoder output.

    `encoded [Be, L, E]` may have fewer rows than the decoder inputs
    `[B, T]` when Be divides B: encoder row b then serves decoder rows
    b*g .. b*g + g - 1 (g = B / Be; the layout of `jnp.repeat(encoded, g,
    axis=0)`, e.g. the C answer choices of one example in rank
    classification), and each cross-attention computes that row's keys and
    values once rather than g times. The logits equal those of the repeated
    call.
    """
    _ = layers.attention_groups(decoder_input_tokens.shape[0], encoded.shape[0])
    return self.decoder(encoded, encoder_valid, decoder_input_tokens, decoder_target_tokens,
                        task_id=task_id, deterministic=not enable_dropout, decode=decode)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None, *,
               task_id: Optional[Array] = None, enable_dropout: bool = False,
               decode: bool = False) -> Array:
    encoded, valid = self.encode(encoder_input_tokens, task_id=task_id,
                                 enable_dropout=enable_dropout)
    return self.decode(encoded, valid, decoder_input_tokens, decoder_target_tokens,
                       task_id=task_id, enable_dropout=enable_dropout, decode=decode)


def shift_right(targets: Array, bos_id: int = 0) -> Array:
  """Decoder inputs from targets: prepend BOS (= pad id 0 in T5), drop the last token."""
  shifted = jnp.concatenate(
      [jnp.full(targets.shape[:-1] + (1,), bos_id, targets.dtype), targets[..., :-1]], axis=-1)
  return jnp.where(shifted < 0, 0, shifted)


def init_params(model: Transformer, rng: Array, *, batch_size: int = 1, input_length: int = 4,
                target_length: int = 4, with_task_id: bool = False) -> Any:
  """Random params (unboxed float32 tree) for `model`."""
  return nn.unbox(_init_boxed(model, rng, batch_size, input_length, target_length, with_task_id))


def _init_boxed(model, rng, batch_size, input_length, target_length, with_task_id):
  enc = jnp.ones((batch_size, input_length), jnp.int32)
  dec = jnp.ones((batch_size, target_length), jnp.int32)
  kwargs = {"task_id": jnp.zeros((batch_size,), jnp.int32)} if with_task_id else {}
  return model.init(rng, enc, dec, dec, **kwargs)["params"]


def abstract_params(model: Transformer, *, with_task_id: bool = False) -> Any:
  """Boxed ShapeDtypeStructs of the params, computed without allocating memory.

  Keeps `nn.LogicallyPartitioned` boxes so callers can read logical axes
  (`nn.get_partition_spec`); `nn.unbox` gives the plain shapes.
  """
  return jax.eval_shape(
      lambda rng: _init_boxed(model, rng, 1, 4, 4, with_task_id), jax.random.key(0))


def param_count(tree: Any) -> int:
  """Number of scalars in a (possibly abstract, possibly boxed) param tree."""
  return int(sum(x.size for x in jax.tree.leaves(nn.unbox(tree))))


def logical_axes(model: Transformer, *, with_task_id: bool = False) -> Any:
  """Logical axis names (PartitionSpec of names) for every param of `model`."""
  return nn.get_partition_spec(abstract_params(model, with_task_id=with_task_id))


def init_decode_cache(model: Transformer, params: Any, encoded: Array, encoder_valid: Array,
                      max_length: int, *, task_id: Optional[Array] = None) -> Any:
  """Allocates the autoregressive cache for `max_length` decoder steps."""
  dummy = jnp.zeros((encoded.shape[0], max_length), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.apply({"params": params}, encoded, encoder_valid, dummy, task_id=task_id,
                          decode=True, method=Transformer.decode, mutable=["cache"])[1]["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
