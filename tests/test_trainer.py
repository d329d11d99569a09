"""Trainer: the T-Few recipe on the tiny preset, frozen params, optimizer state, schedule,
Adafactor against a NumPy transcription of HF's, accumulation, divergence, shape errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ia3_jax.train.assembly import ModelSpec
from ia3_jax import errors
from ia3_jax.data import batches
from ia3_jax.interop import hf_checkpoints
from ia3_jax.model import config, network
from ia3_jax.model import params as params_lib
from ia3_jax.objectives import losses, scoring
from ia3_jax.peft import ia3
from ia3_jax.train import loop, optimizers, train_state
from tests import trainer_utils as tu

TINY = config.get_config("tiny")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """Shared persistent compilation cache (see trainer_utils.compilation_cache_dir)."""
  path = tu.compilation_cache_dir(tmp_path_factory)
  tu.enable_compilation_cache(path)
  return path


def _loss_on(model, params, batches):
  """Mean T-Few loss (no dropout) over host batches: the 'training loss' of a few-shot set."""
  @jax.jit
  def one(p, b):
    logp = scoring.choice_log_probs(model, p, {k: b[k] for k in (
        "encoder_input_tokens", "choice_tokens", "choice_mask")})
    return losses.LossConfig().choice_loss(logp, b["choice_tokens"], b["choice_mask"],
                                           b["label"], b["example_mask"])[0]
  return float(np.mean([one(params, b) for b in batches]))


def test_tfew_recipe_on_tiny(tmp_path):
  """40 steps of the T-Few recipe (lr 3e-3, warmup 6%, linear decay to 0, Adafactor, clip 1.0,
  L_LM + L_UL + L_LN, dropout 0.1) with (IA)^3 on a 16-example training set: the training loss
  goes down, every frozen param stays bit-for-bit the same, and only the trainable params
  have optimizer state. (One test: the run is the expensive part.)"""
  res = tu.run_tiny(str(tmp_path), steps=40, num_distinct=2, checkpoint_period=20,
                    schedule_steps=40)
  state = res["state"]
  assert res["step"] == 40 and len(res["train_losses"]) == 40

  # The training loss (no dropout) over the 16 training examples, before and after.
  model = network.Transformer(TINY, ia3.ia3_blocks())
  base = tu.random_base_params(TINY)
  batches = [tu.SyntheticBatches(8, num_distinct=2).global_batch(i) for i in range(2)]
  before = _loss_on(model, params_lib.combine(ia3.init_ia3(TINY), base), batches)
  after = _loss_on(model, state.params, batches)
  assert after < before - 0.05, (before, after)

  # Frozen: every base param, bit for bit; trainable: the (IA)^3 vectors, which moved.
  frozen = params_lib.flatten(jax.device_get(state.frozen))
  assert set(frozen) == set(params_lib.flatten(base))
  for name, value in params_lib.flatten(base).items():
    np.testing.assert_array_equal(frozen[name], value, err_msg=name)
  trainable = params_lib.flatten(jax.device_get(state.trainable))
  assert len(trainable) == 16 and all(n.rsplit("/", 1)[-1].startswith("ia3_") for n in trainable)
  assert params_lib.count(state.trainable) == 640  # 2 encoder layers x 96 + 2 decoder layers x 224
  assert all(not np.array_equal(v, np.ones_like(v)) for v in trainable.values())

  # Optimizer state: keyed by trainable param paths only; one second moment per vector
  # entry, 1-element row/column placeholders per vector and counters; nothing for the
  # 57,792 frozen params.
  assert train_state.opt_state_param_paths(state.opt_state) == set(trainable)
  opt_scalars = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert opt_scalars <= 640 + 2 * len(trainable) + 8


def test_tfew_schedule_matches_hf_linear_warmup():
  sched = optimizers.OptimizerConfig(total_steps=1000).learning_rate_fn()

  def hf(step, warmup=1000 * 0.06, total=1000, peak=3e-3):  # transformers' formula
    if step < warmup:
      return peak * step / max(1, warmup)
    return peak * max(0.0, (total - step) / max(1, total - warmup))
  for s in (0, 1, 30, 59, 60, 61, 500, 999, 1000, 1200):
    assert float(sched(s)) == pytest.approx(hf(s), rel=1e-6, abs=1e-12), s


def _hf_adafactor_reference(p, grads, lrs, eps=(1e-30, 1e-3), clip=1.0, decay=-0.8):
  """NumPy transcription of HF Adafactor (scale_parameter, no relative step, no beta1)
  for a 1-D param, preceded by clipping the gradient's global norm to 1.0."""
  p = p.astype(np.float64).copy()
  v = np.zeros_like(p)
  rms = lambda x: np.linalg.norm(x) / math.sqrt(x.size)
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    g = g.astype(np.float64)
    norm = np.linalg.norm(g)
    g = g * min(1.0, 1.0 / norm)
    lr_t = lr * max(eps[1], rms(p))
    beta2t = 1.0 - t ** decay
    v = beta2t * v + (1 - beta2t) * (g * g + eps[0])
    u = g / np.sqrt(v)
    u = u / max(1.0, rms(u) / clip)
    p = p - lr_t * u
  return p


def test_adafactor_matches_hf_transcription():
  rng = np.random.RandomState(0)
  p0 = (1 + 0.1 * rng.randn(24)).astype(np.float32)
  grads = [rng.randn(24).astype(np.float32) * s for s in (3.0, 0.2, 5.0, 0.01)]
  cfg = optimizers.OptimizerConfig(total_steps=10, warmup_steps=2)
  opt = cfg.build()
  params = {"ia3_key": jnp.asarray(p0)}
  state = opt.init(params)
  for g in grads:
    updates, state = opt.update({"ia3_key": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  lrs = [float(cfg.learning_rate_fn()(i)) for i in range(len(grads))]
  want = _hf_adafactor_reference(p0, grads, lrs)
  np.testing.assert_allclose(np.asarray(params["ia3_key"]), want, rtol=2e-5, atol=1e-7)
  assert not np.allclose(want, p0)


def test_full_finetune_trains_every_param(tmp_path):
  def post_load(params, cfg):  # runs once on the fresh params (the prompt-tuning hook)
    assert cfg == TINY
    params["decoder"]["decoder_norm"]["scale"] = params["decoder"]["decoder_norm"]["scale"] * 2
    return params
  res = tu.run_tiny(str(tmp_path), steps=2, trainable="all", dropout=0.0, post_load=post_load,
                    optimizer=optimizers.OptimizerConfig(learning_rate=3e-4, warmup_steps=0))
  state = res["state"]
  np.testing.assert_allclose(state.trainable["decoder"]["decoder_norm"]["scale"], 2.0, atol=0.01)
  assert params_lib.flatten(state.frozen) == {}
  base = params_lib.flatten(tu.random_base_params(TINY))
  final = params_lib.flatten(jax.device_get(state.trainable))
  assert set(final) == set(base)
  unchanged = [n for n in base if np.array_equal(final[n], base[n])]
  assert not unchanged, unchanged
  assert train_state.opt_state_param_paths(state.opt_state) == set(base)


def test_grad_accumulation_equals_full_batch(tmp_path):
  """Accumulating two identical microbatches gives the full batch's update."""
  model = network.Transformer(TINY, ia3.ia3_blocks())
  base = tu.random_base_params(TINY)
  half = tu.SyntheticBatches(4).global_batch(0)
  half["example_mask"][:] = 1
  # microbatch i holds rows i, i + a, ...: interleaving copies makes both microbatches `half`
  doubled = {k: np.repeat(v, 2, axis=0) for k, v in half.items()}
  results = []
  for accum in (1, 2):
    opt = optimizers.OptimizerConfig(total_steps=4, warmup_steps=0).build()
    tr = tu.make_trainer(model, trainable=ia3.IA3_PATTERN, grad_accum_steps=accum, optimizer=opt)
    state = tr.init_state(base)
    batch = tr.partitioner.shard_batch(tr.model_batch(doubled), 8)
    state, metrics = tr.step(state, batch)
    results.append((jax.device_get(state.trainable), float(metrics["loss"])))
  (p1, l1), (p2, l2) = results
  assert l1 == pytest.approx(l2, rel=1e-6)
  for name, v in params_lib.flatten(p1).items():
    np.testing.assert_allclose(params_lib.flatten(p2)[name], v, rtol=1e-6, atol=1e-7, err_msg=name)


def test_nan_stops_with_step_and_last_good_checkpoint(tmp_path):
  # The third update multiplies by a NaN learning rate: params turn NaN at step 3.
  sgd = optax.sgd(lambda count: jnp.where(count >= 2, jnp.nan, 1e-3))
  with pytest.raises(errors.TrainingDivergedError) as err:
    tu.run_tiny(str(tmp_path), steps=6, dropout=0.0, optimizer=sgd, checkpoint_period=1)
  msg = str(err.value)
  good = tmp_path / "checkpoints" / "2"
  assert "at step 3 of 6" in msg and str(good) in msg and "param_norm" in msg
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  from ia3_jax.train import checkpointer
  saved, meta = checkpointer.restore_trainable(good)
  assert meta["step"] == 2 and meta["data_position"] == 2
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(saved))


def test_initial_params_of_another_shape_name_the_param(tmp_path):
  wide = TINY.replace(mlp_dim=96)
  with pytest.raises(hf_checkpoints.CheckpointError,
                     match=r"initial_params: param decoder/layers_0/mlp/wi_0/kernel has shape "
                           r"\(32, 96\); the model expects \(32, 64\)"):
    loop.train(model_dir=str(tmp_path), model=ModelSpec(TINY, peft=ia3.IA3Config()),
                  train_data=tu.SyntheticBatches(8),
                  train_config=loop.TrainConfig(train_steps=1, tensorboard=False,
                                                   progress=False),
                  initial_params=tu.random_base_params(wide))


def test_initial_checkpoint_lacking_a_frozen_param(tmp_path):
  base = tu.random_base_params(TINY)
  del base["decoder"]["decoder_norm"]
  tr = tu.make_trainer(network.Transformer(TINY, ia3.ia3_blocks()), trainable=ia3.IA3_PATTERN,
                       optimizer=optax.sgd(0.1))
  with pytest.raises(hf_checkpoints.CheckpointError, match="missing param decoder/decoder_norm/scale"):
    tr.init_state(base, source="base.ckpt")


def test_hf_checkpoint_of_another_model_names_the_param(tmp_path):
  from tests import hf_utils
  hf_dir = tmp_path / "hf"
  hf_utils.make_hf_model(hf_dir, "t5_1_1", "odd")  # d_model 24, 3 decoder layers, vocab 96
  with pytest.raises(hf_checkpoints.CheckpointError,
                     match=r"/hf: param decoder/decoder_norm/scale has shape \(24,\), model "
                           r"expects \(32,\)"):
    loop.train(model_dir=str(tmp_path / "run"),
                  model=ModelSpec(TINY, initial_checkpoint_path=str(hf_dir)),
                  train_data=tu.SyntheticBatches(8),
                  train_config=loop.TrainConfig(train_steps=1, tensorboard=False,
                                                   progress=False))


def test_trainable_pattern_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match="matches no param"):
    tu.make_trainer(network.Transformer(TINY), trainable="nope_.*", optimizer=optax.sgd(0.1))


def test_t0_3b_ia3_checkpoint_is_about_2mb():
  tr = tu.make_trainer(network.Transformer(config.get_config("t0_3b"), ia3.ia3_blocks()),
                       trainable=ia3.IA3_PATTERN,
                       optimizer=optimizers.OptimizerConfig(total_steps=1000).build())
  counts = tr.layout.num_params()
  assert counts["trainable"] == 540_672 and counts["trainable_bytes"] == 540_672 * 4
  # Adafactor state for vectors: one second moment each (not factored), placeholders, counts.
  opt = sum(math.prod(x.shape) for x in jax.tree.leaves(tr.abstract_opt_state))
  assert opt <= 540_672 + 2 * len(tr.layout.trainable_paths) + 8


def test_lowered_step_and_classifier_give_xla_cost_and_memory():
  """`lower_step` / `ShardedClassifier.lower`: the programs `step` and eval run, compiled
  without running them or consuming the (donatable) state."""
  model = network.Transformer(TINY, ia3.ia3_blocks())
  tr = tu.make_trainer(model, trainable=ia3.IA3_PATTERN, enable_dropout=False,
                       optimizer=optimizers.OptimizerConfig(total_steps=10).build())
  state = tr.init_state(tu.random_base_params(TINY))
  host = tu.SyntheticBatches(4).global_batch(0)
  batch = tr.partitioner.shard_batch(tr.model_batch(host), 4)
  compiled = tr.lower_step(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] > 0
  mem = compiled.memory_analysis()
  param_bytes = 4 * tr.layout.num_params()["total"]
  assert mem.argument_size_in_bytes >= param_bytes  # trainable + frozen + optimizer + batch
  assert 0 < mem.alias_size_in_bytes <= mem.output_size_in_bytes  # donated trainable/opt state
  assert "dot" in tr.trace_step(state, batch).jaxpr.pretty_print()

  new_state, metrics = tr.step(state, batch)  # the state was not donated by lowering
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))

  inputs = {k: host[k] for k in ("encoder_input_tokens", "choice_tokens", "choice_mask")}
  classifier = tr.classifier(4)
  rc = classifier.lower(new_state.params, inputs).compile()
  assert rc.memory_analysis().argument_size_in_bytes >= param_bytes
  out = rc(new_state.params, tr.partitioner.shard_batch(inputs, 4))
  np.testing.assert_array_equal(np.asarray(out["predictions"]),
                                classifier(new_state.params, inputs)["predictions"])


def test_truncation_is_reported_for_training_and_eval(tmp_path, monkeypatch, caplog):
  """Inputs cut to fit TASK_FEATURE_LENGTHS are counted per feature in results.json and
  reported in the log, for the training stream and for eval (examples/toy, inputs=6)."""
  import json
  import logging
  monkeypatch.syspath_prepend(str(tu.REPO / "examples" / "toy"))
  lengths = {"inputs": 6, "targets": 4, "num_choices": 2}  # every toy input is longer
  source = lambda name: batches.SeqioBatches(name, lengths, task_modules=["toy_tasks"])
  caplog.set_level(logging.INFO, logger="ia3_jax.train.writers")
  loop.train(model_dir=str(tmp_path), model=ModelSpec(TINY, peft=ia3.IA3Config()),
                train_data=source("toy_fewshot_seed0"),
                eval_data=source("toy_eval"),
                train_config=loop.TrainConfig(train_steps=2, batch_size=4, seed=0,
                                                 tensorboard=False, progress=False),
                initial_params=tu.random_base_params(TINY))
  saved = json.loads((tmp_path / "results.json").read_text())["truncation"]
  assert saved["train"]["examples"] == saved["train"]["inputs_truncated"] == 8  # 2 steps x 4
  assert saved["eval"]["examples"] == saved["eval"]["inputs_truncated"] == 48
  assert saved["train"]["choices_truncated"] == saved["eval"]["choices_truncated"] == 0
  assert saved["train"]["inputs_length"] == 6
  logged = caplog.text
  assert "truncated: toy_fewshot_seed0 (train, so far)" in logged
  assert "truncated: toy_eval (eval): 48 examples; inputs cut to 6 tokens in 48" in logged
  assert "truncated (train, 8 examples seen): inputs cut to 6 tokens in 8 examples" in logged
