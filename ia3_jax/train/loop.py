"""The one training loop: a `Trainer`'s steps over a batch stream, with hooks; and `train`.

`TrainLoop.steps` is a generator of `StepInfo` (levanter's `training_steps`):
each step shards the host batch, runs the jitted update, fetches its scalars
and calls the hooks added with `add_hook(fn, every=N)`. What a run does
around the steps is a hook: the finite check (`check_finite`), metric windows
(`MetricsWindow`), progress, periodic eval, checkpoints and stopping on a
signal. `train` (the `ia3-jax train` run, gin `runs/finetune.gin`) builds
that loop with checkpoints, exact resume, TensorBoard and a results JSON;
`demo.FewShotRunner.fit` and the benchmarks build it with fewer hooks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import optax

from ia3_jax import files
from ia3_jax.data.features import BatchSource
from ia3_jax.errors import (CheckpointError, ConfigError, DataError, TrainingDivergedError,
                            TrainingInterrupted)
from ia3_jax.model import precision
from ia3_jax.objectives import losses
from ia3_jax.train import assembly, run_lock
from ia3_jax.train.assembly import ModelSpec
from ia3_jax.train.checkpointer import CheckpointConfig, Checkpointer
from ia3_jax.train.checks import (check_eval_result, check_source_task_ids, check_vocabulary,
                                  source_name, warn_train_batch)
from ia3_jax.train.optimizers import OptimizerConfig
from ia3_jax.train.partitioning import PartitionConfig, Partitioner
from ia3_jax.train.preemption import StopOnSignal
from ia3_jax.train.train_state import TrainState
from ia3_jax.train.trainer import Trainer
from ia3_jax.train.writers import (MetricWriter, average_metrics, eval_result_json, eval_summary,
                                   printer)

log = logging.getLogger(__name__)

Params = dict[str, Any]
Batch = Mapping[str, np.ndarray]
FINITE_METRICS = ("loss", "grad_norm", "param_norm")


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What a hook sees after a step: the step count, the new state, this step's scalars."""

  step: int
  num_steps: int
  state: TrainState
  metrics: Mapping[str, float]
  batch: Optional[Batch] = None

  @property
  def is_last(self) -> bool:
    return self.step == self.num_steps


Hook = Callable[[StepInfo], None]


class TrainLoop:
  """Runs `trainer`'s steps up to `num_steps`, calling each hook every N steps.

  Hooks run in the order they were added, after the update and before the
  next batch is read; one that raises ends the loop (the state it saw is the
  newest). `batch_size` is the global batch (the host batches are this
  host's rows of it).
  """

  def __init__(self, trainer: Trainer, *, num_steps: int, batch_size: int,
               data_name: str = "train data"):
    self.trainer = trainer
    self.num_steps = num_steps
    self.batch_size = batch_size
    self.data_name = data_name
    self._hooks: list[tuple[int, Hook]] = []

  def add_hook(self, hook: Hook, *, every: int = 1) -> Hook:
    """Calls `hook(info)` after every `every`-th step; returns it."""
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"add_hook: every must be a positive int, got {every!r}")
    self._hooks.append((every, hook))
    return hook

  def step(self, state: TrainState, batch: Mapping[str, jax.Array],
           host_batch: Optional[Batch] = None) -> StepInfo:
    """One update on a sharded batch, then the hooks."""
    state, metrics = self.trainer.step(state, batch)
    metrics, step = jax.device_get((metrics, state.step))  # one transfer per step
    scalars = {k: float(v) for k, v in metrics.items()}
    info = StepInfo(int(step), self.num_steps, state, scalars, host_batch)
    for every, hook in self._hooks:
      if info.step % every == 0:
        hook(info)
    return info

  def steps(self, state: TrainState, batches: Iterable[Batch]) -> Iterator[StepInfo]:
    """Steps from `state.step` to `num_steps` over this host's `batches`."""
    it = iter(batches)
    step = int(jax.device_get(state.step))
    start = step
    while step < self.num_steps:
      try:
        host_batch = next(it)
      except StopIteration:
        raise DataError(f"{self.data_name}: train data ran out after {step - start} batches "
                        f"(step {step}); training streams must repeat") from None
      batch = self.trainer.partitioner.shard_batch(self.trainer.model_batch(host_batch),
                                                   self.batch_size)
      info = self.step(state, batch, host_batch)
      state, step = info.state, info.step
      yield info

  def run(self, state: TrainState, batches: Iterable[Batch]) -> TrainState:
    """All steps; the final state."""
    for info in self.steps(state, batches):
      state = info.state
    return state


def check_finite(context: Callable[[], str] | str = "",
                 keys: Sequence[str] = FINITE_METRICS) -> Hook:
  """A hook raising TrainingDivergedError at the first non-finite loss, grad or param norm.

  The message names the step and the values; `context` (text, or a function
  giving it at that moment, e.g. the last good checkpoint) is appended.
  """
  def hook(info: StepInfo) -> None:
    bad = [k for k in keys if k in info.metrics and not math.isfinite(info.metrics[k])]
    if not bad:
      return
    values = ", ".join(f"{k.replace('_', ' ')} {info.metrics[k]}" for k in keys
                       if k in info.metrics)
    extra = context() if callable(context) else context
    raise TrainingDivergedError(f"non-finite {', '.join(bad)} at step {info.step} of "
                                f"{info.num_steps} ({values})" + (f"; {extra}" if extra else ""))
  return hook


class MetricsWindow:
  """A hook averaging the scalars of every step over windows of `period` steps.

  At the end of each window (and at the last step) it calls `emit(step,
  scalars)` with the means and `steps_per_sec` over the window.
  """

  def __init__(self, period: int, emit: Callable[[int, dict[str, float]], None]):
    self.period = period
    self.emit = emit
    self._window: list[Mapping[str, float]] = []
    self._t0 = time.time()

  def __call__(self, info: StepInfo) -> None:
    self._window.append(info.metrics)
    if info.step % self.period == 0 or info.is_last:
      scalars = average_metrics(self._window)
      scalars["steps_per_sec"] = len(self._window) / max(time.time() - self._t0, 1e-9)
      self.emit(info.step, scalars)
      self._window, self._t0 = [], time.time()


# The gin macro (runs/finetune.gin) of each TrainConfig field that errors name.
TRAIN_MACROS = {"train_steps": "TRAIN_STEPS", "batch_size": "BATCH_SIZE",
                "grad_accum_steps": "GRAD_ACCUM_STEPS", "log_period": "TrainConfig.log_period"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop settings (T5X macro in brackets).

  train_steps [TRAIN_STEPS], batch_size [BATCH_SIZE] (global, over all hosts),
  grad_accum_steps: microbatches per step; eval_period: rank-classification
  eval every N steps (0: only at the end); log_period: metrics every N steps;
  seed [RANDOM_SEED]: init of new params, dropout and data order.
  """

  train_steps: int = 1000
  batch_size: int = 8
  grad_accum_steps: int = 1
  eval_period: int = 0
  eval_at_end: bool = True
  eval_batch_size: Optional[int] = None
  log_period: int = 10
  seed: int = 42
  enable_dropout: bool = True
  length_normalize_eval: bool = True
  progress: bool = True
  tensorboard: bool = True

  def __post_init__(self):
    for name in ("train_steps", "batch_size", "grad_accum_steps", "log_period"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{TRAIN_MACROS[name]}={value!r}: must be a positive int "
                          f"(TrainConfig.{name})")
    if not isinstance(self.eval_period, int) or self.eval_period < 0:
      raise ConfigError(f"EVAL_PERIOD={self.eval_period!r}: must be an int >= 0 "
                        "(0: evaluate at the end only)")
    if self.batch_size % self.grad_accum_steps:
      raise ConfigError(f"BATCH_SIZE={self.batch_size} must be divisible by "
                        f"GRAD_ACCUM_STEPS={self.grad_accum_steps}")


# --------------------------------------------------------------------------- the train run


def build_optimizer(optimizer: OptimizerConfig | optax.GradientTransformation,
                    train_steps: int) -> tuple[optax.GradientTransformation, Optional[Callable]]:
  """The optax transformation and its schedule (for logging), the schedule over `train_steps`."""
  if not isinstance(optimizer, OptimizerConfig):
    return optimizer, None
  if optimizer.total_steps is None:
    optimizer = dataclasses.replace(optimizer, total_steps=train_steps)
  return optimizer.build(), optimizer.learning_rate_fn()


def train(*, model_dir: str, model: ModelSpec, train_data: BatchSource,
          train_config: TrainConfig = TrainConfig(),
          loss: losses.LossConfig = losses.LossConfig(),
          optimizer: OptimizerConfig | optax.GradientTransformation = OptimizerConfig(),
          partitioning: PartitionConfig = PartitionConfig(),
          checkpoint: CheckpointConfig = CheckpointConfig(),
          eval_data: Optional[BatchSource] = None,
          results_file: Optional[str] = "results.json",
          initial_params: Optional[Params] = None,
          post_load: Optional[Callable[[Params, Any], Params]] = None) -> dict[str, Any]:
  """Trains (or resumes training in) `model_dir`; returns the results dict.

  Resumes from the newest checkpoint in `<model_dir>/checkpoints` if there is
  one (same trainable params, optimizer state, step and data position), else
  starts from `model.initial_checkpoint_path` (HF directory or orbax params; params
  it lacks must be trainable and are initialised with the seed), or from
  `initial_params` (a host param tree), or from a random init. `model` [MODEL] is the
  `assembly.ModelSpec` (PEFT method, frozen storage, layer scanning, dropout, ...).
  `post_load(params, config) -> params` runs once on a fresh start (e.g. to copy
  params into new ones).

  Raises:
    TrainingDivergedError: a NaN/inf loss, grad or param norm (the diverged update is not saved).
    TrainingInterrupted: SIGINT/SIGTERM; a checkpoint of the last finished step was saved.
    CheckpointError: a checkpoint that does not fit the model (names the param).
  """
  model_dir = os.path.abspath(model_dir)
  created_model_dir = not os.path.exists(model_dir)
  os.makedirs(model_dir, exist_ok=True)
  with run_lock.hold(model_dir, enabled=jax.process_index() == 0) as lock:  # one per MODEL_DIR
    try:
      return _train(model_dir, model, train_data, train_config, loss, optimizer, partitioning,
                    checkpoint, eval_data, results_file, initial_params, post_load)
    except BaseException as e:
      if not isinstance(e, TrainingInterrupted):  # what a failed run made and left empty
        if lock is not None:
          lock.release()
        _remove_empty_dirs(model_dir, created_model_dir)
      raise


def _train(model_dir: str, model: ModelSpec, train_data: BatchSource, tc: TrainConfig,
           loss: losses.LossConfig, optimizer: OptimizerConfig | optax.GradientTransformation,
           partitioning: PartitionConfig, checkpoint: CheckpointConfig,
           eval_data: Optional[BatchSource], results_file: Optional[str],
           initial_params: Optional[Params], post_load: Optional[Callable]) -> dict[str, Any]:
  """`train` in `model_dir`, which this process holds the run lock of."""
  transform, lr_fn = build_optimizer(optimizer, tc.train_steps)
  is_chief = jax.process_index() == 0
  t_start = time.time()
  initial_checkpoint_path = model.initial_checkpoint_path
  if initial_params is not None and initial_checkpoint_path:
    raise ConfigError("pass INITIAL_CHECKPOINT_PATH or initial_params, not both")
  partitioner = Partitioner(partitioning)
  lay = assembly.layout(model, partitioner, seed=tc.seed)
  trainer = Trainer(lay, optimizer=transform, loss=loss,
                    grad_accum_steps=tc.grad_accum_steps, enable_dropout=tc.enable_dropout,
                    learning_rate_fn=lr_fn)
  base = (initial_params if initial_params is not None
          else assembly.load_base_params(lay, initial_checkpoint_path))
  if partitioner.replicated_dims:
    log.info("replicated (not divisible): %s", "; ".join(partitioner.replicated_dims))
  if tc.batch_size % (tc.grad_accum_steps * partitioner.data_size):
    raise ConfigError(f"BATCH_SIZE={tc.batch_size} must be divisible by GRAD_ACCUM_STEPS "
                      f"({tc.grad_accum_steps}) x data-parallel devices "
                      f"({partitioner.data_size}, --data_parallel)")
  counts = lay.num_params()
  run_meta = {"seed": tc.seed, "batch_size": tc.batch_size, "train_steps": tc.train_steps,
              "grad_accum_steps": tc.grad_accum_steps,
              "model_config": lay.model.config.to_dict(),
              "trainable_params": lay.trainable_paths, "num_trainable": counts["trainable"],
              "initial_checkpoint_path": initial_checkpoint_path}

  show = printer(is_chief and tc.progress)
  results_path = os.path.join(model_dir, results_file) if results_file else None
  for source in (train_data, eval_data):
    check_vocabulary(source, lay.model.config)
    if model.use_task_id:
      check_source_task_ids(source, model.check_task_ids)
    if hasattr(source, "validate"):  # a bad example fails now, before anything is written
      source.validate()  # (an evaluation example: not after all of training)
  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"), checkpoint)
  latest = ckpt.latest_step()
  if latest is not None and latest >= tc.train_steps:
    finished = _read_results(results_path, latest)
    if finished is not None:  # a finished run: say so, rewrite nothing
      state, _, _ = _resume(trainer, ckpt, latest, base, run_meta, lambda _: None)
      ckpt.close()
      if is_chief:  # printed even without progress output: the whole answer of this run
        print(f"{model_dir}: already trained to step {latest} (TRAIN_STEPS={tc.train_steps}); "
              f"nothing to do, results in {results_path}", flush=True)
      return {**finished, "state": state}
  show(f"ia3-jax train: {partitioner.describe()}; {counts['trainable']:,} trainable of "
       f"{counts['total']:,} params ({counts['trainable_bytes'] / 1e6:.3g} MB); "
       f"{precision.describe_dtype(lay.model.config.dtype)}")

  history: dict[str, Any] = {"train_losses": [], "eval": {}, "truncation": {}}
  if latest is not None:
    state, data_position, meta = _resume(trainer, ckpt, latest, base, run_meta, show)
    history.update(meta.get("history", {}))
  else:
    source = "initial_params" if initial_params is not None else str(initial_checkpoint_path)
    state, data_position = trainer.init_state(base, source=source), 0
    if post_load is not None:
      state = trainer.state_from_params(post_load(state.params, lay.model.config))
  start = int(jax.device_get(state.step))
  run = _TrainRun(trainer=trainer, tc=tc, ckpt=ckpt, checkpoint=checkpoint, model_dir=model_dir,
                  run_meta=run_meta, show=show, eval_data=eval_data, state=state, start=start,
                  start_position=data_position, last_saved=latest, history=history)

  shard_id, num_shards = partitioner.data_shard_info()
  batches = train_data(batch_size=partitioner.local_batch_size(tc.batch_size),
                       start_step=data_position, shard_id=shard_id,
                       num_shards=num_shards) if start < tc.train_steps else iter(())
  run.train_stats = getattr(batches, "stats", None)
  loop = run.loop(source_name(train_data), is_chief)
  try:
    with run.stop:
      for info in loop.steps(state, batches):
        run.state = info.state
    run.finish()
  finally:
    run.close()

  truncation = run.truncation
  truncation["train"] = _add_truncation(run.prior_train_truncation, run.train_stats)
  if truncation.get("train") and _any_truncated(truncation["train"]):
    show(f"truncated (train, {truncation['train']['examples']} examples seen): "
         + _truncation_counts(truncation["train"]))
  results = {
      "step": run.step, "start_step": start, "model_dir": model_dir,
      "checkpoint": ckpt.path(run.last_saved), "params": counts, "train_losses": run.losses,
      "first_loss": run.losses[0][1] if run.losses else None,
      "last_loss": run.losses[-1][1] if run.losses else None,
      "eval": dict(sorted(run.eval_results.items())),
      "truncation": truncation,
      "mesh": {"data": partitioner.data_size, "model": partitioner.model_size,
               "processes": jax.process_count()},
      "wall_time_s": time.time() - t_start,
  }
  if results_path and is_chief:
    files.write_json(results_path, results)
    show(f"results: {results_path}")
  results["state"] = run.state
  return results


class _TrainRun:
  """The state of one `train` call that its hooks share: history, last checkpoint, writers."""

  def __init__(self, *, trainer: Trainer, tc: TrainConfig, ckpt: Checkpointer,
               checkpoint: CheckpointConfig, model_dir: str, run_meta: Mapping[str, Any],
               show: Callable[[str], None], eval_data: Optional[BatchSource], state: TrainState,
               start: int, start_position: int, last_saved: Optional[int],
               history: Mapping[str, Any]):
    self.trainer, self.tc, self.ckpt, self.checkpoint = trainer, tc, ckpt, checkpoint
    self.model_dir, self.run_meta, self.show, self.eval_data = model_dir, run_meta, show, eval_data
    self.state, self.start, self.start_position, self.last_saved = state, start, start_position, last_saved
    self.losses = [(int(s), float(l)) for s, l in history["train_losses"] if s <= start]
    self.eval_results = {int(s): r for s, r in history["eval"].items() if int(s) <= start}
    self.truncation: dict[str, Optional[dict]] = dict(history["truncation"])
    self.prior_train_truncation = self.truncation.get("train")
    self.train_stats: Any = None
    self.stop = StopOnSignal()
    self.writer = MetricWriter(os.path.join(model_dir, "train"), tc.tensorboard, show)
    self.eval_writer = MetricWriter(os.path.join(model_dir, "eval"), tc.tensorboard, show)
    self.template_names = _template_names(eval_data)
    self._bar = None

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))

  def loop(self, train_name: str, is_chief: bool) -> TrainLoop:
    """The train loop with this run's hooks, in order: finite check, history, warnings,
    progress and metric windows, eval, checkpoint, stop on a signal."""
    tc = self.tc
    loop = TrainLoop(self.trainer, num_steps=tc.train_steps, batch_size=tc.batch_size,
                     data_name=train_name)
    loop.add_hook(check_finite(self._diverged_context))
    loop.add_hook(self._track)
    loop.add_hook(lambda i: self.losses.append((i.step, i.metrics["loss"])))
    reported = {"truncated": False, "identical": False}
    loop.add_hook(lambda i: warn_train_batch(i.batch, self.train_stats, train_name, reported,
                                             self.show))
    from tqdm.auto import tqdm
    self._bar = tqdm(total=tc.train_steps, initial=self.start, desc="train", dynamic_ncols=True,
                     disable=not (is_chief and tc.progress))
    loop.add_hook(lambda i: self._bar.update(1))
    loop.add_hook(MetricsWindow(tc.log_period, self._log))
    if tc.eval_period:  # before the checkpoint: its meta then holds this eval
      loop.add_hook(lambda i: None if i.is_last else self.evaluate(i.step), every=tc.eval_period)
    if self.checkpoint.period:
      loop.add_hook(lambda i: None if i.is_last else self.save(i.step),
                    every=self.checkpoint.period)
    loop.add_hook(self._stop_if_signalled)
    return loop

  def _track(self, info: StepInfo) -> None:
    self.state = info.state

  def _diverged_context(self) -> str:
    self.ckpt.wait()
    good = self.ckpt.path(self.last_saved) if self.last_saved is not None else "none (no checkpoint yet)"
    return f"the diverged state was not saved. Last good checkpoint: {good}"

  def _log(self, step: int, scalars: dict[str, float]) -> None:
    self._bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                          steps_per_s=f"{scalars['steps_per_sec']:.2f}")
    self.writer.write(step, scalars, prefix="train/")

  def _stop_if_signalled(self, info: StepInfo) -> None:
    if not self.stop.should_stop(info.step) or info.is_last:
      return
    self.save(info.step)
    self.ckpt.wait()
    self.show(f"{self.stop.signal_name}: saved {self.ckpt.path(info.step)}")
    raise TrainingInterrupted(step=info.step, model_dir=self.model_dir,
                              signal_name=self.stop.signal_name)

  def evaluate(self, step: int) -> None:
    """Rank-classification eval of the current params, written and kept for the results."""
    if self.eval_data is None:
      return
    p = self.trainer.partitioner
    shard_id, num_shards = p.data_shard_info()
    eval_bs = self.tc.eval_batch_size or self.tc.batch_size
    batches = self.eval_data(batch_size=p.local_batch_size(eval_bs), start_step=0,
                             shard_id=shard_id, num_shards=num_shards)
    result = self.trainer.evaluate(self.state.params, batches, eval_bs,
                                   length_normalize=self.tc.length_normalize_eval,
                                   total=getattr(batches, "num_batches", None))
    stats = getattr(batches, "stats", None)
    if stats is not None:
      if stats.any_truncated and self.truncation.get("eval") is None:
        self.show(f"truncated: {stats.report(source_name(self.eval_data) + ' (eval)')}")
      self.truncation["eval"] = stats.as_dict()
    check_eval_result(result, source_name(self.eval_data))
    self.eval_writer.write(step, eval_summary(result, self.template_names), prefix="eval/")
    self.eval_results[step] = eval_result_json(result, self.template_names)

  def save(self, step: int) -> None:
    """A checkpoint of the current state, its meta holding the data position and history."""
    if self.last_saved == step:
      return
    self.truncation["train"] = _add_truncation(self.prior_train_truncation, self.train_stats)
    history = {"train_losses": self.losses, "eval": self.eval_results,
               "truncation": self.truncation}
    position = self.start_position + step - self.start
    self.ckpt.save(step, self.state, files.jsonable(
        {**self.run_meta, "data_position": position, "history": history}))
    self.last_saved = step

  def finish(self) -> None:
    """After the last step: its checkpoint, then the final eval."""
    step = self.step
    self.save(step)
    if self.tc.eval_at_end and self.eval_data is not None and step not in self.eval_results:
      self.evaluate(step)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    self.ckpt.close()
    self.writer.close()
    self.eval_writer.close()


def _read_results(path: Optional[str], step: int) -> Optional[dict]:
  """The results file of a run finished at `step`, or None (none, unreadable, another step)."""
  if not path or not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None
  return results if results.get("step") == step else None


def _remove_empty_dirs(model_dir: str, created: bool) -> None:
  """After a failed run: the empty directories it made (TensorBoard, checkpoints, MODEL_DIR)."""
  for sub in ("train", "eval", "checkpoints", ""):
    path = os.path.join(model_dir, sub) if sub else model_dir
    if sub == "" and not created:
      continue
    try:
      os.rmdir(path)  # only succeeds when empty
    except OSError:
      pass


def _template_names(source: Any) -> Optional[Sequence[str]]:
  names = getattr(source, "template_names", None)
  return names() if callable(names) else None


def _add_truncation(prior: Optional[Mapping[str, int]], stats: Any) -> Optional[dict]:
  """Truncation counts of earlier segments (from the checkpoint) plus this segment's."""
  if stats is None:
    return dict(prior) if prior else None
  total = dataclasses.replace(stats)
  if prior:
    total.add(prior)
  return total.as_dict()


def _any_truncated(counts: Mapping[str, int]) -> bool:
  return bool(counts.get("inputs_truncated") or counts.get("choices_truncated")
              or counts.get("choices_dropped"))


def _truncation_counts(c: Mapping[str, int]) -> str:
  return (f"inputs cut to {c['inputs_length']} tokens in {c['inputs_truncated']} examples; "
          f"{c['choices_truncated']} choices cut to {c['targets_length']} tokens in "
          f"{c['examples_with_choices_truncated']} examples; {c['choices_dropped']} choices "
          f"dropped beyond {c['num_choices']} in {c['examples_with_choices_dropped']} examples")


def _resume(trainer: Trainer, ckpt: Checkpointer, step: int, base: Optional[Params],
            run_meta: Mapping[str, Any], show: Callable[[str], None]
            ) -> tuple[TrainState, int, dict]:
  """State, data position and meta of checkpoint `step`; checks it is the same run."""
  meta = ckpt.read_meta(step)
  for key in ("seed", "batch_size", "grad_accum_steps"):
    if key in meta and meta[key] != run_meta[key]:
      raise CheckpointError(f"{ckpt.path(step)}: saved with {key}={meta[key]}, this run has "
                            f"{key}={run_meta[key]}; resuming would not continue the same run "
                            "(use a new MODEL_DIR)")
  if meta.get("initial_checkpoint_path") != run_meta["initial_checkpoint_path"]:
    raise CheckpointError(f"{ckpt.path(step)}: started from initial checkpoint "
                          f"{meta.get('initial_checkpoint_path')!r}, this run names "
                          f"{run_meta['initial_checkpoint_path']!r}")
  abstract = trainer.abstract_state()
  trainable, opt_state, frozen, meta = ckpt.restore(step, abstract)
  if frozen is None:  # frozen params come from the initial checkpoint (or the seed)
    frozen = trainer.layout.init_frozen(base)
  state = TrainState(step=trainer.partitioner.place(np.asarray(step, np.int32),
                                                    trainer.partitioner.replicated),
                     trainable=trainable, opt_state=opt_state, frozen=frozen)
  show(f"resumed from {ckpt.path(step)} (step {step}, data position {meta['data_position']})")
  return state, int(meta["data_position"]), meta
