"""Adapters against HF T5 (PyTorch) with T-Few's adapter layers transcribed, and the paper's size.

T-Few (src/models/adapters.py, AdapterVariants/Adapters.py): a sub-layer's output `y`
becomes `y + up(relu(down(y)))` before the residual connection (`normal_adapter_residual`),
after the feed-forward sub-layer (`T5LayerFFWithAdapter`) and, with
`compacter_add_compacter_in_self_attention`, after self-attention.
"""

import jax
import numpy as np
import pytest
import torch

from ia3_jax import errors
from ia3_jax.interop import hf_checkpoints
from ia3_jax.model import config as config_lib
from ia3_jax.model import network
from ia3_jax.model import params as params_lib
from ia3_jax.peft import adapter, counts, registry
from tests import hf_utils, tolerances


class _TFewAdapter(torch.nn.Module):
  """T-Few's `Adapter` with residual, wrapped around a T5 sub-layer's inner module."""

  def __init__(self, inner, down, down_bias, up, up_bias):
    super().__init__()
    self.inner = inner
    self.down, self.up = torch.nn.Linear(*down.shape), torch.nn.Linear(*up.shape)
    with torch.no_grad():  # torch Linear weights are [out, in]
      for lin, w, b in ((self.down, down, down_bias), (self.up, up, up_bias)):
        lin.weight.copy_(torch.tensor(np.asarray(w).T))
        lin.bias.copy_(torch.tensor(np.asarray(b)))

  def adapt(self, y):
    return y + self.up(torch.relu(self.down(y)))

  def forward(self, *args, **kwargs):
    out = self.inner(*args, **kwargs)
    if isinstance(out, tuple):  # an attention: (output, position bias, ...)
      return (self.adapt(out[0]),) + out[1:]
    return self.adapt(out)


def _random_adapters(params, rng):
  """`params` with every adapter param drawn at random (not the near-zero init)."""
  flat = params_lib.flatten(params)
  return params_lib.unflatten({k: (rng.normal(0, 0.5, np.shape(v)).astype(np.float32)
                                   if "/adapter_" in k else v) for k, v in flat.items()})


def _wrap_hf(torch_model, flat, sites):
  """Puts T-Few's adapter layers, with our params' values, into the HF model."""
  def wrap(parent, attr, prefix):
    p = {n: flat[f"{prefix}/adapter_{n}"] for n in ("down", "down_bias", "up", "up_bias")}
    setattr(parent, attr, _TFewAdapter(getattr(parent, attr), p["down"], p["down_bias"],
                                       p["up"], p["up_bias"]))
  for stack in ("encoder", "decoder"):
    for i, block in enumerate(getattr(torch_model, stack).block):
      ours = f"{stack}/layers_{i}"
      wrap(block.layer[-1], "DenseReluDense", f"{ours}/mlp")
      if "self_attention" in sites:
        wrap(block.layer[0], "SelfAttention",
             f"{ours}/{'attention' if stack == 'encoder' else 'self_attention'}")
      if "cross_attention" in sites and stack == "decoder":
        wrap(block.layer[1], "EncDecAttention", f"{ours}/encoder_decoder_attention")


@pytest.mark.parametrize("sites", [("mlp",), ("self_attention", "mlp"),
                                   ("self_attention", "cross_attention", "mlp")])
def test_adapters_match_tfew_layers_in_hf_t5(tmp_path, sites):
  torch_model = hf_utils.make_hf_model(tmp_path, "t5_1_1", "small")
  config, base = hf_checkpoints.load_hf_checkpoint(tmp_path)
  method = adapter.AdapterConfig(reduction_factor=4, sites=sites)
  model = network.Transformer(config, blocks=method.blocks(config, network.Blocks()))
  init = network.init_params(model, jax.random.key(0))
  new = {k: v for k, v in params_lib.flatten(init).items() if k not in params_lib.flatten(base)}
  assert {k.rsplit("/", 2)[1] for k in new} == {"mlp", *(
      ["attention", "self_attention"] if "self_attention" in sites else []), *(
      ["encoder_decoder_attention"] if "cross_attention" in sites else [])}
  assert new["encoder/layers_0/mlp/adapter_down"].shape == (config.emb_dim, config.emb_dim // 4)
  params = _random_adapters(params_lib.combine(base, params_lib.unflatten(new)),
                            np.random.default_rng(0))
  _wrap_hf(torch_model, params_lib.flatten(params), sites)
  batch = hf_utils.random_batch(np.random.default_rng(1), config.vocab_size)
  want = hf_utils.torch_logits(torch_model, batch)
  got = np.asarray(model.apply({"params": params}, batch["encoder_input_tokens"],
                               batch["decoder_input_tokens"], batch["decoder_target_tokens"]))
  valid = batch["decoder_target_tokens"] > 0  # HF scores padded decoder positions too
  tolerances.assert_close_to_torch(got[valid], want[valid])
  base_logits = np.asarray(network.Transformer(config).apply(
      {"params": base}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"]))
  assert np.abs(got - base_logits)[valid].max() > 0.1  # the adapters change the outputs


def test_init_is_near_the_base_model_and_what_trains():
  config = config_lib.get_config("tiny")
  method = registry.make("adapter")
  model = network.Transformer(config, blocks=method.blocks(config, network.Blocks()))
  params = params_lib.flatten(network.init_params(model, jax.random.key(0)))
  kernels = np.concatenate([np.ravel(v) for k, v in params.items()
                            if k.endswith(("adapter_down", "adapter_up"))])
  assert abs(np.std(kernels) - adapter.INIT_STD) < 0.3 * adapter.INIT_STD  # N(0, 0.02)
  assert all(np.all(v == 0) for k, v in params.items() if k.endswith("_bias")
             and "/adapter_" in k)
  trainable, _ = params_lib.select(params_lib.unflatten(params), method.trainable_patterns)
  names = {k.rsplit("/", 1)[-1] for k in params_lib.flatten(trainable)}
  assert names == {"adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias", "scale"}


def test_t0_3b_count_is_the_papers_12_9m():
  """Table 4 of the paper: 12.9M updated params (48 feed-forward adapters of 2048 -> 64 ->
  2048 with biases, plus the layer norms T-Few trains with them)."""
  [count] = counts.count_all(config_lib.get_config("t0_3b"), ["adapter"])
  per_adapter = 2 * 2048 * 64 + 64 + 2048
  norms = 2048 * (2 * 24 + 3 * 24 + 2)
  assert count.trainable == 48 * per_adapter + norms == 12_934_144
  assert round(count.trainable / 1e6, 1) == 12.9


def test_bad_settings_and_mixed_tasks_are_one_line_errors():
  with pytest.raises(errors.ConfigError, match=r"adapter.AdapterConfig.reduction_factor=0: "
                     "must be a positive int"):
    adapter.AdapterConfig(reduction_factor=0)
  with pytest.raises(errors.ConfigError, match=r"adapter.AdapterConfig.sites=\('ffn',\): "
                     r"unknown \['ffn'\]"):
    adapter.AdapterConfig(sites=("ffn",))
  with pytest.raises(errors.ConfigError, match="NUM_TASKS=2: adapter does not support"):
    adapter.AdapterConfig().blocks(None, network.Blocks(), num_tasks=2)
