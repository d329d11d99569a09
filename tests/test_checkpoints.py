"""HF checkpoint import/export, orbax and vocabulary loading, checked against PyTorch."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import T5ForConditionalGeneration

from ia3_jax.interop import hf_checkpoints
from ia3_jax.interop.hf_checkpoints import CheckpointError
from ia3_jax.model import network
from ia3_jax.model.config import get_config
from tests import hf_utils
from tests import tolerances


def _our_logits(config, params, batch):
  model = network.Transformer(config)
  return np.asarray(model.apply({"params": params}, batch["encoder_input_tokens"],
                                batch["decoder_input_tokens"], batch["decoder_target_tokens"]))


def _assert_close_on_targets(ours, theirs, batch):
  valid = batch["decoder_target_tokens"] > 0
  tolerances.assert_close_to_torch(ours[valid], theirs[valid])


@pytest.mark.parametrize("variant,shape,fmt", [
    ("t5_1_0", "small", "safetensors"),
    ("t5_1_1", "small", "safetensors"),
    ("t5_1_1", "small", "bin"),
    ("t5_1_0", "odd", "bin"),
    ("t5_1_1", "odd", "safetensors"),
])
def test_logits_match_pytorch(tmp_path, variant, shape, fmt):
  torch_model = hf_utils.make_hf_model(tmp_path, variant, shape, fmt=fmt)
  config, params = hf_checkpoints.load_hf_checkpoint(tmp_path)
  assert config.logits_via_embedding == (variant == "t5_1_0")
  assert ("logits_dense" in params["decoder"]) == (variant == "t5_1_1")
  rng = np.random.default_rng(0)
  # 40 > max_distance 20 exercises the logarithmic relative-position buckets.
  batch = hf_utils.random_batch(rng, config.vocab_size, batch=3, enc_len=40, dec_len=30)
  _assert_close_on_targets(_our_logits(config, params, batch),
                           hf_utils.torch_logits(torch_model, batch), batch)


def test_untied_head_is_read_from_file(tmp_path):
  hf_utils.make_hf_model(tmp_path, "t5_1_1")
  _, params = hf_checkpoints.load_hf_checkpoint(tmp_path)
  state = load_file(str(tmp_path / "model.safetensors"))
  np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"],
                                state["lm_head.weight"].numpy().T)
  assert not np.array_equal(params["decoder"]["logits_dense"]["kernel"],
                            params["token_embedder"]["embedding"].T)


@pytest.mark.parametrize("variant", ["t5_1_0", "t5_1_1"])
def test_export_round_trip(tmp_path, variant):
  config = get_config("tiny", mlp_activations=("relu",) if variant == "t5_1_0" else ("gelu", "linear"),
                      logits_via_embedding=variant == "t5_1_0")
  params = network.init_params(network.Transformer(config), jax.random.key(3))
  out = hf_checkpoints.export_hf_checkpoint(params, config, tmp_path / "hf")
  torch_model = T5ForConditionalGeneration.from_pretrained(out).eval()
  batch = hf_utils.random_batch(np.random.default_rng(1), config.vocab_size)
  _assert_close_on_targets(_our_logits(config, params, batch),
                           hf_utils.torch_logits(torch_model, batch), batch)
  config2, params2 = hf_checkpoints.load_hf_checkpoint(out)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_sharded_export_and_load(tmp_path):
  config = get_config("tiny")
  params = network.init_params(network.Transformer(config), jax.random.key(0))
  hf_checkpoints.export_hf_checkpoint(params, config, tmp_path, max_shard_bytes=20_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 3
  _, loaded = hf_checkpoints.load_hf_checkpoint(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
  torch_model = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  batch = hf_utils.random_batch(np.random.default_rng(2), config.vocab_size)
  _assert_close_on_targets(_our_logits(config, params, batch),
                           hf_utils.torch_logits(torch_model, batch), batch)


def test_dtype_cast_and_bf16_files(tmp_path):
  hf_utils.make_hf_model(tmp_path, "t5_1_1")
  state = load_file(str(tmp_path / "model.safetensors"))
  save_file({k: v.bfloat16() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
  _, params = hf_checkpoints.load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
  leaves = jax.tree.leaves(params)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  np.testing.assert_array_equal(
      params["token_embedder"]["embedding"].astype(np.float32),
      state["shared.weight"].bfloat16().float().numpy())


def test_load_does_not_hold_two_copies(tmp_path):
  """Peak traced allocation stays well below twice the model size."""
  import tracemalloc
  hf_utils.make_hf_model(tmp_path, "t5_1_1", d_model=256, d_ff=512, vocab_size=2048, d_kv=32,
                         num_heads=8)
  size = (tmp_path / "model.safetensors").stat().st_size
  tracemalloc.start()
  hf_checkpoints.load_hf_checkpoint(tmp_path)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < 1.5 * size, (peak, size)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_host_tensor_reads_blocks_of_the_file_as_numpy_slices_them(tmp_path, dtype):
  """`HostTensor` (what the safetensors reader yields): slices, the transposed view and the
  blockwise `astype` equal NumPy on the tensor read whole; bfloat16 files read as float32."""
  import ml_dtypes
  from safetensors.numpy import save_file as save_numpy
  w = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
  if dtype == "bfloat16":
    w = w.astype(ml_dtypes.bfloat16)
  save_numpy({"w": w, "b": w[0]}, str(tmp_path / "t.safetensors"))
  tensors = dict(hf_checkpoints.iter_safetensors(tmp_path / "t.safetensors"))
  t, ref = tensors["w"], w.astype(np.float32)
  assert isinstance(t, hf_checkpoints.HostTensor) and t.shape == (7, 5) and t.dtype == np.float32
  for index in [(slice(2, 4),), (Ellipsis, slice(1, 3)), (slice(None), slice(3, 99)), ()]:
    np.testing.assert_array_equal(t[index], ref[index])
    np.testing.assert_array_equal(t.T[index], ref.T[index])
  t.block_elements = 6  # blocks of one row (of the file) at a time
  for view, want in ((t, ref), (t.T, ref.T)):
    got = view.astype(ml_dtypes.bfloat16)
    assert got.dtype == ml_dtypes.bfloat16 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(np.asarray(view), want)
  np.testing.assert_array_equal(np.asarray(tensors["b"]), ref[0])
  with pytest.raises(TypeError, match="only slices"):
    t[0]


# ---------------------------------------------------------------- errors


def test_error_no_config(tmp_path):
  with pytest.raises(CheckpointError, match="no config.json"):
    hf_checkpoints.load_hf_checkpoint(tmp_path)


def test_error_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "bart", "architectures": ["BartForConditionalGeneration"]}))
  with pytest.raises(CheckpointError, match=r"model_type 'bart'.*BartForConditionalGeneration"):
    hf_checkpoints.load_hf_checkpoint(tmp_path)


def test_error_missing_and_misshapen_tensor(tmp_path):
  hf_utils.make_hf_model(tmp_path, "t5_1_1")
  state = load_file(str(tmp_path / "model.safetensors"))
  name = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
  broken = dict(state)
  broken[name] = torch.zeros(3, 3)
  save_file(broken, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"decoder\.block\.1\.layer\.2\.DenseReluDense\.wo"):
    hf_checkpoints.load_hf_checkpoint(tmp_path)
  del broken[name]
  save_file(broken, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"missing tensors: .*decoder\.block\.1\.layer\.2"):
    hf_checkpoints.load_hf_checkpoint(tmp_path)


class _NotATensor:
  pass


def test_error_pickle_with_objects(tmp_path):
  hf_utils.make_hf_model(tmp_path, "t5_1_1")
  (tmp_path / "model.safetensors").unlink()
  torch.save({"shared.weight": _NotATensor()}, tmp_path / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="weights_only=True"):
    hf_checkpoints.load_hf_checkpoint(tmp_path)


def test_error_no_weights(tmp_path):
  hf_utils.make_hf_model(tmp_path, "t5_1_1")
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="no weights found"):
    hf_checkpoints.load_hf_checkpoint(tmp_path)


def test_check_params_match_names_param():
  config = get_config("tiny")
  params = network.init_params(network.Transformer(config), jax.random.key(0))
  with pytest.raises(CheckpointError, match=r"param decoder/layers_0/mlp/wi_0/kernel has shape \(32, 64\), model expects \(32, 32\)"):
    hf_checkpoints.check_params_match(params, config.replace(mlp_dim=32))


# ---------------------------------------------------------------- orbax, vocabulary


def test_orbax_round_trip(tmp_path):
  params = network.init_params(network.Transformer(get_config("tiny")), jax.random.key(0))
  hf_checkpoints.save_params(tmp_path / "ckpt", params)
  restored = hf_checkpoints.restore_params(tmp_path / "ckpt", target=params)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  restored = hf_checkpoints.restore_params(tmp_path / "ckpt")
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def _seqio_spm() -> pathlib.Path:
  import seqio
  return pathlib.Path(seqio.__file__).parent / "test_data/sentencepiece/sentencepiece.model"


def test_load_vocabulary(tmp_path):
  import sentencepiece as spm
  shutil.copy(_seqio_spm(), tmp_path / "spiece.model")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 10}))
  vocab = hf_checkpoints.load_vocabulary(tmp_path)
  reference = spm.SentencePieceProcessor(model_file=str(_seqio_spm()))
  text = "the cat sat"
  assert list(vocab.encode(text)) == reference.encode(text)
  assert vocab.vocab_size == reference.get_piece_size() + 10
  assert vocab.decode(vocab.encode(text)) == text
  with pytest.raises(CheckpointError, match="nothing_here: no such SentencePiece model file"):
    hf_checkpoints.load_vocabulary(tmp_path / "nothing_here")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match=r"empty: no SentencePiece model \(spiece.model"):
    hf_checkpoints.load_vocabulary(tmp_path / "empty")
