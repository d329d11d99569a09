"""Compacter and Compacter++ against HF T5 (PyTorch) with T-Few's PHM adapter layers transcribed.

T-Few (src/models/AdapterVariants: `HyperComplexAdapter`, `PHMLinear` with
`factorized_phm`, `kronecker_product_einsum_batched`): `H = sum_i kron(rule[i],
W_left[i] @ W_right[i])`, `y = x @ H + b`, and the adapter returns `x + up(relu(down(x)))`.
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
from ia3_jax.peft import compacter, counts, registry
from tests import hf_utils, tolerances
from tests.test_adapter import _random_adapters


def _tfew_phm(rule, left, right):
  """T-Few's `PHMLinear` kernel: `torch.bmm(W_left, W_right)`, then the batched Kronecker
  product `einsum("bac,bkp->bakcp").view(b, a*k, c*p)` summed over b."""
  rule, left, right = (torch.tensor(np.asarray(x)) for x in (rule, left, right))
  w = torch.bmm(left, right)
  h = torch.einsum("bac,bkp->bakcp", rule, w).reshape(
      rule.shape[0], rule.shape[1] * w.shape[1], rule.shape[2] * w.shape[2])
  return h.sum(0)


class _TFewPhmAdapter(torch.nn.Module):
  """T-Few's `HyperComplexAdapter` around a T5 sub-layer's inner module."""

  def __init__(self, inner, flat, prefix):
    super().__init__()
    self.inner = inner
    self.h = {n: _tfew_phm(*(flat[f"{prefix}/adapter_{n}_{p}"]
                             for p in ("phm_rule", "w_left", "w_right"))) for n in ("down", "up")}
    self.b = {n: torch.tensor(np.asarray(flat[f"{prefix}/adapter_{n}_bias"]))
              for n in ("down", "up")}

  def adapt(self, x):
    z = torch.relu(x @ self.h["down"] + self.b["down"])
    return x + (z @ self.h["up"] + self.b["up"])

  def forward(self, *args, **kwargs):
    out = self.inner(*args, **kwargs)
    if isinstance(out, tuple):
      return (self.adapt(out[0]),) + out[1:]
    return self.adapt(out)


def test_phm_matrix_is_the_sum_of_kronecker_products():
  rng = np.random.default_rng(0)
  rule, left, right = rng.normal(size=(4, 4, 4)), rng.normal(size=(4, 3, 2)), rng.normal(
      size=(4, 2, 5))
  want = sum(np.kron(rule[i], left[i] @ right[i]) for i in range(4))
  tolerances.assert_close(np.asarray(compacter.phm_matrix(rule, left, right)), want)


@pytest.mark.parametrize("name", ["compacter", "compacter_pp"])
def test_compacter_matches_tfew_layers_in_hf_t5(tmp_path, name):
  torch_model = hf_utils.make_hf_model(tmp_path, "t5_1_1", "small")
  config, base = hf_checkpoints.load_hf_checkpoint(tmp_path)
  method = registry.make(name, reduction_factor=4)  # width 8: divisible by n = 4
  model = network.Transformer(config, blocks=method.blocks(config, network.Blocks()))
  init = network.init_params(model, jax.random.key(0))
  new = {k: v for k, v in params_lib.flatten(init).items() if k not in params_lib.flatten(base)}
  d = config.emb_dim
  assert new["decoder/layers_0/mlp/adapter_down_w_left"].shape == (4, d // 4, 1)
  assert new["decoder/layers_0/mlp/adapter_up_w_right"].shape == (4, 1, d // 4)
  assert new["decoder/layers_0/mlp/adapter_up_phm_rule"].shape == (4, 4, 4)
  assert any("self_attention/adapter_" in k for k in new) == (name == "compacter")
  assert not any("encoder_decoder_attention" in k for k in new)
  params = _random_adapters(params_lib.combine(base, params_lib.unflatten(new)),
                            np.random.default_rng(0))
  flat = params_lib.flatten(params)
  for stack in ("encoder", "decoder"):
    for i, block in enumerate(getattr(torch_model, stack).block):
      ff = block.layer[-1]
      ff.DenseReluDense = _TFewPhmAdapter(ff.DenseReluDense, flat, f"{stack}/layers_{i}/mlp")
      if name == "compacter":
        scope = "attention" if stack == "encoder" else "self_attention"
        att = block.layer[0]
        att.SelfAttention = _TFewPhmAdapter(att.SelfAttention, flat, f"{stack}/layers_{i}/{scope}")
  batch = hf_utils.random_batch(np.random.default_rng(1), config.vocab_size)
  want = hf_utils.torch_logits(torch_model, batch)
  got = np.asarray(model.apply({"params": params}, batch["encoder_input_tokens"],
                               batch["decoder_input_tokens"], batch["decoder_target_tokens"]))
  valid = batch["decoder_target_tokens"] > 0
  tolerances.assert_close_to_torch(got[valid], want[valid])


def test_init_follows_tfew():
  """Rules N(0, 0.02); W_left / W_right glorot-uniform with gain sqrt(2) (bound
  sqrt(2) * sqrt(6 / (fan_in + fan_out)) per 2-D slice); zero biases."""
  config = config_lib.get_config("t0_3b").replace(num_encoder_layers=1, num_decoder_layers=1)
  model = network.Transformer(config, blocks=registry.make("compacter").blocks(
      config, network.Blocks()))
  params = params_lib.flatten(jax.eval_shape(lambda k: network.init_params(model, k),
                                             jax.random.key(0)))
  assert params["encoder/layers_0/mlp/adapter_down_w_left"].shape == (4, 512, 1)
  tiny = config_lib.get_config("tiny")
  model = network.Transformer(tiny, blocks=registry.make("compacter", reduction_factor=4).blocks(
      tiny, network.Blocks()))
  flat = params_lib.flatten(network.init_params(model, jax.random.key(0)))
  rules = np.concatenate([np.ravel(v) for k, v in flat.items() if k.endswith("phm_rule")])
  assert abs(np.std(rules) - 0.02) < 0.2 * 0.02
  left = flat["encoder/layers_0/mlp/adapter_down_w_left"]  # [4, 8, 1]: fans 8 and 1
  bound = np.sqrt(2) * np.sqrt(6 / (8 + 1))
  assert np.abs(left).max() <= bound and np.abs(left).max() > 0.5 * bound
  assert all(np.all(v == 0) for k, v in flat.items() if k.endswith("adapter_down_bias"))


def test_t0_3b_counts_from_the_formula():
  """Per PHM projection [a, b]: n^3 rule + a + b factors + b bias; an adapter is its down
  (2048 -> 64) and up (64 -> 2048) projections; plus the layer norms T-Few trains. (The
  paper's Table 4 prints 807K and 540K; these are what T-Few's configs build.)"""
  n, d, r = 4, 2048, 64
  per_adapter = (n ** 3 + d + r + r) + (n ** 3 + r + d + d)
  norms = d * (2 * 24 + 3 * 24 + 2)
  got = {c.method: c.trainable for c in counts.count_all(config_lib.get_config("t0_3b"),
                                                          ["compacter", "compacter_pp"])}
  assert got == {"compacter": 96 * per_adapter + norms, "compacter_pp": 48 * per_adapter + norms}


def test_widths_not_divisible_by_n():
  """The model width must divide by n (one line); the adapter width is rounded up to a
  multiple of n (tiny: 32 // 32 = 1 -> 4)."""
  tiny = config_lib.get_config("tiny")
  with pytest.raises(errors.ConfigError, match=r"compacter.CompacterConfig.phm_dim=3: must "
                     r"divide the model width \(32\)"):
    registry.make("compacter", phm_dim=3).blocks(tiny, network.Blocks())
  with pytest.raises(errors.ConfigError, match="compacter.CompacterPlusPlusConfig.phm_rank=0"):
    registry.make("compacter_pp", phm_rank=0)
  model = network.Transformer(tiny, blocks=registry.make("compacter_pp").blocks(
      tiny, network.Blocks()))
  shapes = jax.eval_shape(lambda k: network.init_params(model, k), jax.random.key(0))
  assert params_lib.flatten(shapes)["encoder/layers_0/mlp/adapter_down_bias"].shape == (4,)
