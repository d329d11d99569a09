"""peft LoRA adapters of tiny random Llama and Qwen2 models against HF peft (PyTorch):
import (same logits), export (`PeftModel.from_pretrained` gives our logits), and merge
(`lora.merge_lora` equals peft's `merge_and_unload`)."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ia3_jax.errors import AdapterError
from ia3_jax.interop import hf_decoder, lora_adapters
from ia3_jax.model import decoder
from ia3_jax.model import params as params_lib
from ia3_jax.peft import lora
from tests import tolerances
from tests.test_decoder import (CLASSES, assert_valid_close, make_hf, our_logits, padded_batch,
                                torch_logits)
from tests.test_lora import MERGED_SCALE_TOL

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def case(request, tmp_path_factory):
  """A tiny HF model, our params for it, a peft LoRA model with random A and B, its adapter."""
  kind = request.param
  root = tmp_path_factory.mktemp(kind)
  hf = make_hf(root / "base", kind)
  config, base = hf_decoder.load_hf_decoder(root / "base")
  torch.manual_seed(0)
  peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=MODULES, lora_dropout=0.0,
      init_lora_weights=False, task_type="CAUSAL_LM")).eval()
  peft_model.save_pretrained(root / "adapter")
  tree, settings = lora_adapters.import_peft_lora(root / "adapter", config)
  tokens, mask = padded_batch(3, "left")
  return dict(kind=kind, hf=hf, config=config, base=base, peft=peft_model, root=root,
              tree=tree, settings=settings, tokens=tokens, mask=mask,
              model=lora_adapters.lora_model(config, settings))


def test_imported_adapter_gives_peft_logits(case):
  c = case
  s = c["settings"]
  assert (s.rank, s.alpha, s.use_rslora) == (RANK, ALPHA, False)
  assert s.targets == ("query", "key", "value", "out", "wi_0", "wi_1", "wo")
  assert isinstance(c["model"], decoder.DecoderOnly)
  ours = our_logits(c["model"], params_lib.combine(c["base"], c["tree"]), c["tokens"], c["mask"])
  theirs = torch_logits(c["peft"], c["tokens"], c["mask"])
  assert_valid_close(ours, theirs, c["mask"], f"{c['kind']} peft -> ours")
  plain = torch_logits(c["hf"], c["tokens"], c["mask"])
  assert np.abs(theirs - plain).max() > 1e-2  # LoRA matters


def test_exported_adapter_loads_in_peft(case, tmp_path):
  c = case
  flat = params_lib.flatten(c["tree"])  # other weights than the imported ones
  tree = params_lib.unflatten({k: -0.7 * v + 0.05 * jax.random.normal(jax.random.key(i), v.shape)
                               for i, (k, v) in enumerate(sorted(flat.items()))})
  out = lora_adapters.export_peft_lora(params_lib.combine(c["base"], tree), c["config"],
                                       tmp_path / "out", alpha=ALPHA)
  saved = json.loads((out / "adapter_config.json").read_text())
  assert saved["task_type"] == "CAUSAL_LM" and saved["target_modules"] == sorted(MODULES)
  base = CLASSES[c["kind"]][1].from_pretrained(c["root"] / "base").eval()
  loaded = PeftModel.from_pretrained(base, out).eval()
  ours = our_logits(c["model"], params_lib.combine(c["base"], tree), c["tokens"], c["mask"])
  assert_valid_close(ours, torch_logits(loaded, c["tokens"], c["mask"]), c["mask"],
                     f"{c['kind']} ours -> peft")
  again, settings = lora_adapters.import_peft_lora(out, c["config"])  # exact round trip
  assert settings == c["settings"]
  jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, tree))


def test_merged_kernels_equal_peft_merge_and_unload(case):
  c = case
  merged = lora.merge_lora(params_lib.combine(c["base"], c["tree"]), alpha=ALPHA)
  assert set(params_lib.flatten(merged)) == set(params_lib.flatten(c["base"]))
  unloaded = copy.deepcopy(c["peft"]).merge_and_unload()
  theirs = {k: v.detach().numpy() for k, v in unloaded.state_dict().items()}
  for ours_path, (name, transposed) in hf_decoder.hf_name_map(c["config"]).items():
    want = theirs[name].T if transposed else theirs[name]
    tolerances.assert_close_to_torch(np.asarray(params_lib.flatten(merged)["/".join(ours_path)]),
                                     want, err_msg=name)
  plain = decoder.DecoderOnly(c["config"])
  ours = our_logits(plain, merged, c["tokens"], c["mask"])
  assert_valid_close(ours, torch_logits(unloaded, c["tokens"], c["mask"]), c["mask"], "merged")
  unmerged = our_logits(c["model"], params_lib.combine(c["base"], c["tree"]), c["tokens"],
                        c["mask"])
  valid = c["mask"].astype(bool)
  tolerances.assert_close(ours[valid], unmerged[valid], scale_tol=MERGED_SCALE_TOL)


def test_lora_on_the_lm_head_is_a_one_line_error(case, tmp_path):
  c = case
  bad = get_peft_model(copy.deepcopy(c["hf"]), LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
  bad.save_pretrained(tmp_path / "bad")
  with pytest.raises(AdapterError, match=r"lm_head.*is not a LoRA A/B weight") as e:
    lora_adapters.import_peft_lora(tmp_path / "bad", c["config"])
  assert "\n" not in str(e.value)
