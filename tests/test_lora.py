"""LoRA against HF peft (PyTorch): import, export, merge; dropout; unsupported adapters."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ia3_jax.errors import AdapterError
from ia3_jax.interop import hf_checkpoints, lora_adapters
from ia3_jax.model import network
from ia3_jax.model import params as params_lib
from ia3_jax.peft import lora
from tests import hf_utils
from tests import tolerances

# (variant, peft target_modules, use_rslora)
CASES = {
    "all_t5_1_1": ("t5_1_1", ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], False),
    "qv_rslora_t5_1_0": ("t5_1_0", ["q", "v", "wi"], True),
}
RANK, ALPHA = 2, 3.0
# Merged kernels W + s B A round once more per projection than W x + s B (A x): merged vs
# unmerged logits differ by ~3e-6 of their scale, 10x the other float32 reorderings.
MERGED_SCALE_TOL = 3e-5


@pytest.fixture(scope="module", params=list(CASES))
def peft_case(request, tmp_path_factory):
  """A tiny HF T5, our params for it, a peft LoRA model with random A and B, and its adapter."""
  variant, targets, rslora = CASES[request.param]
  root = tmp_path_factory.mktemp(request.param)
  hf = hf_utils.make_hf_model(root / "base", variant, "small")
  config, base = hf_checkpoints.load_hf_checkpoint(root / "base")
  torch.manual_seed(0)
  peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
      init_lora_weights=False, task_type="SEQ_2_SEQ_LM")).eval()
  peft_model.save_pretrained(root / "adapter")
  batch = hf_utils.random_batch(np.random.default_rng(0), config.vocab_size, batch=3,
                                enc_len=25, dec_len=6)
  tree, settings = lora_adapters.import_peft_lora(root / "adapter", config)
  lora_apply = _jitted_apply(config, lora.lora_blocks(**settings.blocks_kwargs()), batch)
  return dict(hf=hf, config=config, base=base, peft=peft_model, root=root, batch=batch,
              rslora=rslora, tree=tree, settings=settings, lora_apply=lora_apply,
              base_apply=_jitted_apply(config, network.Blocks(), batch),
              unmerged=lora_apply(params_lib.combine(base, tree)))


def _jitted_apply(config, blocks, batch):
  """params -> logits [B, T, V] (NumPy) for `batch`, compiled once per fixture."""
  model = network.Transformer(config, blocks=blocks)
  fn = jax.jit(lambda params: model.apply({"params": params}, batch["encoder_input_tokens"],
                                          batch["decoder_input_tokens"]))
  return lambda params: np.asarray(fn(params))


def test_imported_adapter_matches_peft(peft_case):
  c = peft_case
  settings = c["settings"]
  assert settings.rank == RANK and settings.alpha == ALPHA and settings.use_rslora == c["rslora"]
  assert settings.scaling == pytest.approx(ALPHA / (RANK ** 0.5 if c["rslora"] else RANK))
  ours = c["unmerged"]
  theirs = hf_utils.torch_logits(c["peft"], c["batch"])
  tolerances.assert_close_to_torch(ours, theirs)
  assert np.abs(theirs - hf_utils.torch_logits(c["hf"], c["batch"])).max() > 1e-2  # LoRA matters


def test_exported_adapter_loads_in_peft(peft_case, tmp_path):
  c = peft_case
  tree, settings = c["tree"], c["settings"]
  # Different weights from the imported ones: what we export is what peft computes.
  flat = params_lib.flatten(tree)
  tree = params_lib.unflatten({k: -0.7 * v + 0.05 * jax.random.normal(jax.random.key(i), v.shape)
                      for i, (k, v) in enumerate(sorted(flat.items()))})
  lora_adapters.export_peft_lora(params_lib.combine(c["base"], tree), c["config"], tmp_path / "out",
                           alpha=ALPHA, use_rslora=c["rslora"])
  saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
  assert saved["peft_type"] == "LORA" and saved["r"] == RANK
  loaded = PeftModel.from_pretrained(copy.deepcopy(c["hf"]), tmp_path / "out").eval()
  ours = c["lora_apply"](params_lib.combine(c["base"], tree))
  tolerances.assert_close_to_torch(ours, hf_utils.torch_logits(loaded, c["batch"]))
  # Round trip through the files is exact.
  again, settings2 = lora_adapters.import_peft_lora(tmp_path / "out", c["config"])
  assert settings2 == settings
  exported = params_lib.flatten(tree)
  assert set(params_lib.flatten(again)) == set(exported)
  for k, v in params_lib.flatten(again).items():
    np.testing.assert_array_equal(v, np.asarray(exported[k]))


def test_merged_matches_peft_merge_and_unload(peft_case):
  c = peft_case
  settings = c["settings"]
  merged = lora.merge_lora(params_lib.combine(c["base"], c["tree"]), alpha=settings.alpha,
                           use_rslora=settings.use_rslora)
  assert set(params_lib.flatten(merged)) == set(params_lib.flatten(c["base"]))  # a plain T5X tree
  theirs = hf_utils.torch_logits(copy.deepcopy(c["peft"]).merge_and_unload(), c["batch"])
  ours_merged = c["base_apply"](merged)
  tolerances.assert_close_to_torch(ours_merged, theirs)
  tolerances.assert_close(ours_merged, c["unmerged"], scale_tol=MERGED_SCALE_TOL)


def test_lora_dropout_only_with_a_dropout_rng():
  from ia3_jax.model.config import get_config
  config = get_config("tiny")
  model = network.Transformer(config, blocks=lora.lora_blocks(rank=2, dropout=0.5))
  params = network.init_params(model, jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(  # non-zero B, so LoRA (and its dropout) matters
      lambda path, x: x + 0.5 if path[-1].key.endswith(lora.SUFFIX_B) else x, params)
  enc = jnp.arange(1, 13, dtype=jnp.int32).reshape(2, 6)
  dec = enc[:, :4]

  @jax.jit
  def run(p, key):
    rngs = {"dropout": key}
    plain = model.apply({"params": p}, enc, dec)  # no dropout RNG: evaluation
    dropped = model.apply({"params": p}, enc, dec, rngs=rngs)
    frozen_b = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if path[-1].key.endswith(lora.SUFFIX_B) else x, p)
    dropped_no_lora = model.apply({"params": frozen_b}, enc, dec, rngs=rngs)
    base = model.apply({"params": frozen_b}, enc, dec)
    return plain, dropped, dropped_no_lora, base

  plain, dropped, dropped_no_lora, base = run(params, jax.random.key(1))
  merged = lora.merge_lora(params, alpha=4.0)
  tolerances.assert_close(plain, jax.jit(network.Transformer(config).apply)(
      {"params": merged}, enc, dec), scale_tol=MERGED_SCALE_TOL)  # no RNG: deterministic LoRA
  assert np.abs(np.asarray(dropped - plain)).max() > 1e-3  # dropout acts on the LoRA input
  tolerances.assert_close(dropped_no_lora, base)  # ... and only there


def _rewrite_config(src, dst, **changes):
  import shutil
  shutil.copytree(src, dst)
  cfg = json.loads((dst / "adapter_config.json").read_text())
  cfg.update(changes)
  (dst / "adapter_config.json").write_text(json.dumps(cfg))
  return dst


@pytest.mark.parametrize("changes,message", [
    (dict(use_dora=True), "use_dora=True is not supported"),
    (dict(rank_pattern={"q": 8}), "per-module rank_pattern"),
    (dict(bias="all"), "bias='all' is not supported"),
    (dict(peft_type="IA3"), "peft_type is 'IA3', expected 'LORA'"),
])
def test_unsupported_adapters_raise(peft_case, tmp_path, changes, message):
  bad = _rewrite_config(peft_case["root"] / "adapter", tmp_path / "bad", **changes)
  with pytest.raises(AdapterError, match=message):
    lora_adapters.import_peft_lora(bad, peft_case["config"])


def test_adapter_skipping_layers_raises(peft_case, tmp_path):
  c = peft_case
  partial = get_peft_model(copy.deepcopy(c["hf"]), LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=["q"], layers_to_transform=[0],
      layers_pattern="block", task_type="SEQ_2_SEQ_LM"))
  partial.save_pretrained(tmp_path / "partial")
  with pytest.raises(AdapterError, match="lack weights.*layers_to_transform"):
    lora_adapters.import_peft_lora(tmp_path / "partial", c["config"])


def test_lora_param_names_and_shapes():
  from ia3_jax.model.config import get_config
  config = get_config("tiny")
  model = network.Transformer(config, blocks=lora.lora_blocks(rank=3, targets=["q", "wo"]))
  flat = params_lib.flatten(jax.eval_shape(lambda k: network.init_params(model, k), jax.random.key(0)))
  new = {k: v.shape for k, v in flat.items() if "_lora_" in k}
  assert new["encoder/layers_0/attention/query_lora_a"] == (config.emb_dim, 3)
  assert new["decoder/layers_1/encoder_decoder_attention/query_lora_b"] == (3, config.joined_kv)
  assert new["decoder/layers_0/mlp/wo_lora_a"] == (config.mlp_dim, 3)
  assert len(new) == 2 * (2 + 4 + 2 + 2)  # (a, b) x (enc q, dec self+cross q, 4 wo)
