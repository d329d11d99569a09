"""The T5X-compatible network: parameter tree, counts, axes, dtypes, cache, overrides."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

from ia3_jax.model import layers, network
from ia3_jax.model.config import PRESETS, get_config
from tests import hf_utils
from tests import tolerances

LOGICAL_AXES = {"vocab", "embed", "joined_kv", "heads", "kv", "mlp", "relpos_buckets"}


@pytest.fixture(scope="module")
def tiny():
  config = get_config("tiny")
  model = network.Transformer(config)
  return config, model, network.init_params(model, jax.random.key(0))


def test_t5x_parameter_names(tiny):
  _, _, params = tiny
  names = {"/".join(k) for k in flax.traverse_util.flatten_dict(params)}
  for expected in [
      "token_embedder/embedding", "encoder/relpos_bias/rel_embedding",
      "encoder/layers_1/pre_attention_layer_norm/scale", "encoder/layers_0/attention/query/kernel",
      "encoder/layers_0/attention/out/kernel", "encoder/layers_0/mlp/wi_0/kernel",
      "encoder/layers_0/mlp/wi_1/kernel", "encoder/layers_0/mlp/wo/kernel",
      "encoder/encoder_norm/scale", "decoder/relpos_bias/rel_embedding",
      "decoder/layers_1/pre_self_attention_layer_norm/scale",
      "decoder/layers_1/self_attention/key/kernel",
      "decoder/layers_1/pre_cross_attention_layer_norm/scale",
      "decoder/layers_1/encoder_decoder_attention/value/kernel",
      "decoder/layers_1/pre_mlp_layer_norm/scale", "decoder/decoder_norm/scale",
      "decoder/logits_dense/kernel"]:
    assert expected in names, expected
  assert len(names) == 1 + 2 * 2 + 2 * (4 + 3 + 2) + 2 * (8 + 3 + 3) + 1


def test_every_param_has_logical_axes():
  for name in ("tiny", "t5_1_0_small"):
    specs = network.logical_axes(network.Transformer(get_config(name)))
    for path, spec in flax.traverse_util.flatten_dict(specs).items():
      assert spec is not None and set(spec) <= LOGICAL_AXES, (path, spec)


def _hf_count(config) -> int:
  hf = hf_utils.hf_config("t5_1_1", d_model=config.emb_dim, d_kv=config.head_dim,
                          num_heads=config.num_heads, d_ff=config.mlp_dim,
                          num_layers=config.num_encoder_layers,
                          num_decoder_layers=config.num_decoder_layers,
                          relative_attention_num_buckets=32, relative_attention_max_distance=128,
                          vocab_size=config.vocab_size)
  with torch.device("meta"):
    return T5ForConditionalGeneration(hf).num_parameters()


@pytest.mark.parametrize("name,hf_figure", [("t0_3b", 2_783_959_040), ("t0_11b", 11_003_736_064)])
def test_parameter_counts_without_memory(name, hf_figure):
  """eval_shape counts, against HF's figure computed on the meta device.

  transformers 5 ties T5's lm_head to the embedding, so its figure counts one
  [vocab, embed] matrix; T0 checkpoints (T5 1.1) carry a separate lm_head, which
  is T5X's decoder/logits_dense, so our full tree has exactly one more.
  """
  config = get_config(name)
  abstract = network.abstract_params(network.Transformer(config))
  total = network.param_count(abstract)
  head = network.param_count(abstract["decoder"]["logits_dense"])
  assert head == config.vocab_size * config.emb_dim
  assert total - head == hf_figure == _hf_count(config)


def test_presets_are_consistent():
  assert PRESETS["t0_3b"] == PRESETS["t5_1_1_xl"]
  assert get_config("t5_1_0_small").logits_via_embedding
  with pytest.raises(KeyError, match="Unknown model preset 'nope'"):
    get_config("nope")
  with pytest.raises(ValueError, match="mlp_activations"):
    get_config("tiny", mlp_activations=("swishy",))


def test_bfloat16_activations_track_float32(tiny):
  config, model, params = tiny
  batch = hf_utils.random_batch(np.random.default_rng(0), config.vocab_size)
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  f32 = model.apply({"params": params}, *args)
  bf16 = network.Transformer(config.replace(dtype="bfloat16")).apply({"params": params}, *args)
  assert bf16.dtype == jnp.float32  # logits always come back in float32
  valid = batch["decoder_target_tokens"] > 0
  assert np.abs(np.asarray(bf16 - f32))[valid].max() < 0.1 * np.abs(np.asarray(f32)).max()


def test_encode_then_decode_equals_call(tiny):
  config, model, params = tiny
  batch = hf_utils.random_batch(np.random.default_rng(1), config.vocab_size)
  full = model.apply({"params": params}, batch["encoder_input_tokens"],
                     batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  encoded, valid = model.apply({"params": params}, batch["encoder_input_tokens"],
                               method=network.Transformer.encode)
  split = model.apply({"params": params}, encoded, valid, batch["decoder_input_tokens"],
                      batch["decoder_target_tokens"], method=network.Transformer.decode)
  np.testing.assert_array_equal(full, split)


def test_decode_cache_matches_full_forward(tiny):
  config, model, params = tiny
  batch = hf_utils.random_batch(np.random.default_rng(2), config.vocab_size, dec_len=6)
  dec_in = batch["decoder_input_tokens"]
  full = model.apply({"params": params}, batch["encoder_input_tokens"], dec_in)
  encoded, valid = model.apply({"params": params}, batch["encoder_input_tokens"],
                               method=network.Transformer.encode)
  cache = network.init_decode_cache(model, params, encoded, valid, dec_in.shape[1])
  for t in range(dec_in.shape[1]):
    step, mutated = model.apply({"params": params, "cache": cache}, encoded, valid,
                                dec_in[:, t:t + 1], decode=True, mutable=["cache"],
                                method=network.Transformer.decode)
    cache = mutated["cache"]
    tolerances.assert_close(step[:, 0], full[:, t])


def test_dropout_only_when_enabled():
  config = get_config("tiny", dropout_rate=0.5)
  model = network.Transformer(config)
  params = network.init_params(model, jax.random.key(0))
  batch = hf_utils.random_batch(np.random.default_rng(3), config.vocab_size)
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  a = model.apply({"params": params}, *args)
  np.testing.assert_array_equal(a, model.apply({"params": params}, *args))
  b = model.apply({"params": params}, *args, enable_dropout=True,
                  rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(a, b)


class _DoubledValue(layers.MultiHeadDotProductAttention):
  """A module override: scales the value projection, as (IA)^3 does."""

  def project(self, x, name, features, kernel_axes, task_id, kernel_init=None):
    y = super().project(x, name, features, kernel_axes, task_id, kernel_init)
    return 2.0 * y if name == "value" else y


def test_module_override_keeps_tree_and_changes_computation(tiny):
  config, model, params = tiny
  overridden = network.Transformer(config, network.Blocks(attention=_DoubledValue))
  params2 = network.init_params(overridden, jax.random.key(0))
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  batch = hf_utils.random_batch(np.random.default_rng(4), config.vocab_size)
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  a = model.apply({"params": params}, *args)
  b = overridden.apply({"params": params}, *args)
  assert not np.allclose(a, b)


def test_relative_position_buckets_match_hf():
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-60, 61)[None, :] - np.zeros((1, 1), int)
  for bidirectional in (True, False):
    ours = layers.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                           num_buckets=32, max_distance=128)
    theirs = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                   num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def _dots(jaxpr):
  """(input dtypes, output dtype) of every dot_general in a jaxpr and its nested jaxprs."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append((tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)))
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          out += _dots(getattr(sub, "jaxpr", sub))
  return out


# (spec, shape of a, shape of b, backward products in bf16: (da, db)). Square contracted and
# free dimensions, so a transposed cotangent would still have the right shape.
BF16_EINSUMS = [
    ("...k,kn->...n", (2, 3, 8), (8, 8), (True, False)),       # projections (`matmul`)
    ("bhqd,bhkd->bhqk", (2, 2, 8, 8), (2, 2, 8, 8), (True, False)),  # attention logits
    ("bhqk,bhkd->bhqd", (2, 2, 8, 8), (2, 2, 8, 8), (True, False)),  # attention outputs
]


@pytest.mark.parametrize("spec,shape_a,shape_b,bf16_backward", BF16_EINSUMS)
@pytest.mark.parametrize("input_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_einsum_value_and_gradients(spec, shape_a, shape_b, bf16_backward, input_dtype):
  """bf16 products with float32 sums, forward and backward, against float32 on bf16-rounded
  inputs: the value to float32 rounding, the gradients to bf16 rounding."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal(s), input_dtype) for s in (shape_a, shape_b))
  out_shape = jax.eval_shape(lambda x, y: jnp.einsum(spec, x, y), a, b).shape
  w = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)  # the cotangent of the output

  def ours(x, y):
    return jnp.sum(w * layers.einsum(spec, x, y, jnp.bfloat16))

  def reference(x, y):  # float32 products of the same bf16-rounded inputs
    x, y = (t.astype(jnp.bfloat16).astype(jnp.float32) for t in (x, y))
    return jnp.sum(w * jnp.einsum(spec, x, y, precision=jax.lax.Precision.HIGHEST))

  value = layers.einsum(spec, a, b, jnp.bfloat16)
  ref_value = jnp.einsum(spec, a.astype(jnp.bfloat16).astype(jnp.float32),
                         b.astype(jnp.bfloat16).astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
  assert value.dtype == jnp.float32
  tolerances.assert_close(value, ref_value)

  grads = jax.grad(ours, argnums=(0, 1))(a, b)
  ref_grads = jax.grad(reference, argnums=(0, 1))(a, b)
  for g, r, x in zip(grads, ref_grads, (a, b)):
    assert g.dtype == x.dtype and g.shape == x.shape
    r = np.asarray(r, np.float32)
    # Rounding the cotangent and the result to bf16 (8 significant bits): about 2^-8 of
    # the gradient's scale; a transposed or misplaced cotangent is off by O(1).
    np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=0,
                               atol=2e-2 * np.abs(r).max())

  # Every product takes bf16 inputs with a float32 result, except the cotangents XLA:CPU
  # cannot sum in float32 from bf16 (summed over a non-trailing index): float32 there.
  dots = _dots(jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(a, b).jaxpr)
  bf16_dot = (("bfloat16", "bfloat16"), "float32")
  f32_dot = (("float32", "float32"), "float32")
  expected = [bf16_dot] + [bf16_dot if low else f32_dot for low in bf16_backward]
  assert sorted(dots) == sorted(expected), dots


def test_float32_einsum_is_plain_einsum():
  rng = np.random.default_rng(1)
  a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 8), (8, 5)))
  np.testing.assert_array_equal(layers.matmul(a, b, jnp.float32), jnp.einsum("...k,kn->...n", a, b))
  ga = jax.grad(lambda x: jnp.sum(layers.matmul(x, b, jnp.float32) ** 2))(a)
  np.testing.assert_allclose(ga, jax.grad(lambda x: jnp.sum((x @ b) ** 2))(a), rtol=1e-6)


def _softmax_weighted_sum(q, k, v, bias, logits_dtype=np.float64):
  """NumPy, float64: softmax(q k^T + bias) v over the last axis (no 1/sqrt(d), as T5).
  With float32 logits a NEG_INF bias swallows the product, as in the model."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bhqd,bhkd->bhqk", q, k).astype(logits_dtype) + np.asarray(bias, logits_dtype)
  logits = logits.astype(np.float64)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bhkd->bhqd", weights / weights.sum(-1, keepdims=True), v)


def test_attention_core_normalises_after_the_sum_and_trains_as_before():
  """`attention_core`: softmax(q k^T + bias) v, evaluated with the normalisation after the
  product in float32 (a masked key, a fully masked query row), with the normalised weights
  rounded in bf16, differentiated exactly as `attention_weights` then `weighted_sum`."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 5, 4)), jnp.float32) for _ in range(3))
  bias = rng.standard_normal((1, 3, 5, 5))
  bias[..., -1] = layers.NEG_INF  # a masked key
  bias = jnp.asarray(bias, jnp.float32)
  masked_row = np.broadcast_to(bias, (2, 3, 5, 5)).copy()
  masked_row[1, :, 2, :] = layers.NEG_INF  # a query row that sees no key: uniform weights
  tolerances.assert_close(layers.attention_core(q, k, v, masked_row, jnp.float32),
                          _softmax_weighted_sum(q, k, v, masked_row, np.float32))
  reference = _softmax_weighted_sum(q, k, v, bias)
  tolerances.assert_close(layers.attention_core(q, k, v, bias, jnp.float32), reference)
  low = layers.attention_core(q, k, v, bias, jnp.bfloat16)  # bf16 products, float32 sums
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, reference, rtol=0, atol=2e-2 * np.abs(reference).max())
  weights = layers.attention_weights(q, k, bias, jnp.bfloat16)
  assert weights.dtype == jnp.bfloat16  # as jax.nn.dot_product_attention rounds them
  np.testing.assert_array_equal(low, layers.weighted_sum(weights, v, jnp.bfloat16))

  def weights_then_sum(q, k, v, bias):
    return layers.weighted_sum(layers.attention_weights(q, k, bias, jnp.float32), v, jnp.float32)

  w = jnp.asarray(rng.standard_normal(reference.shape), jnp.float32)
  grads = jax.grad(lambda *a: jnp.sum(w * layers.attention_core(*a, jnp.float32)),
                   argnums=(0, 1, 2, 3))(q, k, v, bias)
  before = jax.grad(lambda *a: jnp.sum(w * weights_then_sum(*a)), argnums=(0, 1, 2, 3))(
      q, k, v, bias)
  for g, b in zip(grads, before):
    np.testing.assert_array_equal(g, b)
  # Only some inputs differentiated (a frozen layer's query and bias): the same cotangents.
  some = jax.grad(lambda k, v: jnp.sum(w * layers.attention_core(q, k, v, bias, jnp.float32)),
                  argnums=(0, 1))(k, v)
  for g, b in zip(some, before[1:3]):
    np.testing.assert_array_equal(g, b)
  # The NumPy value's slope along a random direction (central differences, float64).
  direction = [rng.standard_normal(t.shape) for t in (q, k, v)]
  eps = 1e-4
  plus, minus = ([t + s * eps * d for t, d in zip((q, k, v), direction)] for s in (1, -1))
  slope = np.sum(np.asarray(w, np.float64) * (_softmax_weighted_sum(*plus, bias)
                                              - _softmax_weighted_sum(*minus, bias))) / (2 * eps)
  ours = sum(np.sum(np.asarray(g, np.float64) * d) for g, d in zip(grads, direction))
  np.testing.assert_allclose(ours, slope, rtol=1e-3)  # float32 sums; a wrong gradient is off by O(1)


def test_grouped_attention_equals_repeated_and_drops_out_per_row():
  """Grouped cross-attention (g query rows per key/value row) equals the repeated call;
  with dropout, the rows of a group draw independent masks, as repeated rows would."""
  config = get_config("tiny", dropout_rate=0.5)
  attention = layers.MultiHeadDotProductAttention(config)
  rng = np.random.default_rng(2)
  g, q_len, k_len = 3, 4, 6
  kv = jnp.asarray(rng.standard_normal((2, k_len, config.emb_dim)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((2 * g, q_len, config.emb_dim)), jnp.float32)
  bias = layers.mask_to_bias(jnp.arange(k_len)[None, None, None, :] < jnp.array([6, 4])[
      :, None, None, None], jnp.float32)  # [2, 1, 1, K]: the second row has 2 padding keys
  params = attention.init(jax.random.key(0), q, jnp.repeat(kv, g, 0), jnp.repeat(bias, g, 0))
  apply = jax.jit(attention.apply, static_argnames="deterministic")
  grouped = apply(params, q, kv, bias)
  repeated = apply(params, q, jnp.repeat(kv, g, 0), jnp.repeat(bias, g, 0))
  tolerances.assert_close(grouped, repeated)

  same_q = jnp.repeat(q[::g], g, 0)  # the g queries of a group are identical
  dropped = np.asarray(apply(params, same_q, kv, bias, deterministic=False,
                             rngs={"dropout": jax.random.key(1)}))
  for row in range(2):
    group = dropped[row * g:(row + 1) * g]
    assert not np.allclose(group[0], group[1]) and not np.allclose(group[1], group[2])


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_params_and_float32_gradients(remat):
  """Rematerialised layers (recomputed in order in the backward pass): the same param tree,
  loss and gradients as without remat, with dropout on (the recomputation redraws the same
  masks)."""
  config = get_config("tiny", dropout_rate=0.1)
  batch = hf_utils.random_batch(np.random.default_rng(5), config.vocab_size)
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"],
          batch["decoder_target_tokens"])
  plain = network.Transformer(config)
  rematted = network.Transformer(config, network.Blocks(remat=remat))
  params = network.init_params(plain, jax.random.key(0))
  assert jax.tree.structure(network.init_params(rematted, jax.random.key(0))) == \
      jax.tree.structure(params)

  def loss(model, p):
    logits = model.apply({"params": p}, *args, enable_dropout=True,
                         rngs={"dropout": jax.random.key(3)})
    return jnp.mean(jax.nn.log_softmax(logits)[..., 5])
  (ref, ref_grads), (val, grads) = (jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(params)
                                    for m in (plain, rematted))
  np.testing.assert_allclose(val, ref, rtol=1e-6)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 * np.abs(r).max())


def _t5x_cross_attention(x_q, x_kv, p, decoder_target_tokens, encoder_input_tokens, num_heads):
  """NumPy transcription of T5X's encoder-decoder attention (t5x/examples/t5): the mask
  `make_attention_mask(decoder_target_tokens > 0, encoder_input_tokens > 0)`, turned into a
  bias by `lax.select(mask > 0, 0, -1e10)` and added to the float32 logits before softmax."""
  f32 = np.float32
  mask = ((decoder_target_tokens > 0)[:, None, :, None]
          & (encoder_input_tokens > 0)[:, None, None, :]).astype(f32)
  bias = np.where(mask > 0, f32(0.0), f32(-1e10))
  heads = lambda x, name: (x @ p[name]["kernel"]).reshape(x.shape[:2] + (num_heads, -1))
  q, k, v = heads(x_q, "query"), heads(x_kv, "key"), heads(x_kv, "value")
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = weights / weights.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", weights, v)
  return out.reshape(out.shape[:2] + (-1,)) @ p["out"]["kernel"], v


@pytest.mark.parametrize("groups", [1, 3])
def test_cross_attention_masks_padded_decoder_rows_as_t5x(tiny, groups):
  """Every decoder layer's cross-attention, padded target rows included, against the NumPy
  transcription of T5X's, also with grouped rows (one encoder row per `groups` decoder rows).
  A fully masked row gets the same bias on every key (-1e10 absorbs the logits in float32):
  a uniform softmax over all encoder positions, padded ones included."""
  config, model, params = tiny
  rng = np.random.default_rng(7)
  batch = hf_utils.random_batch(rng, config.vocab_size, batch=3 * groups)
  enc = batch["encoder_input_tokens"][::groups]
  targets = batch["decoder_target_tokens"]
  assert (targets == 0).any() and (enc == 0).any()
  encoded, valid = model.apply({"params": params}, enc, method=network.Transformer.encode)
  seen = {}

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == "encoder_decoder_attention" and context.method_name == "__call__":
      seen[context.module.scope.path[-2]] = (np.asarray(args[0]), np.asarray(args[1]),
                                            np.asarray(out))
    return out
  with nn.intercept_methods(capture):
    model.apply({"params": params}, encoded, valid, batch["decoder_input_tokens"], targets,
                method=network.Transformer.decode)
  assert len(seen) == config.num_decoder_layers
  padded = targets == 0
  for name, (x_q, x_kv, ours) in seen.items():
    p = jax.tree.map(np.asarray, params["decoder"][name]["encoder_decoder_attention"])
    x_kv, enc_rows = np.repeat(x_kv, groups, 0), np.repeat(enc, groups, 0)
    want, v = _t5x_cross_attention(x_q, x_kv, p, targets, enc_rows, config.num_heads)
    tolerances.assert_close(ours, want, err_msg=name)
    uniform = v.mean(1).reshape(v.shape[0], -1) @ p["out"]["kernel"]  # [B, E]
    b, t = np.nonzero(padded)
    tolerances.assert_close(ours[b, t], uniform[b], err_msg=name)


def test_query_init_std_is_t5x_and_hf():
  """Query kernel std (emb_dim * head_dim)^-0.5 (T5X: fan-in init / sqrt(head_dim); HF:
  (d_model * d_kv)^-0.5), i.e. the key kernel's std (emb_dim^-0.5) / sqrt(head_dim)."""
  config = get_config("tiny", emb_dim=512, num_heads=8, head_dim=64)
  x = jnp.zeros((1, 2, config.emb_dim), jnp.float32)
  params = layers.MultiHeadDotProductAttention(config).init(
      jax.random.key(0), x, x, jnp.zeros((1, 1, 1, 2)))["params"]
  query, key = (np.asarray(nn.unbox(params[n]["kernel"])) for n in ("query", "key"))
  # 512 * 512 samples: the std's sampling error is ~0.14% (1 / sqrt(2N)); 2% is > 10 sigma and
  # far below the old head_dim^0.25 = 2.8x error.
  assert query.std() == pytest.approx((config.emb_dim * config.head_dim) ** -0.5, rel=0.02)
  assert key.std() == pytest.approx(config.emb_dim ** -0.5, rel=0.02)
  assert key.std() / query.std() == pytest.approx(config.head_dim ** 0.5, rel=0.03)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_equal_the_unrolled_network_with_stacked_params(tmp_path, remat):
  """`Blocks(scan_layers=True)`: the params of an HF checkpoint stacked by `scan_params` give
  PyTorch's logits; `unscan_params` restores the unrolled tree exactly; "layers" is the
  stacked params' logical axis."""
  torch_model = hf_utils.make_hf_model(tmp_path, "t5_1_1", "small")
  from ia3_jax.interop import hf_checkpoints
  config, params = hf_checkpoints.load_hf_checkpoint(tmp_path)
  scanned = network.Transformer(config, blocks=network.Blocks(scan_layers=True, remat=remat))
  stacked = network.scan_params(params)
  assert "layers" in stacked["encoder"] and "layers_0" not in stacked["encoder"]
  assert jax.tree.structure(stacked) == jax.tree.structure(network.init_params(
      scanned, jax.random.key(0)))
  batch = hf_utils.random_batch(np.random.default_rng(0), config.vocab_size, enc_len=20)
  logits = np.asarray(scanned.apply({"params": stacked}, batch["encoder_input_tokens"],
                                    batch["decoder_input_tokens"],
                                    batch["decoder_target_tokens"]))
  valid = batch["decoder_target_tokens"] > 0
  tolerances.assert_close_to_torch(logits[valid],
                                   hf_utils.torch_logits(torch_model, batch)[valid])
  back = network.unscan_params(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), b)
  specs = nn.get_partition_spec(network.abstract_params(scanned))
  assert tuple(specs["encoder"]["layers"]["mlp"]["wo"]["kernel"]) == ("layers", "mlp", "embed")
  with pytest.raises(ValueError, match="decoding with Blocks"):
    scanned.apply({"params": stacked}, batch["encoder_input_tokens"],
                  batch["decoder_input_tokens"][:, :1], decode=True, mutable=["cache"])


# --------------------------------------------------------------------------- attention_impl

DPA = "dot_product_attention"


def _count_dpa_calls(monkeypatch) -> list:
  """Counts calls of `jax.nn.dot_product_attention` (to see every attention go through it)."""
  calls, real = [], jax.nn.dot_product_attention

  def counting(*args, **kwargs):
    calls.append(kwargs.get("implementation"))
    return real(*args, **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", counting)
  return calls


def test_dot_product_attention_gives_the_einsum_logits_and_gradients(tiny, monkeypatch):
  """`attention_impl="dot_product_attention"`: encoder self-attention, causal decoder
  self-attention and cross-attention (padded rows and keys) all through
  `jax.nn.dot_product_attention`, with the einsum core's logits and float32 gradients."""
  config, model, params = tiny
  calls = _count_dpa_calls(monkeypatch)
  batch = hf_utils.random_batch(np.random.default_rng(11), config.vocab_size)
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"],
          batch["decoder_target_tokens"])
  dpa = network.Transformer(config.replace(attention_impl=DPA))

  def loss(m, p):
    logits = m.apply({"params": p}, *args)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * (args[2] > 0)), logits
  (_, want), want_grads = jax.value_and_grad(lambda p: loss(model, p), has_aux=True)(params)
  (_, got), grads = jax.value_and_grad(lambda p: loss(dpa, p), has_aux=True)(params)
  assert len(calls) == config.num_encoder_layers + 2 * config.num_decoder_layers
  tolerances.assert_close(got, want)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    tolerances.assert_close(g, r, rtol=1e-4)
  bf16 = lambda m: network.Transformer(m.config.replace(dtype="bfloat16")).apply(
      {"params": params}, *args)
  valid = args[2] > 0  # bf16: the same products in bf16 with float32 sums
  tolerances.assert_close(np.asarray(bf16(dpa))[valid], np.asarray(bf16(model))[valid],
                          rtol=1e-2, scale_tol=1e-2)


def test_dot_product_attention_grouped_cross_attention_and_decode_cache(tiny, monkeypatch):
  """Grouped cross-attention (3 decoder rows per encoder row, padded rows masked per row) and
  the KV-cache decode steps give the einsum core's logits."""
  config, model, params = tiny
  dpa = network.Transformer(config.replace(attention_impl=DPA))
  calls = _count_dpa_calls(monkeypatch)
  batch = hf_utils.random_batch(np.random.default_rng(12), config.vocab_size, batch=6, dec_len=5)
  enc = batch["encoder_input_tokens"][::3]
  dec_in, targets = batch["decoder_input_tokens"], batch["decoder_target_tokens"]
  assert (targets == 0).any()
  encoded, valid = model.apply({"params": params}, enc, method=network.Transformer.encode)
  grouped = [m.apply({"params": params}, encoded, valid, dec_in, targets,
                     method=network.Transformer.decode) for m in (model, dpa)]
  tolerances.assert_close(grouped[1], grouped[0])
  assert len(calls) == 2 * config.num_decoder_layers

  encoded, valid = model.apply({"params": params}, batch["encoder_input_tokens"],
                               method=network.Transformer.encode)
  full = model.apply({"params": params}, encoded, valid, dec_in, method=network.Transformer.decode)
  cache = network.init_decode_cache(dpa, params, encoded, valid, dec_in.shape[1])
  step = jax.jit(lambda c, tok: dpa.apply({"params": params, "cache": c}, encoded, valid, tok,
                                          decode=True, mutable=["cache"],
                                          method=network.Transformer.decode))
  for t in range(dec_in.shape[1]):
    logits, mutated = step(cache, dec_in[:, t:t + 1])
    cache = mutated["cache"]
    tolerances.assert_close(logits[:, 0], full[:, t])


def test_dot_product_attention_matches_hf_t5(tmp_path):
  """Through an HF checkpoint: PyTorch's logits with the dot_product_attention core."""
  from ia3_jax.interop import hf_checkpoints
  torch_model = hf_utils.make_hf_model(tmp_path, "t5_1_1", "odd")
  config, params = hf_checkpoints.load_hf_checkpoint(tmp_path)
  batch = hf_utils.random_batch(np.random.default_rng(13), config.vocab_size, enc_len=40,
                                dec_len=30)  # 40 > max_distance: logarithmic buckets too
  model = network.Transformer(config.replace(attention_impl=DPA, dpa_implementation="xla"))
  logits = np.asarray(model.apply({"params": params}, batch["encoder_input_tokens"],
                                  batch["decoder_input_tokens"], batch["decoder_target_tokens"]))
  valid = batch["decoder_target_tokens"] > 0
  tolerances.assert_close_to_torch(logits[valid], hf_utils.torch_logits(torch_model, batch)[valid])


def test_attention_impl_is_validated_and_cudnn_needs_a_gpu(tiny):
  from ia3_jax.errors import ConfigError
  with pytest.raises(ValueError, match="T5Config.attention_impl: unknown 'flash'"):
    get_config("tiny", attention_impl="flash")
  with pytest.raises(ValueError, match="T5Config.dpa_implementation"):
    get_config("tiny", attention_impl=DPA, dpa_implementation="triton")
  config, _, params = tiny
  cudnn = config.replace(attention_impl=DPA, dpa_implementation="cudnn")
  tokens = np.ones((1, 4), np.int32)
  assert jax.default_backend() == "cpu"
  with pytest.raises(ConfigError, match=r"dpa_implementation='cudnn' needs a CUDA GPU.*'cpu'"):
    network.Transformer(cudnn.replace(dtype="bfloat16")).apply({"params": params}, tokens, tokens)
  with pytest.raises(ConfigError, match=r"'cudnn' needs bfloat16 or float16 activations, got "
                     r"dtype 'float32'"):
    network.Transformer(cudnn).apply({"params": params}, tokens, tokens)


# --------------------------------------------------------------------------- dtype="auto"

CPUINFO_SAMPLE = """processor\t: 0
model name\t: Example CPU 9000
flags\t\t: fpu sse2 avx2 avx512f {extra}

processor\t: 1
model name\t: Example CPU 9000
flags\t\t: fpu
"""


@pytest.mark.parametrize("backend,extra,want", [
    ("cpu", "", "float32"), ("cpu", "avx512_bf16", "bfloat16"), ("cpu", "amx_bf16", "bfloat16"),
    ("gpu", "", "bfloat16"), ("tpu", "", "bfloat16")])
def test_auto_dtype_follows_native_bf16(backend, extra, want):
  from ia3_jax.model import precision
  cpu = precision.parse_cpuinfo(CPUINFO_SAMPLE.format(extra=extra))
  assert cpu.model == "Example CPU 9000" and "avx2" in cpu.flags and "fpu" in cpu.flags
  assert cpu.native_bf16 == ((extra,) if extra else ())
  assert ("avx512_bf16 yes" in cpu.describe()) == (extra == "avx512_bf16")
  name, why = precision.resolve_dtype("auto", backend=backend, cpu_flags=cpu.flags)
  assert name == want
  assert (extra or backend) in why if want == "bfloat16" else "emulated" in why
  assert precision.resolve_dtype("bfloat16", backend="cpu", cpu_flags=()) == (
      "bfloat16", "set explicitly")


def test_auto_dtype_reaches_the_model(tiny):
  from ia3_jax.model import precision
  config, _, params = tiny
  auto = config.replace(dtype="auto")
  want = precision.resolve_dtype("auto")[0]
  assert auto.activation_dtype == jnp.dtype(want)
  assert auto.to_dict()["dtype"] == "auto" and type(auto)(**auto.to_dict()) == auto
  tokens = np.ones((2, 5), np.int32)
  encoded, _ = network.Transformer(auto).apply({"params": params}, tokens,
                                               method=network.Transformer.encode)
  assert encoded.dtype == jnp.dtype(want)
  assert precision.describe_dtype("auto").startswith(f"activations: {want} (dtype='auto': ")
  with pytest.raises(TypeError):
    get_config("tiny", dtype="automatic")


@pytest.mark.parametrize("model_gin", ["tiny", "demo"])
def test_gin_macro_and_auto_dtype_reach_the_config(model_gin):
  """ATTENTION_IMPL (models/*.gin) and dtype="auto" set through gin, as `--gin.` flags do."""
  import os
  import gin
  from ia3_jax import gin_configurables
  from ia3_jax.interop import hf_checkpoints
  from ia3_jax import demo
  fn = hf_checkpoints.load_hf_config if model_gin == "demo" else get_config
  name = "hf_checkpoints.load_hf_config" if model_gin == "demo" else "config.get_config"
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [os.path.join(gin_configurables.gin_dir(), "models", name)
         for name in ("base.gin", f"{model_gin}.gin")],
        [f"INITIAL_CHECKPOINT_PATH = '{demo.BUNDLED_MODEL_DIR}'", f"ATTENTION_IMPL = '{DPA}'",
         f"{name}.dtype = 'auto'"])
    config = gin.get_configurable(fn)()
  finally:
    gin.clear_config()
  assert (config.attention_impl, config.dtype) == (DPA, "auto")
