"""T-Few training of decoder-only models with the shared Trainer / `loop.train`: the loss
falls, only the (IA)^3 vectors train, and a mixed-task batch equals each task alone."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ia3_jax.train.assembly import ModelSpec
from ia3_jax.model import decoder, families
from ia3_jax.model import params as params_lib
from ia3_jax.model.decoder_config import get_decoder_config
from ia3_jax.objectives import losses, scoring
from ia3_jax.peft import ia3
from ia3_jax.train import checkpointer, loop, optimizers
from tests import tolerances
from tests import trainer_utils as tu

choice_log_probs = jax.jit(scoring.choice_log_probs, static_argnums=0)
# The synthetic batches' ids; one layer (cheap to compile).
CONFIG = get_decoder_config("tiny_llama", vocab_size=tu.VOCAB, num_layers=1)


def base_params(seed: int = 0) -> dict:
  """Host params of the base model, drawn without compiling an init."""
  abstract = flax.linen.unbox(decoder.abstract_params(decoder.DecoderOnly(CONFIG)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0])
                                 ).astype(np.float32), abstract)


def test_tfew_ia3_training_lowers_the_loss_and_changes_only_the_vectors(tmp_path):
  base = base_params()
  res = loop.train(
      model_dir=str(tmp_path),
      model=ModelSpec(CONFIG, peft=ia3.IA3Config(), dropout_rate=0.1),  # dropout: ignored
      train_data=tu.SyntheticBatches(8, num_distinct=1),
      eval_data=tu.SyntheticEval(8, num_batches=1),
      train_config=loop.TrainConfig(train_steps=6, batch_size=8, log_period=1,
                                    tensorboard=False, progress=False),
      loss=losses.LossConfig(),
      optimizer=optimizers.OptimizerConfig(learning_rate=0.1, warmup_steps=0),
      checkpoint=checkpointer.CheckpointConfig(period=0), initial_params=base)
  assert res["step"] == 6
  losses_ = [loss for _, loss in res["train_losses"]]
  assert losses_[-1] < losses_[0], losses_
  state = jax.device_get(res["state"])
  trained = params_lib.flatten(state.trainable)
  assert set(trained) == {f"decoder/layers_{i}/{p}" for i in range(CONFIG.num_layers)
                          for p in ("self_attention/ia3_key", "self_attention/ia3_value",
                                    "mlp/ia3_ff")}
  assert all(np.any(v != 1.0) for v in trained.values())
  flat_base = params_lib.flatten(base)
  frozen = params_lib.flatten(state.frozen)
  assert set(frozen) == set(flat_base)
  for path, value in frozen.items():
    np.testing.assert_array_equal(value, flat_base[path], err_msg=path)
  assert 0.0 <= res["eval"][6]["accuracy"] <= 1.0


def test_mixed_task_batch_equals_each_task_alone():
  model = ia3.ia3_model(CONFIG, num_tasks=2)
  tr = tu.make_trainer(model, trainable=ia3.IA3_PATTERN, optimizer=optax.sgd(0.1),
                       use_task_id=True)
  assert tr.layout.family is families.DECODER_ONLY
  state = tr.init_state(base_params())
  rng = np.random.default_rng(0)
  bank = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32),
                      jax.device_get(state.trainable))
  params = params_lib.combine(bank, jax.device_get(state.frozen))
  batch = tu.SyntheticBatches(8).global_batch(0)
  batch["task_id"] = (np.arange(8) % 2).astype(np.int32)
  mixed = tr.model_batch(batch)
  keys = ("encoder_input_tokens", "choice_tokens", "choice_mask", "task_id")
  logp = choice_log_probs(model, params, {k: mixed[k] for k in keys})
  single = ia3.ia3_model(CONFIG)
  want = np.zeros(logp.shape, np.float32)
  for task in (0, 1):
    rows = mixed["task_id"] == task
    one = ia3.insert_ia3(params, ia3.select_task(bank, task))
    want[rows] = choice_log_probs(single, one, {k: mixed[k][rows] for k in keys[:3]})
  real = np.asarray(losses.choice_token_mask(mixed["choice_tokens"], mixed["choice_mask"]))
  tolerances.assert_close(np.asarray(logp)[real], want[real])
  # The train step's loss on the mixed batch is the T-Few loss of those per-task log-probs.
  loss, _ = jax.jit(tr._loss_fn)(bank, jax.device_get(state.frozen), mixed, jax.random.key(0))
  want_loss, _ = tr.loss.choice_loss(jnp.asarray(want), mixed["choice_tokens"],
                                     mixed["choice_mask"], mixed["label"],
                                     mixed["example_mask"])
  tolerances.assert_close(loss, want_loss)


def test_scanned_layers_train_like_the_unrolled_model(tmp_path):
  """`loop.train` with `ModelSpec(scan_layers=True)` on a decoder-only model from an unrolled base: the same
  losses, and the same (IA)^3 vectors once unscanned, as the unrolled run."""
  from ia3_jax.model import network
  config = CONFIG.replace(num_layers=2)
  abstract = flax.linen.unbox(decoder.abstract_params(decoder.DecoderOnly(config)))
  rng = np.random.default_rng(1)
  base = jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0])
                                 ).astype(np.float32), abstract)

  def run(scan: bool) -> dict:
    return loop.train(
        model_dir=str(tmp_path / str(scan)),
        model=ModelSpec(config, peft=ia3.IA3Config(), scan_layers=scan), train_data=tu.SyntheticBatches(8, num_distinct=1),
        train_config=loop.TrainConfig(train_steps=3, batch_size=8, log_period=1,
                                      tensorboard=False, progress=False, eval_at_end=False),
        loss=losses.LossConfig(),
        # SGD: the vectors move linearly with the gradients (Adafactor's normalised updates
        # would amplify float rounding in near-zero gradients)
        optimizer=optimizers.OptimizerConfig(name="sgd", learning_rate=1.0, warmup_steps=0),
        checkpoint=checkpointer.CheckpointConfig(period=0), initial_params=base)
  unrolled, scanned = run(False), run(True)
  assert unrolled["train_losses"][-1][1] < unrolled["train_losses"][0][1]
  tolerances.assert_close(np.array([l for _, l in scanned["train_losses"]]),
                          np.array([l for _, l in unrolled["train_losses"]]))
  got = jax.device_get(scanned["state"].trainable)
  assert "layers" in got["decoder"]
  jax.tree.map(tolerances.assert_close, network.unscan_params(got),
               jax.device_get(unrolled["state"].trainable))
