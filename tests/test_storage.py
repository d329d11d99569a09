"""Frozen-weight storage (ia3_jax.model.storage): Qwix's quantisation against a NumPy
transcription, and the (IA)^3 model over a bfloat16 / int8 / int4 base against the float
model with the same (dequantised) weights: forward, T-Few training, rank classification,
mixed-task banks, HF loading (against PyTorch)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ia3_jax.errors import ConfigError
from ia3_jax.interop import hf_checkpoints
from ia3_jax.model import config, network, storage
from ia3_jax.model import params as params_lib
from ia3_jax.peft import ia3
from ia3_jax.train import trainer
from tests import hf_utils, tolerances
from tests import trainer_utils as tu

TINY = config.get_config("tiny")


def numpy_absmax(w: np.ndarray, bits: int, tile: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Symmetric absmax quantisation: scale = absmax / (qmax + 1/2) per output column (and per
  `tile` input rows), q = round(w / scale) clipped to the int range. Returns (dequantised,
  the other candidate where w / scale is a rounding tie, tie mask): at a tie the rounding of
  the division in float32 decides, which may differ between NumPy and XLA."""
  qmax = 2 ** (bits - 1) - 1
  rows = tile or w.shape[0]
  blocks = w.astype(np.float64).reshape(w.shape[0] // rows, rows, w.shape[1])
  scale = np.abs(blocks).max(axis=1, keepdims=True) / (qmax + 0.5)
  x = blocks / scale
  q = np.clip(np.round(x), -qmax - 1, qmax)
  tie = np.abs(np.abs(x - np.floor(x)) - 0.5) < 1e-4
  other = np.clip(np.where(np.round(x) == np.floor(x), np.ceil(x), np.floor(x)), -qmax - 1, qmax)
  return ((q * scale).reshape(w.shape), (other * scale).reshape(w.shape), tie.reshape(w.shape))


@pytest.mark.parametrize("dtype,bits,tile", [("int8", 8, None), ("int4", 4, 64)])
def test_quantisation_matches_the_numpy_transcription(dtype, bits, tile):
  w = np.random.default_rng(0).normal(size=(256, 48)).astype(np.float32)
  stored = storage.FrozenStorage(dtype, tile=64).store("encoder/layers_0/mlp/wi/kernel", w)
  assert isinstance(stored, storage.QArray) and stored.qvalue.dtype == jnp.dtype(dtype)
  assert stored.scale.shape == ((256 // tile) if tile else 1, 48)
  got = np.asarray(storage.materialize(stored, jnp.float32), np.float64)
  want, other, tie = numpy_absmax(w, bits, tile)
  close = lambda a, b: np.abs(a - b) <= 1e-6 * np.abs(b) + 1e-7  # noqa: E731
  assert np.all(close(got, want) | (tie & close(got, other)))
  assert tie.mean() < 1 / (tile or 256) + 1e-3  # ties: the block maxima (x = qmax + 1/2)


def test_what_is_quantised_and_what_stays_float():
  s = storage.FrozenStorage("int8")
  emb = s.store("token_embedder/embedding", np.ones((8, 4), np.float32))
  norm = s.store("encoder/encoder_norm/scale", np.ones((4,), np.float32))
  assert emb.dtype == jnp.bfloat16 and norm.dtype == jnp.bfloat16
  assert isinstance(s.store("decoder/logits_dense/kernel", np.ones((4, 8), np.float32)),
                    storage.QArray)
  assert storage.FrozenStorage("bfloat16").store("a/kernel", np.ones((4, 8))).dtype == jnp.bfloat16
  with pytest.raises(ConfigError, match="FROZEN_DTYPE='int3' is not one of"):
    storage.FrozenStorage("int3")


def _trainer(frozen_dtype: str, **kw) -> trainer.Trainer:
  model = network.Transformer(TINY, blocks=ia3.ia3_blocks(**kw))
  return tu.make_trainer(model, trainable=ia3.IA3_PATTERN, optimizer=optax.sgd(0.5),
                         enable_dropout=False, use_task_id=bool(kw),
                         frozen_storage=storage.FrozenStorage(frozen_dtype, tile=16))


def _dequantised(params):
  """The float tree with the same weights as a stored one (the reference model's params)."""
  return jax.tree.map(lambda x: np.asarray(storage.materialize(x, jnp.float32)), params,
                      is_leaf=lambda x: isinstance(x, storage.QArray))


def _batch(n: int = 8):
  return next(tu.SyntheticBatches(n)(batch_size=n))


@pytest.mark.parametrize("frozen_dtype", ["bfloat16", "int8", "int4"])
def test_training_over_a_stored_base_equals_the_float_model_with_its_weights(frozen_dtype):
  base = tu.random_base_params(TINY)
  tr = _trainer(frozen_dtype)
  state = tr.init_state(base)
  kernels = [v for k, v in params_lib.flatten(state.frozen).items() if k.endswith("kernel")]
  assert kernels and all(isinstance(k, storage.QArray) == (frozen_dtype != "bfloat16")
                         for k in kernels)
  # Of float32: 1/2; 1/4 + scales + bf16 embeddings; 1/8 + a float32 scale per 16 rows + ...
  assert tr.layout.num_params()["frozen_bytes"] < {"bfloat16": 0.51, "int8": 0.3, "int4": 0.22}[
      frozen_dtype] * tu.make_trainer(tr.model, trainable=ia3.IA3_PATTERN,
                                      optimizer=optax.sgd(0.5)).layout.num_params()["frozen_bytes"]
  reference = _trainer("float32")
  ref_state = reference.init_state(_dequantised(state.params))
  batch = tr.model_batch(_batch())
  for _ in range(3):
    state, m = tr.step(state, tr.partitioner.shard_batch(batch, 8))
    ref_state, ref_m = reference.step(ref_state, reference.partitioner.shard_batch(batch, 8))
    assert m["loss"] == pytest.approx(float(ref_m["loss"]), rel=1e-5)
  for k, v in params_lib.flatten(jax.device_get(state.trainable)).items():
    tolerances.assert_close(v, params_lib.flatten(jax.device_get(ref_state.trainable))[k])
  assert float(m["loss"]) < float(tr.step(tr.init_state(base), tr.partitioner.shard_batch(
      batch, 8))[1]["loss"])  # it trains
  # Rank classification over the stored base: the float model's predictions and scores.
  ours = tr.classifier(8)(state.params, batch)
  theirs = reference.classifier(8)(ref_state.params, batch)
  np.testing.assert_array_equal(ours["predictions"], theirs["predictions"])
  tolerances.assert_close(ours["scores"], theirs["scores"])


def test_mixed_task_bank_over_an_int8_base_equals_each_task_alone():
  tr = _trainer("int8", num_tasks=2)
  state = tr.init_state(tu.random_base_params(TINY))
  rows = jax.tree.map(lambda x: x * jnp.linspace(0.5, 1.5, x.size).reshape(x.shape),
                      state.trainable)  # two distinct rows per bank
  params = params_lib.combine(rows, state.frozen)
  batch = tr.model_batch(_batch())
  batch["task_id"] = np.array([0, 1, 0, 1, 1, 0, 0, 1], np.int32)
  mixed = tr.classifier(8)(params, batch)["scores"]
  for t in (0, 1):
    alone = tr.classifier(8)(params, dict(batch, task_id=np.full(8, t, np.int32)))["scores"]
    rows_t = batch["task_id"] == t
    tolerances.assert_close(mixed[rows_t], alone[rows_t])


def test_hf_checkpoint_loads_quantised_as_read_and_matches_pytorch_with_those_weights(tmp_path):
  import torch
  torch_model = hf_utils.make_hf_model(tmp_path, "t5_1_1", "small")
  tr = tu.make_trainer(network.Transformer(hf_checkpoints.load_hf_config(tmp_path)),
                       trainable="encoder/encoder_norm/scale",
                       optimizer=optax.sgd(0.1),
                       frozen_storage=storage.FrozenStorage("int8"))
  _, params = hf_checkpoints.load_hf_checkpoint(tmp_path, convert=tr.layout.store_base_tensor)
  flat = params_lib.flatten(params)
  assert isinstance(flat["encoder/layers_0/attention/query/kernel"], storage.QArray)
  assert flat["token_embedder/embedding"].dtype == jnp.bfloat16
  assert flat["encoder/encoder_norm/scale"].dtype == np.float32  # trainable: float32
  # PyTorch with the same (dequantised) weights is the reference.
  _, float_params = hf_checkpoints.load_hf_checkpoint(tmp_path)
  names = hf_checkpoints.hf_name_map(tr.model.config)
  state = torch_model.state_dict()
  with torch.no_grad():
    for ours, (hf, transposed) in names.items():
      value = np.asarray(storage.materialize(flat["/".join(ours)], jnp.float32))
      state[hf].copy_(torch.from_numpy(np.array(value.T if transposed else value)))
  torch_model.load_state_dict(state)
  batch = hf_utils.random_batch(np.random.default_rng(0), tr.model.config.vocab_size)
  logits = np.asarray(tr.model.apply({"params": tr.layout.place_params(params)},
                                     batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                     batch["decoder_target_tokens"]))
  valid = batch["decoder_target_tokens"] > 0
  tolerances.assert_close_to_torch(logits[valid], hf_utils.torch_logits(torch_model, batch)[valid])
  # And the quantisation moved the logits (the comparison above is not the float one).
  float_logits = np.asarray(network.Transformer(tr.model.config).apply(
      {"params": float_params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"]))
  assert np.max(np.abs(float_logits - logits)[valid]) > 1e-4


def test_train_run_over_an_int8_base_resumes_exactly(tmp_path):
  """`loop.train(frozen_dtype="int8")`: the frozen base is re-stored from the initial params on
  resume, so an interrupted run ends where an uninterrupted one does."""
  whole = tu.run_tiny(str(tmp_path / "whole"), steps=4, dropout=0.0, frozen_dtype="int8")
  assert whole["params"]["frozen_bytes"] < 0.3 * 4 * whole["params"]["total"]
  tu.run_tiny(str(tmp_path / "parts"), steps=2, dropout=0.0, frozen_dtype="int8",
              checkpoint_period=2)
  resumed = tu.run_tiny(str(tmp_path / "parts"), steps=4, dropout=0.0, frozen_dtype="int8")
  assert resumed["start_step"] == 2 and resumed["train_losses"] == whole["train_losses"]
  for a, b in zip(jax.tree.leaves(jax.device_get(whole["state"].trainable)),
                  jax.tree.leaves(jax.device_get(resumed["state"].trainable))):
    np.testing.assert_array_equal(a, b)


def test_merge_into_an_int8_base_requantises_and_reports_the_error_it_adds():
  tr = _trainer("int8")
  state = tr.init_state(tu.random_base_params(TINY))
  vectors = jax.tree.map(lambda x: x * jnp.linspace(0.6, 1.4, x.size).reshape(x.shape),
                         state.trainable)
  params = params_lib.combine(jax.device_get(vectors), jax.device_get(state.frozen))
  merged, originals = ia3.merge(params)
  errors = originals["requantization_error"]
  assert errors and set(errors) == set(params_lib.flatten(originals["kernels"]))
  flat_merged, flat_params = params_lib.flatten(merged), params_lib.flatten(params)
  for kpath, reported in errors.items():
    new = flat_merged[kpath]
    assert isinstance(new, storage.QArray) and new.qvalue.dtype == jnp.int8
    block = kpath.rsplit("/", 2)[0]
    site = next(p for p in flat_params if p.startswith(block + "/ia3_") and
                ia3.SITE_TARGETS[ia3.SITE_OF_PARAM[p.rsplit("/", 1)[1]]][0] in kpath)
    vec = np.asarray(flat_params[site])[0]
    side = ia3.SITE_TARGETS[ia3.SITE_OF_PARAM[site.rsplit("/", 1)[1]]][1]
    exact = np.asarray(storage.materialize(flat_params[kpath], jnp.float32)) * (
        vec[None, :] if side == "out" else vec[:, None])
    diff = np.abs(np.asarray(storage.materialize(new, jnp.float32)) - exact)
    assert reported == pytest.approx(float(diff.max()), rel=1e-6)
    # Half a quantisation step per column, plus float32 rounding of the fold.
    assert np.all(diff <= 0.5 * np.asarray(new.scale) + 1e-6 * np.abs(exact))
  restored = ia3.unmerge(merged, originals)
  for k, v in params_lib.flatten(params).items():
    got = params_lib.flatten(restored)[k]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("frozen_dtype", ["float32", "int8"])
def test_scanned_training_equals_unrolled_training(frozen_dtype):
  """Blocks(scan_layers=True, remat="full") trains exactly as the unrolled network from the
  same (unrolled) base, over a float32 or an int8 base (each layer quantised alike)."""
  base = tu.random_base_params(TINY)
  runs = {}
  for scan in (False, True):
    blocks = ia3.ia3_blocks(base=network.Blocks(scan_layers=scan, remat="full"))
    tr = tu.make_trainer(network.Transformer(TINY, blocks=blocks), trainable=ia3.IA3_PATTERN,
                         optimizer=optax.adam(1e-2), enable_dropout=False,
                         frozen_storage=storage.FrozenStorage(frozen_dtype))
    state = tr.init_state(base)
    losses = []
    for _ in range(3):
      state, m = tr.step(state, tr.partitioner.shard_batch(tr.model_batch(_batch()), 8))
      losses.append(float(m["loss"]))
    runs[scan] = (losses, network.unscan_params(jax.device_get(state.trainable)), tr, state)
  assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
  flat = params_lib.flatten(runs[False][1])
  assert set(params_lib.flatten(runs[True][1])) == set(flat)
  for k, v in params_lib.flatten(runs[True][1]).items():
    tolerances.assert_close(v, flat[k])
  tr, state = runs[True][2], runs[True][3]
  kernel = params_lib.flatten(state.frozen)["encoder/layers/attention/query/kernel"]
  if frozen_dtype == "int8":
    assert isinstance(kernel, storage.QArray) and kernel.qvalue.shape[0] == TINY.num_encoder_layers
  # The scanned run's (IA)^3 vectors merge and export as the unrolled tree's do.
  merged, _ = ia3.merge(jax.device_get(state.params))
  assert "layers_1" in merged["encoder"] and "layers" not in merged["encoder"]


@pytest.mark.parametrize("dtype,bits", [("int8", 8), ("int4", 4)])
def test_quantised_dense_equals_numpy_dequantise_then_matmul(dtype, bits):
  from ia3_jax.model import layers
  rng = np.random.default_rng(1)
  w = rng.normal(size=(256, 24)).astype(np.float32)
  x = rng.normal(size=(3, 5, 256)).astype(np.float32)
  stored = storage.FrozenStorage(dtype, tile=64).store("a/kernel", w)
  got = layers.Dense(24, ("embed", "mlp")).apply({"params": {"kernel": stored}}, x)
  kernel, _, tie = numpy_absmax(w, bits, 64 if dtype == "int4" else None)
  # At a rounding tie either level is right (checked above): take the one Qwix chose.
  kernel = np.where(tie, np.asarray(storage.materialize(stored, jnp.float32)), kernel)
  want = x.astype(np.float64) @ kernel
  # float32 products summed over 256 terms: a few ulps of the largest output.
  tolerances.assert_close(got, want, rtol=1e-5, scale_tol=1e-5)


def test_bfloat16_base_logits_track_the_float32_model():
  """bf16 storage rounds each weight by at most 2^-9 relative; through 2+2 layers the logits
  move by a few 1e-3 of their scale: 2e-2 of the largest logit bounds it with room."""
  base = tu.random_base_params(TINY)
  f32, bf16 = _trainer("float32"), _trainer("bfloat16")
  batch = f32.model_batch(_batch())
  a = f32.classifier(8)(f32.init_state(base).params, batch)["scores"]
  b = bf16.classifier(8)(bf16.init_state(base).params, batch)["scores"]
  tolerances.assert_close(b, a, rtol=0, scale_tol=2e-2)
  assert np.max(np.abs(a - b)) > 0  # it is the rounded model


def test_scanned_forward_and_vector_gradients_equal_unrolled_in_float32():
  base = tu.random_base_params(TINY)
  out = {}
  for scan in (False, True):
    model = network.Transformer(TINY, blocks=ia3.ia3_blocks(
        base=network.Blocks(scan_layers=scan, remat="full")))
    tr = tu.make_trainer(model, trainable=ia3.IA3_PATTERN, optimizer=optax.sgd(0.1),
                         enable_dropout=False)
    state = tr.init_state(base)
    if not scan:  # distinct vectors, the same in both layouts
      unrolled = jax.tree.map(lambda v: v * jnp.linspace(0.8, 1.2, v.size).reshape(v.shape),
                              jax.device_get(state.trainable))
    ones = tr.layout.in_layout(unrolled)
    batch = {k: jnp.asarray(v) for k, v in tr.model_batch(_batch()).items()}

    def logits(vectors):
      params = params_lib.combine(vectors, state.frozen)
      return model.apply({"params": params}, batch["encoder_input_tokens"],
                         batch["choice_tokens"][:, 0], batch["choice_tokens"][:, 0])
    value, grads = jax.value_and_grad(lambda v: jnp.sum(logits(v) ** 2) * 1e-3)(ones)
    out[scan] = (np.asarray(logits(ones)), float(value),
                 params_lib.flatten(jax.device_get(network.unscan_params(grads))))
  # The scan body and the unrolled layers fuse differently in XLA, so sums differ in order:
  # a few float32 ulps of the largest value per layer (measured: 1.4e-6 of the largest logit).
  tol = dict(rtol=1e-6, scale_tol=4e-6)
  tolerances.assert_close(out[True][0], out[False][0], **tol)
  assert out[True][1] == pytest.approx(out[False][1], rel=1e-6)
  assert set(out[True][2]) == set(out[False][2])
  for k, g in out[False][2].items():
    tolerances.assert_close(out[True][2][k], g, **tol, err_msg=k)


def test_loading_an_hf_checkpoint_into_int8_peaks_below_one_and_a_half_times_its_size(tmp_path):
  """The loader's peak host memory (anonymous, sampled, in a fresh process: the benchmark's
  `--load-one`) on a t5_1_1_base-shaped checkpoint of random weights (0.92 GiB float32)
  stays below 1.5x the int8 base it builds (0.25 GiB): tensors are read and quantised a
  block at a time, so neither the float32 model nor a whole float32 tensor is ever held."""
  import json
  import pathlib
  import subprocess
  import sys
  from benchmarks import memory_real_size
  memory_real_size.make_random_t5(str(tmp_path), "base")
  script = pathlib.Path(memory_real_size.__file__)
  out = subprocess.run([sys.executable, str(script), "--load-one", "int8", str(tmp_path)],
                       capture_output=True, text=True, check=True, cwd=script.parents[1])
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["stored_bytes"] < 0.3 * r["file_bytes"]  # int8 (+ bfloat16 embeddings and norms)
  assert r["anon_peak_above_start"] < 1.5 * r["stored_bytes"], r


@pytest.mark.parametrize("frozen_dtype,dtype", [("float32", "bfloat16"), ("int8", "float32"),
                                                ("bfloat16", "float32")])
def test_a_converted_base_adds_no_frozen_kernel_products_to_the_step(frozen_dtype, dtype):
  """`materialize(after=x)`'s layer dependency carries no gradient: the compiled (IA)^3 step
  has the float32 step's matmuls, not also an X^T dY product per frozen kernel (which a
  `0 * x` dependency with a gradient made the backward pass compute, then multiply by 0)."""
  def dots(frozen: str, act: str) -> int:
    model = network.Transformer(TINY.replace(dtype=act), blocks=ia3.ia3_blocks())
    tr = tu.make_trainer(model, trainable=ia3.IA3_PATTERN, optimizer=optax.sgd(0.5),
                         enable_dropout=False, frozen_storage=storage.FrozenStorage(frozen, tile=16))
    state = tr.init_state(tu.random_base_params(TINY))
    batch = tr.partitioner.shard_batch(tr.model_batch(_batch()), 8)
    return tr.lower_step(state, batch).compile().as_text().count(" dot(")
  reference = dots("float32", "float32")
  assert reference > 0 and dots(frozen_dtype, dtype) == reference
