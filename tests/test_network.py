"""The T5X-compatible network: parameter tree, counts, axes, dtypes, cache, overrides."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

from ia3_jax import layers, network
from ia3_jax.config import PRESETS, get_config
from tests import hf_utils

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
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


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
