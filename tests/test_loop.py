"""The one training loop (ia3_jax.train.loop.TrainLoop): steps, hooks, the finite check, windows."""

import itertools
import math

import jax
import numpy as np
import optax
import pytest

from ia3_jax import demo, errors
from ia3_jax.model import config, network
from ia3_jax.peft import ia3
from ia3_jax.train import loop
from tests import trainer_utils as tu

TINY = config.get_config("tiny")


@pytest.fixture(scope="module")
def tiny_loop_parts():
  model = network.Transformer(TINY, blocks=ia3.ia3_blocks())
  tr = tu.make_trainer(model, trainable=ia3.IA3_PATTERN, optimizer=optax.sgd(1e-2),
                       enable_dropout=False)
  base = tu.random_base_params(TINY)
  return tr, lambda: tr.init_state(base)  # a fresh state each time (the step donates it)


def _batches(n: int = 8):
  return tu.SyntheticBatches(n)(batch_size=n, start_step=0, shard_id=0, num_shards=1)


def test_hooks_run_every_n_steps_in_order_and_see_the_new_state(tiny_loop_parts):
  tr, fresh = tiny_loop_parts
  train_loop = loop.TrainLoop(tr, num_steps=6, batch_size=8)
  calls = []
  train_loop.add_hook(lambda i: calls.append(("a", i.step, int(jax.device_get(i.state.step)))))
  train_loop.add_hook(lambda i: calls.append(("b", i.step, i.is_last)), every=3)
  infos = list(train_loop.steps(fresh(), _batches()))
  assert [i.step for i in infos] == [1, 2, 3, 4, 5, 6]
  assert calls == [("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("b", 3, False), ("a", 4, 4),
                   ("a", 5, 5), ("a", 6, 6), ("b", 6, True)]
  assert all(isinstance(v, float) for v in infos[0].metrics.values())
  assert set(loop.FINITE_METRICS) <= set(infos[0].metrics)
  # The same updates as calling the jitted step directly.
  direct = fresh()
  for host_batch in itertools.islice(_batches(), 6):
    direct, _ = tr.step(direct, tr.partitioner.shard_batch(tr.model_batch(host_batch), 8))
  for a, b in zip(jax.tree.leaves(direct.trainable), jax.tree.leaves(infos[-1].state.trainable)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resumed_state_runs_only_the_remaining_steps(tiny_loop_parts):
  tr, fresh = tiny_loop_parts
  after_two = loop.TrainLoop(tr, num_steps=2, batch_size=8).run(fresh(), _batches())
  infos = list(loop.TrainLoop(tr, num_steps=4, batch_size=8).steps(after_two, _batches()))
  assert [i.step for i in infos] == [3, 4]


def test_data_running_out_is_a_data_error_naming_the_source(tiny_loop_parts):
  tr, fresh = tiny_loop_parts
  train_loop = loop.TrainLoop(tr, num_steps=5, batch_size=8, data_name="my_task")
  two = [next(iter(_batches())) for _ in range(2)]
  with pytest.raises(errors.DataError, match=r"my_task: train data ran out after 2 batches "
                                             r"\(step 2\)"):
    train_loop.run(fresh(), two)


def test_check_finite_names_the_step_and_the_values():
  hook = loop.check_finite(lambda: "last good checkpoint: /x/2")
  ok = loop.StepInfo(2, 5, None, {"loss": 1.0, "grad_norm": 2.0, "param_norm": 3.0})
  hook(ok)
  bad = loop.StepInfo(3, 5, None, {"loss": 1.0, "grad_norm": math.nan, "param_norm": 3.0})
  with pytest.raises(errors.TrainingDivergedError) as err:
    hook(bad)
  assert str(err.value) == ("non-finite grad_norm at step 3 of 5 (loss 1.0, grad norm nan, "
                            "param norm 3.0); last good checkpoint: /x/2")


def test_metrics_window_averages_each_window_and_the_last_partial_one():
  emitted = []
  window = loop.MetricsWindow(2, lambda step, s: emitted.append((step, s)))
  for step, value in enumerate([1.0, 3.0, 5.0, 7.0, 9.0], start=1):
    window(loop.StepInfo(step, 5, None, {"loss": value}))
  assert [(s, m["loss"]) for s, m in emitted] == [(2, 2.0), (4, 6.0), (5, 9.0)]
  assert all(m["steps_per_sec"] > 0 for _, m in emitted)


def test_add_hook_rejects_a_bad_period(tiny_loop_parts):
  with pytest.raises(ValueError, match="every must be a positive int"):
    loop.TrainLoop(tiny_loop_parts[0], num_steps=1, batch_size=8).add_hook(print, every=0)


def test_nan_grad_norm_stops_the_demo_naming_the_step(monkeypatch):
  """The demo fits through the same loop: a non-finite grad norm (loss still finite) stops it."""
  config_, params, vocabulary = demo.load_model()
  demo.register_tasks(vocabulary, families=("edible",), seeds=(0,), num_shots=4, eval_size=8)
  runner = demo.FewShotRunner(config_, params, method="ia3", train_steps=4, batch_size=4)
  step = runner.trainer.step

  def step_with_nan_grad_at_3(state, batch):
    state, metrics = step(state, batch)
    if int(jax.device_get(state.step)) == 3:
      metrics = dict(metrics, grad_norm=np.float32(np.nan))
    return state, metrics
  monkeypatch.setattr(runner.trainer, "step", step_with_nan_grad_at_3)
  seen = []
  with pytest.raises(errors.TrainingDivergedError,
                     match=r"non-finite grad_norm at step 3 of 4 .*; edible seed 0"):
    runner.fit("edible", 0, progress=lambda s, loss: seen.append(s), log_period=1)
  assert seen == [1, 2]
