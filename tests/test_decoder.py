"""Decoder-only (Llama / Mistral / Qwen2) models: logits against PyTorch, HF load/export,
parameter counts of the real shapes, (IA)^3 and peft IA3 adapters both ways."""

from __future__ import annotations

import copy
import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from ia3_jax.errors import CheckpointError
from ia3_jax.interop import hf_decoder, ia3_adapters
from ia3_jax.model import decoder
from ia3_jax.model.decoder_config import DecoderConfig, get_decoder_config
from ia3_jax.peft import bitfit, ia3, lora
from tests import tolerances

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
            max_position_embeddings=128, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}


def hf_config(kind: str, **overrides) -> transformers.PretrainedConfig:
  config_cls, _ = CLASSES[kind]
  return config_cls(**copy.deepcopy({**TINY, **overrides}))  # HF edits rope dicts in place


def make_hf(directory: pathlib.Path, kind: str = "llama", *, seed: int = 0, **overrides):
  """A random tiny HF model of `kind` saved to `directory`; returns it (eval mode)."""
  torch.manual_seed(seed)
  model = CLASSES[kind][1](hf_config(kind, **overrides)).eval()
  with torch.no_grad():  # non-trivial norms and biases, so scale and bias bugs show
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.5)
  model.save_pretrained(directory)
  return model


def padded_batch(seed: int, side: str, batch: int = 3, length: int = 9):
  """(tokens, attention_mask) with rows of lengths 9, 6, 4 padded on `side` (pad id 0)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, TINY["vocab_size"], size=(batch, length))
  lengths = np.array([length, 6, 4][:batch])
  idx = np.arange(length)[None]
  mask = idx >= (length - lengths[:, None]) if side == "left" else idx < lengths[:, None]
  return np.where(mask, tokens, 0).astype(np.int32), mask.astype(np.int32)


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """HF logits with positions counting valid tokens (as `generate` and our default)."""
  positions = np.where(mask > 0, np.cumsum(mask, axis=-1) - 1, 1)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def our_logits(model, params, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  return np.asarray(decoder.forward(model, params, jnp.asarray(tokens), jnp.asarray(mask)))


def assert_valid_close(ours, theirs, mask, err_msg=""):
  valid = mask.astype(bool)
  tolerances.assert_close_to_torch(ours[valid], theirs[valid], err_msg=err_msg)


# --------------------------------------------------------------------------- logits vs torch


CASES = {
    "llama_gqa_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_gqa_tied_llama3_rope": ("llama", dict(tie_word_embeddings=True,
                                                 rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama_linear_rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral_sliding_window": ("mistral", dict(sliding_window=3)),
    "qwen2_biases": ("qwen2", dict(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_pytorch_left_and_right_padding(tmp_path, case):
  kind, overrides = CASES[case]
  hf = make_hf(tmp_path, kind, **overrides)
  config, params = hf_decoder.load_hf_decoder(tmp_path)
  assert hf_decoder.model_type_of(config) == kind
  model = decoder.DecoderOnly(config)
  for side in ("left", "right"):
    tokens, mask = padded_batch(1, side)
    ours = our_logits(model, params, tokens, mask)
    assert_valid_close(ours, torch_logits(hf, tokens, mask), mask, f"{case} {side}")


def test_left_padding_gives_the_unpadded_logits(tmp_path):
  make_hf(tmp_path, "llama")
  config, params = hf_decoder.load_hf_decoder(tmp_path)
  model = decoder.DecoderOnly(config)
  tokens, mask = padded_batch(2, "left")
  padded = our_logits(model, params, tokens, mask)
  alone = our_logits(model, params, tokens[2:, -4:], mask[2:, -4:])
  tolerances.assert_close(padded[2, -4:], alone[0])


def test_config_fields_read_from_hf(tmp_path):
  make_hf(tmp_path, "llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0,
          tie_word_embeddings=True)
  config = hf_decoder.load_hf_config(tmp_path)
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 8)
  assert config.rope_theta == 500000.0 and config.tie_word_embeddings
  assert config.rope_scaling == LLAMA3_ROPE
  # transformers 4's layout (rope_theta + rope_scaling with "type") reads the same.
  old = {**json.loads((tmp_path / "config.json").read_text()), "rope_theta": 500000.0,
         "rope_scaling": {**LLAMA3_ROPE, "type": "llama3"}}
  del old["rope_parameters"]
  assert hf_decoder.config_from_hf(old) == config


@pytest.mark.parametrize("field,value,needle", [
    ("model_type", "gpt2", "model_type 'gpt2'"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type 'yarn'"),
    ("num_key_value_heads", 3, "num_kv_heads=3"),
])
def test_unsupported_config_is_one_line_error_naming_file_and_field(tmp_path, field, value,
                                                                    needle):
  make_hf(tmp_path, "llama")
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
  with pytest.raises(CheckpointError) as e:
    hf_decoder.load_hf_decoder(tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and str(tmp_path / "config.json") in msg and needle in msg, msg


def test_wrong_tensor_shape_and_missing_tensor_name_the_tensor(tmp_path):
  make_hf(tmp_path, "llama")
  weights = tmp_path / "model.safetensors"
  state = load_file(str(weights))
  state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
  save_file(state, str(weights), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
    hf_decoder.load_hf_decoder(tmp_path)
  del state["model.layers.1.self_attn.k_proj.weight"]
  save_file(state, str(weights), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match="missing tensors: model.layers.1.self_attn.k_proj"):
    hf_decoder.load_hf_decoder(tmp_path)


# --------------------------------------------------------------------------- files


def test_sharded_safetensors_and_torch_bin_load_the_same_params(tmp_path):
  hf = make_hf(tmp_path / "one", "qwen2")
  _, want = hf_decoder.load_hf_decoder(tmp_path / "one")
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
  torch.save(load_file(str(tmp_path / "one" / "model.safetensors")),
             tmp_path / "bin" / "pytorch_model.bin")
  for name in ("sharded", "bin"):
    _, got = hf_decoder.load_hf_decoder(tmp_path / name)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("kind,overrides", [("llama", dict(tie_word_embeddings=False)),
                                            ("qwen2", dict(tie_word_embeddings=True))])
def test_export_round_trip_loads_in_transformers(tmp_path, kind, overrides):
  hf = make_hf(tmp_path / "src", kind, **overrides)
  config, params = hf_decoder.load_hf_decoder(tmp_path / "src")
  out = hf_decoder.export_hf_decoder(params, config, tmp_path / "out", max_shard_bytes=20_000)
  assert (out / "model.safetensors.index.json").exists()  # sharded
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back) is type(hf)
  tokens, mask = padded_batch(3, "right")
  assert_valid_close(torch_logits(back, tokens, mask), torch_logits(hf, tokens, mask), mask)
  config2, params2 = hf_decoder.load_hf_decoder(out)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


# --------------------------------------------------------------------------- shapes


def _hf_count(config: DecoderConfig) -> int:
  d = hf_decoder.config_to_hf(config)
  config_cls, model_cls = CLASSES[d.pop("model_type")]
  with torch.device("meta"):
    return model_cls(config_cls(**d)).num_parameters()


@pytest.mark.parametrize("name", ["llama_3_2_1b", "llama_3_2_3b", "qwen2_0_5b", "mistral_7b"])
def test_parameter_counts_of_real_shapes_equal_hf(name):
  config = get_decoder_config(name)
  abstract = decoder.abstract_params(decoder.DecoderOnly(config))
  ours = sum(x.size for x in jax.tree.leaves(flax.linen.unbox(abstract)))
  assert ours == _hf_count(config)
  assert ours == {"llama_3_2_1b": 1_235_814_400, "llama_3_2_3b": 3_212_749_824,
                  "qwen2_0_5b": 494_032_768, "mistral_7b": 7_241_732_096}[name]


def test_every_param_has_logical_axes():
  config = get_decoder_config("tiny_llama", attention_bias=True)
  specs = decoder.logical_axes(decoder.DecoderOnly(config))
  allowed = {"vocab", "embed", "joined_kv", "mlp"}
  for path, spec in flax.traverse_util.flatten_dict(specs).items():
    assert spec is not None and set(spec) <= allowed, (path, spec)


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match=r"DecoderConfig\.num_kv_heads=3 must divide"):
    get_decoder_config("tiny_llama", num_kv_heads=3)
  with pytest.raises(ValueError, match=r"DecoderConfig\.rope_scaling: rope_type 'yarn'"):
    get_decoder_config("tiny_llama", rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match=r"DecoderConfig\.head_dim"):
    get_decoder_config("tiny_llama", head_dim=7)
  with pytest.raises(KeyError, match="tiny_llama"):
    get_decoder_config("nope")


# --------------------------------------------------------------------------- decoding, remat


def test_cached_decoding_matches_the_full_forward(tmp_path):
  make_hf(tmp_path, "mistral", sliding_window=4)
  config, params = hf_decoder.load_hf_decoder(tmp_path)
  model = decoder.DecoderOnly(config)
  tokens, mask = padded_batch(4, "left", length=8)
  full = our_logits(model, params, tokens, mask)
  cache = decoder.init_cache(model, params, tokens.shape[0], tokens.shape[1])
  step = jax.jit(lambda cache, t, m: model.apply({"params": params, "cache": cache}, t, m,
                                                 decode=True, mutable=["cache"]))
  prompt = 5  # prefill 5 tokens, then one at a time
  steps = [(0, prompt)] + [(t, t + 1) for t in range(prompt, tokens.shape[1])]
  for start, stop in steps:
    logits, mutated = step(cache, tokens[:, start:stop], mask[:, start:stop])
    cache = mutated["cache"]
    valid = mask[:, start:stop]
    assert_valid_close(np.asarray(logits), full[:, start:stop], valid, f"tokens {start}:{stop}")


def test_remat_gives_the_same_loss_and_gradients():
  config = get_decoder_config("tiny_llama", num_layers=1)
  tokens = jnp.asarray(padded_batch(5, "right")[0])
  plain = decoder.DecoderOnly(config)
  params = decoder.init_params(plain, jax.random.key(0))

  def loss(model):
    return jax.jit(jax.value_and_grad(
        lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)))(params)
  want = loss(plain)
  got = loss(decoder.DecoderOnly(config, decoder.DecoderBlocks(remat="full")))
  jax.tree.map(tolerances.assert_close, got, want)


def test_scanned_layers_equal_the_unrolled_model():
  """`DecoderBlocks(scan_layers=True)`: one `nn.scan` over stacked params (and a stacked
  key/value cache) gives the unrolled model's logits, gradients, cached generation and
  rank-classification scores."""
  from ia3_jax.model import network
  from ia3_jax.objectives import scoring
  config = get_decoder_config("tiny_llama")
  plain = decoder.DecoderOnly(config)
  scanned = decoder.DecoderOnly(config, decoder.DecoderBlocks(scan_layers=True, remat="full"))
  params = decoder.init_params(plain, jax.random.key(0))
  stacked = network.scan_params(params)
  shapes = jax.tree.map(np.shape, flax.linen.unbox(decoder.abstract_params(scanned)))
  assert shapes == jax.tree.map(np.shape, stacked)
  assert stacked["decoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (
      config.num_layers, config.mlp_dim, config.emb_dim)
  tokens, mask = padded_batch(4, "right", length=7)
  tolerances.assert_close(decoder.forward(scanned, stacked, tokens, mask),
                          decoder.forward(plain, params, tokens, mask))

  def grads(model, p):
    return jax.jit(jax.grad(lambda p: jnp.mean(decoder.forward(model, p, tokens, mask) ** 2)))(p)
  jax.tree.map(tolerances.assert_close, network.unscan_params(grads(scanned, stacked)),
               grads(plain, params))
  left, left_mask = padded_batch(3, "left", length=6)
  np.testing.assert_array_equal(decoder.greedy_generate(scanned, stacked, left, left_mask, 4),
                                decoder.greedy_generate(plain, params, left, left_mask, 4))
  cache = decoder.init_cache(scanned, stacked, 3, 10)
  assert cache["decoder"]["layers"]["self_attention"]["cached_key"].shape == (
      config.num_layers, 3, 10, config.num_kv_heads, config.head_dim)
  batch = {"encoder_input_tokens": tokens * mask,
           "choice_tokens": np.array([[[11, 12, 0], [13, 0, 0]]] * 3),
           "choice_mask": np.ones((3, 2), np.int32)}
  tolerances.assert_close(scoring.RankClassifier(scanned)(stacked, batch)["scores"],
                          scoring.RankClassifier(plain)(params, batch)["scores"])


# --------------------------------------------------------------------------- (IA)^3 / peft


def test_ia3_vectors_sit_on_key_value_and_wo_input_and_start_as_identity(tmp_path):
  make_hf(tmp_path, "qwen2")
  config, params = hf_decoder.load_hf_decoder(tmp_path)
  vectors = ia3.init_ia3(config)
  flat = {p: v.shape for p, v in flax.traverse_util.flatten_dict(vectors, sep="/").items()}
  kv, mlp = config.num_kv_heads * config.head_dim, config.mlp_dim
  assert flat == {f"decoder/layers_{i}/{p}": (1, n) for i in range(config.num_layers)
                  for p, n in (("self_attention/ia3_key", kv), ("self_attention/ia3_value", kv),
                               ("mlp/ia3_ff", mlp))}
  tokens, mask = padded_batch(6, "left")
  base = our_logits(decoder.DecoderOnly(config), params, tokens, mask)
  model = ia3.ia3_model(config)
  with_ones = our_logits(model, ia3.insert_ia3(params, vectors), tokens, mask)
  tolerances.assert_close(with_ones, base)  # another program: other summation orders


def _random_vectors(vectors, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32),
                      vectors)


PEFT_IA3 = {  # the brief's explicit Llama targets; peft's own default for Qwen2 (q, v, down)
    "llama": dict(target_modules=["k_proj", "v_proj", "down_proj"],
                  feedforward_modules=["down_proj"]),
    "qwen2": {},
}


@pytest.mark.parametrize("kind", sorted(PEFT_IA3))
def test_peft_ia3_adapter_gives_the_same_logits_both_ways(tmp_path, kind):
  import peft
  hf = make_hf(tmp_path / "base", kind)
  config, params = hf_decoder.load_hf_decoder(tmp_path / "base")
  tokens, mask = padded_batch(7, "left")
  # peft -> ours
  peft_model = peft.get_peft_model(hf, peft.IA3Config(task_type="CAUSAL_LM", **PEFT_IA3[kind]))
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "ia3_l" in name:
        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
  peft_model.eval().save_pretrained(tmp_path / "adapter")
  want = torch_logits(peft_model, tokens, mask)
  vectors = ia3_adapters.import_peft_adapter(tmp_path / "adapter", config)
  sites = ia3.sites_of(vectors)
  assert sites == {"llama": ("k", "v", "ff"), "qwen2": ("q", "v", "ff")}[kind]
  model = ia3.ia3_model(config, sites)
  ours = our_logits(model, ia3.insert_ia3(params, vectors), tokens, mask)
  assert_valid_close(ours, want, mask, "peft -> ours")
  # ours -> peft
  mine = _random_vectors(vectors, 2)
  out = ia3_adapters.export_peft_adapter(mine, config, tmp_path / "mine")
  base = CLASSES[kind][1].from_pretrained(tmp_path / "base").eval()
  loaded = peft.PeftModel.from_pretrained(base, out).eval()
  ours = our_logits(model, ia3.insert_ia3(params, mine), tokens, mask)
  assert_valid_close(ours, torch_logits(loaded, tokens, mask), mask, "ours -> peft")


def test_mixed_task_ia3_bank_serves_each_row_its_task():
  config = get_decoder_config("tiny_llama")
  params = decoder.init_params(decoder.DecoderOnly(config), jax.random.key(0))
  bank = _random_vectors(ia3.init_ia3(config, num_tasks=2), 4)
  tokens, mask = padded_batch(11, "left", batch=2)
  task_id = jnp.array([1, 0])
  mixed = decoder.forward(ia3.ia3_model(config, num_tasks=2),
                          ia3.insert_ia3(params, bank), jnp.asarray(tokens), jnp.asarray(mask),
                          task_id=task_id)
  single = ia3.ia3_model(config)
  for row, task in enumerate(task_id.tolist()):
    one = ia3.insert_ia3(params, ia3.select_task(bank, task))
    want = decoder.forward(single, one, jnp.asarray(tokens[row:row + 1]),
                           jnp.asarray(mask[row:row + 1]))
    tolerances.assert_close(np.asarray(mixed[row]), np.asarray(want[0]))
  # (IA)^3 size of a real shape: per layer 2 * kv_heads * head_dim + mlp_dim.
  big = get_decoder_config("llama_3_2_1b")
  vectors = _abstract_ia3(ia3.ia3_model(big))
  assert sum(v.size for v in jax.tree.leaves(vectors)) == 16 * (2 * 8 * 64 + 8192)


def _abstract_ia3(model) -> dict:
  """The (IA)^3 leaves of `model`'s abstract params (no memory)."""
  return ia3.extract_ia3(flax.linen.unbox(decoder.abstract_params(model)))[0]


def test_lora_and_bitfit_apply_to_the_decoder_blocks():
  config = get_decoder_config("tiny_llama")
  model = decoder.DecoderOnly(config, lora.lora_blocks(config, targets=("q", "v", "wo"),
                                                       base=decoder.DecoderBlocks()))
  params = decoder.init_params(model, jax.random.key(0))
  names = {"/".join(k) for k in flax.traverse_util.flatten_dict(params)}
  assert {n.rsplit("/", 1)[-1] for n in names if "lora" in n} == {
      "query_lora_a", "query_lora_b", "value_lora_a", "value_lora_b", "wo_lora_a", "wo_lora_b"}
  assert "decoder/layers_1/self_attention/value_lora_a" in names
  assert params["decoder"]["layers_0"]["self_attention"]["value_lora_b"].shape == (4, 16)
  # BitFit's biases sit next to Qwen2's own (`key_bias` beside `key/bias`).
  biased = config.replace(attention_bias=True)
  model = decoder.DecoderOnly(biased, bitfit.bitfit_blocks(targets=("k",),
                                                           base=decoder.DecoderBlocks()))
  attn = decoder.init_params(model, jax.random.key(0))["decoder"]["layers_0"]["self_attention"]
  assert attn["key_bias"].shape == attn["key"]["bias"].shape == (16,)


def test_merged_ia3_with_biases_equals_the_adapted_model_and_exports(tmp_path):
  make_hf(tmp_path / "base", "qwen2")
  config, params = hf_decoder.load_hf_decoder(tmp_path / "base")
  adapted = ia3.insert_ia3(params, _random_vectors(ia3.init_ia3(config), 3))
  tokens, mask = padded_batch(8, "right")
  want = our_logits(ia3.ia3_model(config), adapted, tokens, mask)
  merged, originals = ia3.merge(adapted)
  assert_valid_close(our_logits(decoder.DecoderOnly(config), merged, tokens, mask), want,
                     mask, "merged")
  jax.tree.map(np.testing.assert_array_equal, ia3.unmerge(merged, originals), adapted)
  out = hf_decoder.export_hf_decoder(merged, config, tmp_path / "merged")
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert_valid_close(torch_logits(hf, tokens, mask), want, mask, "merged, exported")


def test_greedy_generation_matches_hf_generate(tmp_path):
  hf = make_hf(tmp_path, "llama", rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)
  config, params = hf_decoder.load_hf_decoder(tmp_path)
  tokens, mask = padded_batch(9, "left", length=6)
  ours = decoder.greedy_generate(decoder.DecoderOnly(config), params, jnp.asarray(tokens),
                                 jnp.asarray(mask), 5)
  hf.generation_config.eos_token_id = None  # run all steps, as ours
  with torch.no_grad():
    theirs = hf.generate(torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=5,
                         do_sample=False, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(ours), theirs[:, tokens.shape[1]:].numpy())


def test_generation_stops_at_eos_like_hf_generate(tmp_path):
  """With an EOS id, a row that emits it is done and padded, as HF `generate` pads it."""
  hf = make_hf(tmp_path, "qwen2")
  config, params = hf_decoder.load_hf_decoder(tmp_path)
  model = decoder.DecoderOnly(config)
  tokens, mask = padded_batch(4, "left", length=6)
  free = np.asarray(decoder.greedy_generate(model, params, tokens, mask, 6))
  eos = int(free[0, 2])  # row 0 emits it third; other rows may or may not
  ours = np.asarray(decoder.generate(model, params, tokens, mask, 6, eos_id=eos, pad_id=0))
  with torch.no_grad():
    theirs = hf.generate(torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=6,
                         do_sample=False, eos_token_id=eos, pad_token_id=0)
  theirs = theirs[:, tokens.shape[1]:].numpy()
  np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
  assert (ours[:, theirs.shape[1]:] == 0).all()
  assert list(ours[0, 2:]) == [eos, 0, 0, 0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0),
                                                     (1.3, 0, 0.8), (0.9, 7, 0.6)])
def test_sampling_logits_equal_hf_warpers(temperature, top_k, top_p):
  from transformers.generation import logits_process as lp
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((4, 50)).astype(np.float32) * 3
  warpers = [lp.TemperatureLogitsWarper(temperature)]
  warpers += [lp.TopKLogitsWarper(top_k)] if top_k else []
  warpers += [lp.TopPLogitsWarper(top_p)] if top_p < 1 else []
  want = torch.tensor(logits)
  for w in warpers:
    want = w(None, want)
  got = np.asarray(decoder.sampling_logits(jnp.asarray(logits), temperature, top_k, top_p))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want.numpy()))
  kept = ~np.isinf(got)
  tolerances.assert_close(got[kept], want.numpy()[kept])


def test_sampling_draws_from_the_filtered_distribution():
  config = get_decoder_config("tiny_llama")
  model = decoder.DecoderOnly(config)
  params = decoder.init_params(model, jax.random.key(3))
  prompt = np.tile(np.array([[0, 5, 17, 42]], np.int32), (4000, 1))
  mask = (prompt > 0).astype(np.int32)
  logits = np.asarray(decoder.forward(model, params, prompt[:1], mask[:1]))[0, -1]
  filtered = np.asarray(decoder.sampling_logits(jnp.asarray(logits), 0.8, top_k=4))
  probs = np.exp(filtered - filtered.max())
  probs /= probs.sum()
  drawn = np.asarray(decoder.generate(model, params, prompt, mask, 1, temperature=0.8,
                                      top_k=4, rng=jax.random.key(0)))[:, 0]
  assert set(drawn) <= set(np.nonzero(probs)[0])
  freq = np.bincount(drawn, minlength=probs.size) / drawn.size
  np.testing.assert_allclose(freq, probs, atol=0.04)  # ~5 standard errors at 4,000 draws
  greedy = decoder.greedy_generate(model, params, prompt[:3], mask[:3], 4)
  top1 = decoder.generate(model, params, prompt[:3], mask[:3], 4, temperature=1.0, top_k=1,
                          rng=jax.random.key(1))
  np.testing.assert_array_equal(top1, greedy)
  with pytest.raises(ValueError, match="rng"):
    decoder.generate(model, params, prompt[:3], mask[:3], 4, temperature=1.0)
  with pytest.raises(ValueError, match="top_p"):
    decoder.generate(model, params, prompt[:3], mask[:3], 4, top_p=0.0)


def test_bfloat16_activations_stay_close_to_float32():
  config = get_decoder_config("tiny_llama", attention_bias=True)
  params = decoder.init_params(decoder.DecoderOnly(config), jax.random.key(0))
  tokens, mask = padded_batch(10, "left")
  want = our_logits(decoder.DecoderOnly(config), params, tokens, mask)
  got = our_logits(decoder.DecoderOnly(config.replace(dtype="bfloat16")), params, tokens, mask)
  assert got.dtype == np.float32
  valid = mask.astype(bool)  # bfloat16 keeps 8 bits: ~0.4% per rounding, a few per layer
  tolerances.assert_close(got[valid], want[valid], rtol=0.05, scale_tol=0.05)
