"""peft IA3 adapters and T-Few state dicts, checked against peft (PyTorch, CPU).

Every reference adapter has non-identity vectors (`init_ia3_weights=False`,
i.e. standard normal), so a wrong site, side or layer shows in the logits.
"""

import json
import pathlib

import numpy as np
import pytest
import torch
from peft import IA3Config, PeftModel, TaskType, get_peft_model
from transformers import T5ForConditionalGeneration

from ia3_jax.errors import AdapterError
from ia3_jax.interop import adapter_files, hf_checkpoints, ia3_adapters
from ia3_jax.model import network
from ia3_jax.model import params as params_lib
from ia3_jax.peft import ia3
from tests import hf_utils
from tests import tolerances


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """variant -> (HF dir, config, base params, batch)."""
  out = {}
  for variant in ("t5_1_1", "t5_1_0"):
    d = tmp_path_factory.mktemp(variant)
    hf_utils.make_hf_model(d, variant, seed=1)
    config, params = hf_checkpoints.load_hf_checkpoint(d)
    batch = hf_utils.random_batch(np.random.default_rng(0), config.vocab_size, batch=4,
                                  enc_len=11, dec_len=6)
    out[variant] = (d, config, params, batch)
  return out


def _hf(base_dir):
  return T5ForConditionalGeneration.from_pretrained(base_dir).eval()


def _peft(base_dir, out_dir, seed=0, safe_serialization=True, **kw):
  """A peft IA3 model with random vectors, saved to `out_dir`."""
  torch.manual_seed(seed)
  model = get_peft_model(_hf(base_dir), IA3Config(task_type=TaskType.SEQ_2_SEQ_LM,
                                                  init_ia3_weights=False, **kw)).eval()
  model.save_pretrained(out_dir, safe_serialization=safe_serialization)
  return model


def _ours(config, base, ia3_params, batch, task_id=None):
  model = ia3.ia3_model(config, ia3.sites_of(ia3_params), ia3.num_tasks_of(ia3_params))
  return np.asarray(model.apply({"params": ia3.insert_ia3(base, ia3_params)},
                                batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                batch["decoder_target_tokens"], task_id=task_id))


def _assert_close(ours, theirs, batch, rows=slice(None)):
  valid = batch["decoder_target_tokens"][rows] > 0
  tolerances.assert_close_to_torch(ours[valid], theirs[valid])


@pytest.mark.parametrize("variant", ["t5_1_1", "t5_1_0"])
def test_import_t5_default_matches_peft(bases, tmp_path, variant):
  base_dir, config, base, batch = bases[variant]
  model = _peft(base_dir, tmp_path)  # peft's T5 default: k, v, wo (feedforward)
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert set(cfg["target_modules"]) == {"k", "v", "wo"} and cfg["feedforward_modules"] == ["wo"]
  vectors = ia3_adapters.import_peft_adapter(tmp_path, config)
  assert ia3.sites_of(vectors) == ("k", "v", "ff") and ia3.num_tasks_of(vectors) == 1
  assert params_lib.count(vectors) == ia3.count_ia3(config)
  theirs = hf_utils.torch_logits(model, batch)
  _assert_close(_ours(config, base, vectors, batch), theirs, batch)
  # the adapter matters (so the match above is not the base model's)
  assert np.abs(hf_utils.torch_logits(_hf(base_dir), batch) - theirs).max() > 0.1


def test_import_mt5_tfew_convention_matches_peft(bases, tmp_path):
  base_dir, config, base, batch = bases["t5_1_1"]
  model = _peft(base_dir, tmp_path, seed=1, target_modules=["k", "v", "wi_1"],
                feedforward_modules=[])
  vectors = ia3_adapters.import_peft_adapter(tmp_path, config)
  assert ia3.sites_of(vectors) == ("k", "v", "ff")
  _assert_close(_ours(config, base, vectors, batch), hf_utils.torch_logits(model, batch), batch)


@pytest.mark.parametrize("targets,feedforward,sites,fmt", [
    (["q", "k", "v", "o", "wo"], ["o", "wo"], ("q", "k", "v", "o", "ff"), "bin"),
    (["o", "wo", "wi_1"], [], ("attn_out", "ff", "mlp_out"), "safetensors"),
])
def test_import_ablation_sites_match_peft(bases, tmp_path, targets, feedforward, sites, fmt):
  base_dir, config, base, batch = bases["t5_1_1"]
  model = _peft(base_dir, tmp_path, seed=2, target_modules=targets, feedforward_modules=feedforward,
                safe_serialization=fmt == "safetensors")
  weights = "adapter_model.bin" if fmt == "bin" else "adapter_model.safetensors"
  assert (tmp_path / weights).exists()
  vectors = ia3_adapters.import_peft_adapter(tmp_path, config)
  assert ia3.sites_of(vectors) == sites
  _assert_close(_ours(config, base, vectors, batch), hf_utils.torch_logits(model, batch), batch)


def test_import_partial_layers_fills_ones(bases, tmp_path):
  base_dir, config, base, batch = bases["t5_1_0"]
  model = _peft(base_dir, tmp_path, seed=3, target_modules=r".*decoder.*\.(k|v)$",
                feedforward_modules=[])
  vectors = ia3_adapters.import_peft_adapter(tmp_path, config, sites=("k", "v", "ff"))
  flat = params_lib.flatten(vectors)
  for path, vec in flat.items():
    identity = path.startswith("encoder") or path.endswith("ia3_ff")
    assert np.all(np.asarray(vec) == 1.0) == identity, path
  _assert_close(_ours(config, base, vectors, batch), hf_utils.torch_logits(model, batch), batch)


@pytest.mark.parametrize("variant,convention", [("t5_1_1", "t5"), ("t5_1_0", "t5"),
                                                ("t5_1_1", "mt5")])
def test_export_loads_in_peft(bases, tmp_path, variant, convention):
  base_dir, config, base, batch = bases[variant]
  rng = np.random.default_rng(4)
  bank = params_lib.unflatten({p: rng.uniform(0.3, 1.7, v.shape).astype(np.float32)
                      for p, v in params_lib.flatten(ia3.init_ia3(config, num_tasks=2)).items()})
  out = ia3_adapters.export_peft_adapter(bank, config, tmp_path / "exported", task=1,
                                    convention=convention)
  cfg = json.loads((out / "adapter_config.json").read_text())
  ff_module = "wo" if convention == "t5" else "wi_1"
  assert sorted(cfg["target_modules"]) == sorted(["k", "v", ff_module])
  assert cfg["feedforward_modules"] == (["wo"] if convention == "t5" else [])
  model = PeftModel.from_pretrained(_hf(base_dir), out).eval()
  ours = _ours(config, base, ia3.select_task(bank, 1), batch)
  _assert_close(ours, hf_utils.torch_logits(model, batch), batch)
  # and back: import gives the same vectors
  back = ia3_adapters.import_peft_adapter(out, config)
  for path, vec in params_lib.flatten(ia3.select_task(bank, 1)).items():
    np.testing.assert_array_equal(params_lib.flatten(back)[path], vec)


def test_export_errors(bases, tmp_path):
  _, config, _, _ = bases["t5_1_1"]
  both = ia3.init_ia3(config, ("ff", "mlp_out"))
  with pytest.raises(AdapterError, match="both map to peft module .*DenseReluDense.wo"):
    ia3_adapters.export_peft_adapter(both, config, tmp_path / "a")
  _, relu_config, _, _ = bases["t5_1_0"]
  with pytest.raises(AdapterError, match="has none; use convention='t5'"):
    ia3_adapters.export_peft_adapter(ia3.init_ia3(relu_config), relu_config, tmp_path / "b",
                                convention="mt5")
  with pytest.raises(ValueError, match="task 3 out of range"):
    ia3_adapters.export_peft_adapter(ia3.init_ia3(config), config, tmp_path / "c", task=3)


@pytest.mark.parametrize("variant", ["t5_1_1", "t5_1_0"])
def test_merge_matches_peft_merge_and_unload(bases, tmp_path, variant):
  base_dir, config, base, batch = bases[variant]
  model = _peft(base_dir, tmp_path, seed=5)
  vectors = ia3_adapters.import_peft_adapter(tmp_path, config)
  merged, _ = ia3.merge(ia3.insert_ia3(base, vectors))
  state = model.merge_and_unload().state_dict()
  names = hf_checkpoints.hf_name_map(config)
  for path, value in params_lib.flatten(merged).items():
    hf, transposed = names[tuple(path.split("/"))]
    theirs = state[hf].numpy()
    # same float32 products: bit-for-bit equal
    np.testing.assert_array_equal(np.asarray(value), theirs.T if transposed else theirs,
                                  err_msg=path)
  ours = np.asarray(network.Transformer(config).apply(
      {"params": merged}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"]))
  _assert_close(ours, hf_utils.torch_logits(model, batch), batch)


def test_merge_checkpoint_from_peft_adapter(bases, tmp_path):
  base_dir, config, _, batch = bases["t5_1_1"]
  model = _peft(base_dir, tmp_path / "adapter", seed=6, target_modules=["k", "v", "wi_1"],
                feedforward_modules=[])
  out = ia3_adapters.merge_checkpoint(base_dir, tmp_path / "adapter", tmp_path / "merged")
  _assert_close(hf_utils.torch_logits(_hf(out), batch), hf_utils.torch_logits(model, batch), batch)


@pytest.mark.parametrize("variant,targets,feedforward,module", [
    ("t5_1_0", ["wi"], [], "DenseReluDense.wi'"),       # relu(l * h) != l * relu(h)
    ("t5_1_1", ["wi_0"], [], "DenseReluDense.wi_0'"),   # gelu branch
    ("t5_1_1", ["q"], ["q"], "SelfAttention.q'"),       # input of q (shared with k, v)
])
def test_unrepresentable_targets_raise(bases, tmp_path, variant, targets, feedforward, module):
  base_dir, config, _, _ = bases[variant]
  _peft(base_dir, tmp_path, target_modules=targets, feedforward_modules=feedforward)
  with pytest.raises(AdapterError, match=f"module '.*{module} scales the .* cannot represent"):
    ia3_adapters.import_peft_adapter(tmp_path, config)


def test_bad_adapter_directories(bases, tmp_path):
  _, config, _, _ = bases["t5_1_1"]
  with pytest.raises(AdapterError, match="not a directory"):
    ia3_adapters.import_peft_adapter(tmp_path / "missing", config)
  tmp_path.joinpath("empty").mkdir()
  with pytest.raises(AdapterError, match="no adapter_config.json"):
    ia3_adapters.import_peft_adapter(tmp_path / "empty", config)
  lora = tmp_path / "lora"
  adapter_files.write_adapter_dir(lora, {"peft_type": "LORA"}, {"x": np.ones((2, 2))})
  with pytest.raises(AdapterError, match="peft_type is 'LORA', expected 'IA3'"):
    ia3_adapters.import_peft_adapter(lora, config)
  extra = tmp_path / "extra"
  name = "base_model.model.encoder.block.0.layer.0.SelfAttention.k"
  adapter_files.write_adapter_dir(extra, {"peft_type": "IA3"}, {
      f"{name}.ia3_l": np.ones((config.joined_kv, 1)),
      "base_model.model.lm_head.weight": np.ones((2, 2))})
  with pytest.raises(AdapterError, match="not \\(IA\\)\\^3 vectors .*lm_head.weight"):
    ia3_adapters.import_peft_adapter(extra, config)
  wrong = tmp_path / "wrong"
  adapter_files.write_adapter_dir(wrong, {"peft_type": "IA3"}, {f"{name}.ia3_l": np.ones((5, 1))})
  with pytest.raises(AdapterError, match="has 5 entries, model expects 32"):
    ia3_adapters.import_peft_adapter(wrong, config)
  layer9 = tmp_path / "layer9"
  adapter_files.write_adapter_dir(layer9, {"peft_type": "IA3"}, {
      name.replace("block.0", "block.9") + ".ia3_l": np.ones((32, 1))})
  with pytest.raises(AdapterError, match="not a projection of this T5 model"):
    ia3_adapters.import_peft_adapter(layer9, config)
  nofiles = tmp_path / "nofiles"
  nofiles.mkdir()
  (nofiles / "adapter_config.json").write_text('{"peft_type": "IA3"}')
  with pytest.raises(AdapterError, match="no adapter weights"):
    ia3_adapters.import_peft_adapter(nofiles, config)


def _tfew_file(peft_model, path, prefix=""):
  """A T-Few-style (IA)^3 checkpoint holding the same vectors as a peft mT5-convention model.

  T-Few's LoRALinear has `multi_lora_b` [out, 1] (trained) and `multi_lora_a`
  [1, in] (ones, frozen in its (IA)^3 config); we write both.
  """
  state = {}
  for name, tensor in peft_model.state_dict().items():
    if "ia3_l" not in name:
      continue
    module = name.split("base_model.model.", 1)[1].split(".ia3_l", 1)[0]
    state[f"{prefix}{module}.multi_lora_b"] = tensor.detach().clone()
    in_features = dict(peft_model.named_modules())["base_model.model." + module].in_features
    state[f"{prefix}{module}.multi_lora_a"] = torch.ones(1, in_features)
  torch.save(state, path)
  return path


@pytest.mark.parametrize("prefix", ["", "module.model."])
def test_tfew_state_dict_matches_peft(bases, tmp_path, prefix):
  base_dir, config, base, batch = bases["t5_1_1"]
  model = _peft(base_dir, tmp_path / "adapter", seed=7, target_modules=["k", "v", "wi_1"],
                feedforward_modules=[])
  path = _tfew_file(model, tmp_path / "finish.pt", prefix)
  assert any(k.endswith("DenseReluDense.wi_1.multi_lora_b") for k in torch.load(path))
  vectors = ia3_adapters.import_tfew_state_dict(path, config)
  assert ia3.sites_of(vectors) == ("k", "v", "ff")
  _assert_close(_ours(config, base, vectors, batch), hf_utils.torch_logits(model, batch), batch)


def test_tfew_rejects_lora_and_pickles(bases, tmp_path):
  _, config, _, _ = bases["t5_1_1"]
  name = "encoder.block.0.layer.0.SelfAttention.q"
  torch.save({f"{name}.lora_a": torch.zeros(4, 32), f"{name}.lora_b": torch.zeros(32, 4)},
             tmp_path / "lora.pt")
  with pytest.raises(AdapterError, match="LoRA weights, not \\(IA\\)\\^3"):
    ia3_adapters.import_tfew_state_dict(tmp_path / "lora.pt", config)
  torch.save({f"{name}.multi_lora_a": torch.full((1, 32), 2.0)}, tmp_path / "a.pt")
  with pytest.raises(AdapterError, match="scales the input of 'query'"):
    ia3_adapters.import_tfew_state_dict(tmp_path / "a.pt", config)
  torch.save({"vectors": {"k": torch.ones(3)}, "path": pathlib.PurePosixPath("x")},
             tmp_path / "pickle.pt")
  with pytest.raises(hf_checkpoints.CheckpointError, match="weights_only=True"):
    ia3_adapters.import_tfew_state_dict(tmp_path / "pickle.pt", config)


def test_adapters_load_into_one_bank(bases, tmp_path):
  """Two peft adapters and a T-Few file as tasks 0..2; a mixed batch matches each peft model."""
  base_dir, config, base, batch = bases["t5_1_1"]
  m0 = _peft(base_dir, tmp_path / "a0", seed=10)  # k, v, wo
  m1 = _peft(base_dir, tmp_path / "a1", seed=11, target_modules=["k", "v", "wi_1"],
             feedforward_modules=[])
  m2 = _peft(base_dir, tmp_path / "a2", seed=12, target_modules=["q", "v"], feedforward_modules=[])
  tfew = _tfew_file(m1, tmp_path / "t1.pt")
  bank = ia3_adapters.load_adapters_into_bank([tmp_path / "a0", tfew, tmp_path / "a2"], config)
  assert ia3.num_tasks_of(bank) == 3 and ia3.sites_of(bank) == ("q", "k", "v", "ff")
  task_id = np.array([2, 0, 1, 0])
  mixed = _ours(config, base, bank, batch, task_id)
  for t, model in enumerate((m0, m1, m2)):
    rows = np.flatnonzero(task_id == t)
    _assert_close(mixed[rows], hf_utils.torch_logits(model, batch)[rows], batch, rows)
