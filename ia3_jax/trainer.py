"""Training with the T-Few recipe: grads w.r.t. the trainable params only, sharded, resumable.

`Trainer` holds the jit-compiled pieces for one model (initialisation, the
train step, rank-classification eval); `train` is the loop around them
(checkpoints, resume, logging, periodic eval, results JSON). Both are plain
Python; `ia3_jax.gin_configurables` exposes them to gin.

The train step differentiates `loss(combine(trainable, frozen))` with respect
to `trainable` alone, so no gradient buffers exist for frozen weights, and
optimizer state exists only for the trainable params. With gradient
accumulation over `a` microbatches, microbatch i holds rows i, i + a, i + 2a,
... of the global batch (so every data-parallel device gets its share of each
microbatch); the gradient is the mean of the microbatch gradients, and the
logged loss the mean of the microbatch losses (each microbatch pools its own
tokens, as T-Few's `grad_accum_factor` does). Dropout keys are folded from
(seed, step, microbatch), so a resumed run draws the same masks.
"""

from __future__ import annotations

from ia3_jax.errors import TrainingDivergedError  # re-exported: ia3_jax.errors is its home
from ia3_jax.errors import ConfigError, DataError, TrainingInterrupted

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ia3_jax import checkpoints, files, losses, network, scoring
from ia3_jax import metrics as metrics_lib
from ia3_jax import params as params_lib
from ia3_jax.checkpointing import CheckpointConfig, Checkpointer
from ia3_jax.checkpoints import CheckpointError
from ia3_jax.config import T5Config
from ia3_jax.optimizers import OptimizerConfig
from ia3_jax.partitioning import PartitionConfig, Partitioner
from ia3_jax.preemption import StopOnSignal
from ia3_jax.train_state import TrainState, opt_state_shardings

log = logging.getLogger(__name__)

Params = dict[str, Any]
Batch = Mapping[str, np.ndarray]

# Features the jitted step reads; everything else (ids, lengths) stays on the host.
TRAIN_FEATURES = ("encoder_input_tokens", "choice_tokens", "choice_mask", "label", "example_mask")
ALL_PARAMS = ".*"




# --------------------------------------------------------------------------- data


class BatchSource(Protocol):
  """Yields this host's numpy batches (`batch_size` rows each, its shard of the data).

  `start_step` batches are skipped: a deterministic stream resumes exactly.
  """

  def __call__(self, *, batch_size: int, start_step: int, shard_id: int,
               num_shards: int) -> Iterator[Batch]:
    ...


@dataclasses.dataclass(frozen=True)
class SeqioBatches:
  """A `BatchSource` over a seqio task or mixture registered with `ia3_jax.data`.

  feature_lengths: {"inputs": L, "targets": T, "num_choices": C} (T5X
  TASK_FEATURE_LENGTHS). Training streams (few-shot tasks) are shuffled with
  `seed` and repeat; evaluation streams yield every example once.
  `task_modules` are imported first (T5X MIXTURE_OR_TASK_MODULE);
  `register_builtin` calls `ia3_jax.tasks.register_all()`.
  """

  name: str
  feature_lengths: Mapping[str, int]
  split: Optional[str] = None
  seed: int = 0
  shuffle: Optional[bool] = None
  repeat: Optional[bool] = None
  task_id_map: Optional[Mapping[str, int]] = None
  task_modules: Sequence[str] = ()
  register_builtin: bool = True

  def _setup(self):
    import importlib
    for module in self.task_modules:
      if module:
        importlib.import_module(module)
    if self.register_builtin:
      from ia3_jax import tasks
      tasks.register_all()
    from ia3_jax import data
    return data

  def __call__(self, *, batch_size: int, start_step: int = 0, shard_id: int = 0,
               num_shards: int = 1) -> Iterator[Batch]:
    data = self._setup()
    kwargs = dict(shuffle=self.shuffle, seed=self.seed, shard_id=shard_id, num_shards=num_shards,
                  repeat=self.repeat, task_id_map=self.task_id_map)
    if start_step:
      kwargs["start_step"] = start_step
    return data.get_batches(self.name, self.split, batch_size, dict(self.feature_lengths), **kwargs)

  def vocabulary(self):
    """The vocabulary of the task's output features ("targets"): what decodes its tokens."""
    return self._setup().lookup(self.name).output_features["targets"].vocabulary

  def template_names(self) -> Optional[tuple[str, ...]]:
    """Names of the template ids in the batches (None for tasks not registered by ia3_jax.data)."""
    info = self._setup().get_task_info(self.name)
    return info.template_names if info is not None else None


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop settings (T5X macro in brackets).

  train_steps [TRAIN_STEPS], batch_size [BATCH_SIZE] (global, over all hosts),
  grad_accum_steps: microbatches per step; eval_period: rank-classification
  eval every N steps (0: only at the end); log_period: metrics every N steps;
  seed [RANDOM_SEED]: init of new params and dropout; use_task_id: pass the
  batch's task_id to the model (task banks with several rows).
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
  use_task_id: bool = False
  max_choices_per_step: Optional[int] = None
  length_normalize_eval: bool = True
  progress: bool = True
  tensorboard: bool = True

  def __post_init__(self):
    for name in ("train_steps", "batch_size", "grad_accum_steps", "log_period"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}")
    if self.eval_period < 0:
      raise ValueError(f"TrainConfig.eval_period must be >= 0, got {self.eval_period}")
    if self.batch_size % self.grad_accum_steps:
      raise ValueError(f"BATCH_SIZE={self.batch_size} must be divisible by "
                       f"grad_accum_steps={self.grad_accum_steps}")


# --------------------------------------------------------------------------- trainer


def _dict_leaves_to_paths(tree: Params) -> list[str]:
  return sorted(params_lib.flatten(tree))


class Trainer:
  """The jit-compiled init / train step / eval of one model on one mesh.

  Args:
    model: the network (with PEFT blocks, if any).
    trainable: regex(es) over "/"-joined param paths (`params.trainable_mask`);
      ".*" trains everything (full fine-tuning).
    optimizer: an optax transformation (e.g. `OptimizerConfig.build()`).
    loss: T-Few loss weights.
    partitioner: mesh and rules.
    learning_rate_fn: schedule, only for logging the learning rate.
  """

  def __init__(self, model: network.Transformer, *, trainable: params_lib.Patterns,
               optimizer: optax.GradientTransformation,
               loss: losses.LossConfig = losses.LossConfig(),
               partitioner: Optional[Partitioner] = None, grad_accum_steps: int = 1,
               seed: int = 42, enable_dropout: bool = True, use_task_id: bool = False,
               max_choices_per_step: Optional[int] = None,
               learning_rate_fn: Optional[Callable] = None):
    self.model = model
    self.optimizer = optimizer
    self.loss = loss
    self.partitioner = partitioner or Partitioner()
    self.grad_accum_steps = grad_accum_steps
    self.seed = seed
    self.enable_dropout = enable_dropout and model.config.dropout_rate > 0
    self.use_task_id = use_task_id
    self.max_choices_per_step = max_choices_per_step
    self.learning_rate_fn = learning_rate_fn
    self._classifiers: dict[tuple, ShardedClassifier] = {}

    p = self.partitioner
    self.abstract_boxed = network.abstract_params(model, with_task_id=use_task_id)
    self.abstract = nn.unbox(self.abstract_boxed)
    self.mask = params_lib.trainable_mask(self.abstract, trainable)
    self.abstract_trainable, self.abstract_frozen = params_lib.partition(self.abstract, self.mask)
    if not params_lib.flatten(self.abstract_trainable):
      raise ValueError(f"trainable params {trainable!r} select nothing")
    self.param_shardings = p.shardings(self.abstract_boxed)
    self.trainable_shardings, self.frozen_shardings = params_lib.partition(
        self.param_shardings, self.mask)
    opt_shapes = jax.eval_shape(optimizer.init, self.abstract_trainable)
    self.opt_shardings = opt_state_shardings(opt_shapes, self.trainable_shardings,
                                             self.abstract_trainable, p.replicated)
    self.abstract_opt_state = opt_shapes
    self._batch_sharding = p.batch_sharding()
    self._step_fn = jax.jit(
        self._train_step,
        in_shardings=(self.trainable_shardings, self.opt_shardings, p.replicated,
                      self.frozen_shardings, self._batch_sharding),
        out_shardings=(self.trainable_shardings, self.opt_shardings, p.replicated, p.replicated),
        donate_argnums=(0, 1))

  # ---- sizes
  @property
  def trainable_paths(self) -> list[str]:
    return _dict_leaves_to_paths(self.abstract_trainable)

  def num_params(self) -> dict[str, int]:
    return {"total": params_lib.count(self.abstract),
            "trainable": params_lib.count(self.abstract_trainable),
            "trainable_bytes": params_lib.nbytes(self.abstract_trainable)}

  # ---- init
  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    def sds(tree, shardings):
      return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          tree, shardings)
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.partitioner.replicated),
        trainable=sds(self.abstract_trainable, self.trainable_shardings),
        opt_state=sds(self.abstract_opt_state, self.opt_shardings),
        frozen=sds(self.abstract_frozen, self.frozen_shardings))

  def check_base_params(self, base: Params, source: str) -> list[str]:
    """Checks an initial checkpoint against the model; returns the paths it lacks.

    Every param it has must exist with the same shape, and every param it
    lacks must be trainable (e.g. new (IA)^3 vectors): a frozen param left at
    its random init would be a silent bug.
    """
    flat_abs = params_lib.flatten(self.abstract)
    flat_base = params_lib.flatten(nn.unbox(base))
    for name, value in sorted(flat_base.items()):
      if name not in flat_abs:
        raise CheckpointError(f"{source}: param {name} (shape {tuple(np.shape(value))}) is not "
                              "part of this model (a checkpoint of another model?)")
      if tuple(np.shape(value)) != tuple(flat_abs[name].shape):
        raise CheckpointError(f"{source}: param {name} has shape {tuple(np.shape(value))}; "
                              f"the model expects {tuple(flat_abs[name].shape)} (a checkpoint "
                              "of another model shape?)")
    missing = sorted(set(flat_abs) - set(flat_base))
    trainable = set(self.trainable_paths)
    frozen_missing = [m for m in missing if m not in trainable]
    if frozen_missing:
      raise CheckpointError(f"{source}: missing param {frozen_missing[0]} (shape "
                            f"{tuple(flat_abs[frozen_missing[0]].shape)}), which is frozen and "
                            f"would stay at its random init ({len(frozen_missing)} missing)")
    return missing

  def _init_subset(self, paths: Sequence[str]) -> Params:
    """Random init of only `paths` (XLA drops the rest of the init computation)."""
    if not paths:
      return {}
    shardings = params_lib.flatten(self.param_shardings)
    out_shardings = params_lib.unflatten({k: shardings[k] for k in paths})

    def init(rng):
      flat = params_lib.flatten(network.init_params(self.model, rng,
                                                    with_task_id=self.use_task_id))
      return params_lib.unflatten({k: flat[k] for k in paths})
    with self.partitioner.context():
      return jax.jit(init, out_shardings=out_shardings)(jax.random.key(self.seed))

  def init_state(self, base: Optional[Params] = None, *, source: str = "initial checkpoint"
                 ) -> TrainState:
    """A fresh state: `base` params (host arrays, e.g. an HF checkpoint) where given,
    random init (seed) elsewhere; step 0 and a new optimizer state."""
    if base is None:
      missing, placed = sorted(params_lib.flatten(self.abstract)), {}
    else:
      missing = self.check_base_params(base, source)
      base = nn.unbox(base)
      shardings = params_lib.flatten(self.param_shardings)
      flat = params_lib.flatten(base)
      placed = self.partitioner.place(flat, {k: shardings[k] for k in flat})
    full = params_lib.combine(params_lib.unflatten(placed), self._init_subset(missing))
    return self.state_from_params(full)

  def init_frozen(self, base: Optional[Params] = None, *,
                  source: str = "initial checkpoint") -> Params:
    """The frozen params alone, as `init_state` would make them (for resuming)."""
    frozen_paths = sorted(params_lib.flatten(self.abstract_frozen))
    if not frozen_paths:
      return {}
    if base is None:
      return self._init_subset(frozen_paths)
    self.check_base_params(base, source)
    flat = params_lib.flatten(nn.unbox(base))
    shardings = params_lib.flatten(self.param_shardings)
    return params_lib.unflatten(self.partitioner.place(
        {k: flat[k] for k in frozen_paths}, {k: shardings[k] for k in frozen_paths}))

  def place_params(self, full: Params) -> Params:
    """A full param tree (any placement) resharded onto this trainer's param shardings."""
    with self.partitioner.context():
      return jax.jit(lambda p: p, out_shardings=self.param_shardings)(full)

  def state_from_params(self, full: Params, step: int = 0) -> TrainState:
    trainable, frozen = params_lib.partition(full, self.mask)
    with self.partitioner.context():
      opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(trainable)
    step_arr = self.partitioner.place(np.asarray(step, np.int32), self.partitioner.replicated)
    return TrainState(step=step_arr, trainable=trainable, opt_state=opt_state, frozen=frozen)

  # ---- the step
  def _loss_fn(self, trainable: Params, frozen: Params, batch: Batch, rng: jax.Array):
    params = params_lib.combine(trainable, frozen)
    rngs = {"dropout": rng} if self.enable_dropout else None
    model_batch = {k: batch[k] for k in ("encoder_input_tokens", "choice_tokens", "choice_mask")}
    if self.use_task_id:
      model_batch["task_id"] = batch["task_id"]
    logp = scoring.choice_log_probs(self.model, params, model_batch,
                                    max_choices_per_step=self.max_choices_per_step,
                                    enable_dropout=self.enable_dropout, rngs=rngs)
    return self.loss.choice_loss(logp, batch["choice_tokens"], batch["choice_mask"],
                                 batch["label"], batch["example_mask"])

  def _train_step(self, trainable, opt_state, step, frozen, batch):
    rng = jax.random.fold_in(jax.random.key(self.seed), step)
    grad_fn = jax.value_and_grad(self._loss_fn, has_aux=True)
    a = self.grad_accum_steps
    if a == 1:
      (_, metrics), grads = grad_fn(trainable, frozen, batch, rng)
    else:
      spec = PartitionSpec(None, self._batch_sharding.spec[0])

      def split(x):
        x = x.reshape((x.shape[0] // a, a) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.partitioner.mesh, spec))
      micro = jax.tree.map(split, dict(batch))

      def body(acc, xs):
        mb, i = xs
        (_, m), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, g), m
      zeros = jax.tree.map(jnp.zeros_like, trainable)
      grads, per_micro = jax.lax.scan(body, zeros, (micro, jnp.arange(a)))
      grads = jax.tree.map(lambda g: g / a, grads)
      metrics = {k: (jnp.sum(v) if jnp.issubdtype(v.dtype, jnp.integer) else jnp.mean(v))
                 for k, v in per_micro.items()}
    updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(trainable))
    if self.learning_rate_fn is not None:
      metrics["learning_rate"] = self.learning_rate_fn(step)
    return trainable, opt_state, step + 1, metrics

  def model_batch(self, host_batch: Batch) -> dict[str, np.ndarray]:
    """The features the step reads (example_mask defaults to all ones)."""
    missing = [k for k in TRAIN_FEATURES[:-1] if k not in host_batch]
    if missing:
      raise ValueError(f"train batch lacks features {missing} (has {sorted(host_batch)})")
    out = {k: np.asarray(host_batch[k]) for k in TRAIN_FEATURES[:-1]}
    check_token_ids(out, self.model.config.vocab_size, "train batch")
    out["example_mask"] = np.asarray(host_batch.get(
        "example_mask", np.ones(out["label"].shape, np.int32)))
    if self.use_task_id:
      if "task_id" not in host_batch:
        raise ValueError("use_task_id=True but the batch has no task_id")
      out["task_id"] = np.asarray(host_batch["task_id"])
    return out

  def step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
    """One update on a global batch (from `Partitioner.shard_batch`)."""
    with self.partitioner.context():
      trainable, opt_state, step, metrics = self._step_fn(*self._step_args(state, batch))
    return state.replace(trainable=trainable, opt_state=opt_state, step=step), metrics

  def trace_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> jax.stages.Traced:
    """The jitted train step traced for `state` and `batch` (`.jaxpr`: the program
    as written, e.g. to count its products; `.lower()`: see `lower_step`)."""
    with self.partitioner.context():
      return self._step_fn.trace(*self._step_args(state, batch))

  def lower_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> jax.stages.Lowered:
    """The train step lowered for `state` and `batch` (shapes, dtypes, shardings);
    `.compile()` gives the executable `step` runs, with XLA's `cost_analysis()`
    and `memory_analysis()` (the buffer assignment). Nothing is donated or run."""
    with self.partitioner.context():
      return self.trace_step(state, batch).lower()

  @staticmethod
  def _step_args(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple:
    return state.trainable, state.opt_state, state.step, state.frozen, dict(batch)

  # ---- eval
  def classifier(self, global_batch_size: int,
                 length_normalize: bool = True) -> "ShardedClassifier":
    """The jitted rank classifier for this batch size (built once, reused by every eval)."""
    key = (global_batch_size, length_normalize)
    if key not in self._classifiers:
      self._classifiers[key] = ShardedClassifier(self, global_batch_size, length_normalize)
    return self._classifiers[key]

  def evaluate(self, params: Params, batches: Iterator[Batch], global_batch_size: int, *,
               length_normalize: bool = True, progress: bool = False,
               total: Optional[int] = None) -> dict[str, Any]:
    """Rank-classification accuracy over this host's eval batches, summed over hosts."""
    result = scoring.evaluate(self.model, params, batches,
                              classifier=self.classifier(global_batch_size, length_normalize),
                              progress=progress and jax.process_index() == 0, total=total)
    return _allreduce_eval(result)


class ShardedClassifier:
  """`scoring.rank_classify` on the mesh: takes this host's rows, returns this host's rows."""

  def __init__(self, trainer: Trainer, global_batch_size: int, length_normalize: bool):
    self.trainer = trainer
    self.global_batch_size = global_batch_size
    p = trainer.partitioner
    sh = p.batch_sharding()

    def classify(params, batch):
      return scoring.rank_classify(trainer.model, params, batch, length_normalize=length_normalize,
                                   max_choices_per_step=trainer.max_choices_per_step)
    self._fn = jax.jit(classify, in_shardings=(trainer.param_shardings, sh), out_shardings=sh)

  def __call__(self, params: Params, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    p = self.trainer.partitioner
    with p.context():
      out = self._fn(params, self._global_batch(inputs))
    return {k: host_rows(v) for k, v in out.items()}

  def lower(self, params: Params, inputs: Mapping[str, np.ndarray]) -> jax.stages.Lowered:
    """The classifier lowered for `params` and this host's `inputs`, as `__call__`
    would run it; `.compile()` gives XLA's cost and memory analyses."""
    p = self.trainer.partitioner
    with p.context():
      return self._fn.lower(params, self._global_batch(inputs))

  def _global_batch(self, inputs: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    inputs = dict(inputs)
    check_token_ids(inputs, self.trainer.model.config.vocab_size, "eval batch")
    if not self.trainer.use_task_id:
      inputs.pop("task_id", None)
    return self.trainer.partitioner.shard_batch(inputs, self.global_batch_size)


def host_rows(x: jax.Array) -> np.ndarray:
  """This host's rows of a global array split over its leading dim."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = {}
  for s in x.addressable_shards:
    shards.setdefault(s.index[0].start or 0, np.asarray(s.data))
  return np.concatenate([shards[k] for k in sorted(shards)])


def _allreduce_eval(result: dict[str, Any]) -> dict[str, Any]:
  """Sums eval counts over processes (each host evaluated its own shard)."""
  if jax.process_count() == 1:
    return result
  from jax.experimental import multihost_utils
  keys = ("num_correct", "num_examples", "num_unlabelled", "num_identical_choices")
  totals = multihost_utils.process_allgather(np.array([result.get(k, 0) for k in keys], np.int64))
  out = dict(result)
  out.update({k: int(v) for k, v in zip(keys, np.sum(totals, axis=0))})
  per = result.get("per_template", {})
  top = int(np.max(multihost_utils.process_allgather(np.array(max(per, default=-1)))))
  if top >= 0:
    counts = np.zeros((top + 1, 2), np.int64)
    for tid, r in per.items():
      counts[tid] = (r["num_correct"], r["num_examples"])
    counts = np.sum(multihost_utils.process_allgather(counts), axis=0)
    out["per_template"] = {t: {"accuracy": int(c) / int(n), "num_correct": int(c),
                               "num_examples": int(n)}
                           for t, (c, n) in enumerate(counts) if n}
  n = out["num_examples"]
  out["accuracy"] = out["num_correct"] / n if n else math.nan
  return out


# --------------------------------------------------------------------------- model / base params


def build_model(config: T5Config, blocks: Optional[network.Blocks] = None,
                dropout_rate: Optional[float] = None) -> network.Transformer:
  if dropout_rate is not None:
    config = config.replace(dropout_rate=float(dropout_rate))
  return network.Transformer(config, blocks=blocks or network.Blocks())


def load_base_params(path: Optional[str]) -> tuple[Optional[Params], Optional[T5Config]]:
  """Initial params from an HF directory (config.json) or an orbax param checkpoint."""
  if not path:
    return None, None
  p = pathlib.Path(path)
  if (p / "config.json").exists():
    config, params = checkpoints.load_hf_checkpoint(p)
    return params, config
  return checkpoints.restore_params(p), None


# --------------------------------------------------------------------------- logging


class MetricWriter:
  """TensorBoard (clu, process 0) + a stdout line per write.

  Steps already in `logdir`'s event files (written by an earlier segment of a
  resumed run, which repeats the steps after its last checkpoint) are not
  written to TensorBoard again, so no step has two points.
  """

  def __init__(self, logdir: Optional[str], tensorboard: bool, show: Callable[[str], None]):
    self._show = show
    self._writer = None
    self.enabled = jax.process_index() == 0
    self.logged_through = -1
    if tensorboard and logdir and self.enabled:
      from clu import metric_writers
      self.logged_through = last_logged_step(logdir)
      self._writer = metric_writers.create_default_writer(logdir, asynchronous=False)

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
    if self._writer is not None and step > self.logged_through:
      self._writer.write_scalars(step, scalars)
      self._writer.flush()
    self._show(f"[{step}] " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def eval_summary(result: Mapping[str, Any],
                  template_names: Optional[Sequence[str]] = None) -> dict[str, float]:
  """Accuracy, example count, median over templates; with `template_names`, also every
  template's accuracy (`template/<name>`, as TensorBoard shows it)."""
  out = {"accuracy": result["accuracy"], "num_examples": result["num_examples"]}
  per = result.get("per_template")
  if per:
    accs = [r["accuracy"] for r in per.values()]
    out["median_template_accuracy"] = float(np.median(accs))
    if template_names is not None:
      for t, r in per.items():
        tag = re.sub(r"[^\w.-]+", "_", _template_name(t, template_names))
        out[f"template/{tag}/accuracy"] = r["accuracy"]
  return out


# --------------------------------------------------------------------------- the loop


def train(*, model_dir: str, config: T5Config, train_data: BatchSource,
          blocks: Optional[network.Blocks] = None, trainable: params_lib.Patterns = ALL_PARAMS,
          train_config: TrainConfig = TrainConfig(),
          loss: losses.LossConfig = losses.LossConfig(),
          optimizer: OptimizerConfig | optax.GradientTransformation = OptimizerConfig(),
          partitioning: PartitionConfig = PartitionConfig(),
          checkpoint: CheckpointConfig = CheckpointConfig(),
          eval_data: Optional[BatchSource] = None,
          initial_checkpoint_path: Optional[str] = None,
          dropout_rate: Optional[float] = None,
          results_file: Optional[str] = "results.json",
          initial_params: Optional[Params] = None,
          post_load: Optional[Callable[[Params, T5Config], Params]] = None) -> dict[str, Any]:
  """Trains (or resumes training in) `model_dir`; returns the results dict.

  Resumes from the newest checkpoint in `<model_dir>/checkpoints` if there is
  one (same trainable params, optimizer state, step and data position), else
  starts from `initial_checkpoint_path` (HF directory or orbax params; params
  it lacks must be trainable and are initialised with the seed), or from
  `initial_params` (a host param tree), or from a random init. `post_load(params,
  config) -> params` runs once on a fresh start (e.g. prompt tuning copies embedding
  rows into its prompt; a PEFT gin file binds `trainer.train.post_load`).

  Raises:
    TrainingDivergedError: a NaN/inf loss (the diverged update is not saved).
    CheckpointError: a checkpoint that does not fit the model (names the param).
  """
  tc = train_config
  if isinstance(optimizer, OptimizerConfig):
    if optimizer.total_steps is None:
      optimizer = dataclasses.replace(optimizer, total_steps=tc.train_steps)
    transform, lr_fn = optimizer.build(), optimizer.learning_rate_fn()
  else:
    transform, lr_fn = optimizer, None
  model_dir = os.path.abspath(model_dir)
  is_chief = jax.process_index() == 0
  created_model_dir = not os.path.exists(model_dir)
  os.makedirs(model_dir, exist_ok=True)
  t_start = time.time()

  base, hf_config = load_base_params(initial_checkpoint_path)
  if initial_params is not None:
    if base is not None:
      raise ValueError("pass initial_checkpoint_path or initial_params, not both")
    base = initial_params
  if base is not None and hf_config is not None:
    # The HF directory must hold the configured model: names the first differing param.
    checkpoints.check_params_match(base, config, source=str(initial_checkpoint_path))
  model = build_model(config, blocks, dropout_rate)
  partitioner = Partitioner(partitioning)
  trainer = Trainer(model, trainable=trainable, optimizer=transform, loss=loss,
                    partitioner=partitioner, grad_accum_steps=tc.grad_accum_steps, seed=tc.seed,
                    enable_dropout=tc.enable_dropout, use_task_id=tc.use_task_id,
                    max_choices_per_step=tc.max_choices_per_step,
                    learning_rate_fn=lr_fn)
  if partitioner.replicated_dims:
    log.info("replicated (not divisible): %s", "; ".join(partitioner.replicated_dims))
  if tc.batch_size % (tc.grad_accum_steps * partitioner.data_size):
    raise ValueError(f"BATCH_SIZE={tc.batch_size} must be divisible by grad_accum_steps "
                     f"({tc.grad_accum_steps}) x data-parallel devices ({partitioner.data_size})")
  counts = trainer.num_params()
  run_meta = {"seed": tc.seed, "batch_size": tc.batch_size, "train_steps": tc.train_steps,
              "grad_accum_steps": tc.grad_accum_steps, "model_config": model.config.to_dict(),
              "trainable_params": trainer.trainable_paths, "num_trainable": counts["trainable"],
              "initial_checkpoint_path": initial_checkpoint_path}

  show = _printer(is_chief and tc.progress)
  results_path = os.path.join(model_dir, results_file) if results_file else None
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
       f"{counts['total']:,} params ({counts['trainable_bytes'] / 1e6:.3g} MB)")
  for source in (train_data, eval_data):
    check_vocabulary(source, model.config)

  history: dict[str, Any] = {"train_losses": [], "eval": {}, "truncation": {}}
  if latest is not None:
    state, data_position, meta = _resume(trainer, ckpt, latest, base, run_meta, show)
    history.update(meta.get("history", {}))
  else:
    source = "initial_params" if initial_params is not None else str(initial_checkpoint_path)
    state, data_position = trainer.init_state(base, source=source), 0
    if post_load is not None:
      state = trainer.state_from_params(trainer.place_params(post_load(state.params, model.config)))
  start = int(jax.device_get(state.step))
  losses_seen = [(int(s), float(l)) for s, l in history["train_losses"] if s <= start]
  eval_results = {int(s): r for s, r in history["eval"].items() if int(s) <= start}
  truncation: dict[str, Optional[dict]] = dict(history["truncation"])
  prior_train_truncation = truncation.get("train")

  shard_id, num_shards = partitioner.data_shard_info()
  local_bs = partitioner.local_batch_size(tc.batch_size)
  writer = MetricWriter(os.path.join(model_dir, "train"), tc.tensorboard, show)
  eval_writer = MetricWriter(os.path.join(model_dir, "eval"), tc.tensorboard, show)
  eval_bs = tc.eval_batch_size or tc.batch_size
  template_names = _template_names(eval_data)

  def run_eval(step: int) -> None:
    if eval_data is None:
      return
    batches = eval_data(batch_size=partitioner.local_batch_size(eval_bs), start_step=0,
                        shard_id=shard_id, num_shards=num_shards)
    result = trainer.evaluate(state.params, batches, eval_bs,
                              length_normalize=tc.length_normalize_eval,
                              total=getattr(batches, "num_batches", None))
    stats = getattr(batches, "stats", None)
    if stats is not None:
      if stats.any_truncated and truncation.get("eval") is None:
        show(f"truncated: {stats.report(_source_name(eval_data) + ' (eval)')}")
      truncation["eval"] = stats.as_dict()
    check_eval_result(result, _source_name(eval_data))
    eval_writer.write(step, eval_summary(result, template_names), prefix="eval/")
    eval_results[step] = eval_result_json(result, template_names)

  def save(step: int) -> None:
    truncation["train"] = _add_truncation(prior_train_truncation, train_stats)
    history = {"train_losses": losses_seen, "eval": eval_results, "truncation": truncation}
    ckpt.save(step, state, files.jsonable(
        {**run_meta, "data_position": data_position, "history": history}))

  last_saved = latest
  batches = iter(train_data(batch_size=local_bs, start_step=data_position, shard_id=shard_id,
                            num_shards=num_shards)) if start < tc.train_steps else iter(())
  train_stats = getattr(batches, "stats", None)
  train_name = _source_name(train_data)
  reported = {"truncated": False, "identical": False}
  from tqdm.auto import tqdm
  bar = tqdm(total=tc.train_steps, initial=start, desc="train", dynamic_ncols=True,
             disable=not (is_chief and tc.progress))
  window: list[dict] = []
  t_window = time.time()
  step = start
  stop = StopOnSignal()
  failed = False
  try:
    with stop:
      while step < tc.train_steps:
        try:
          host_batch = next(batches)
        except StopIteration:
          raise DataError(f"{train_name}: train data ran out after {data_position} batches "
                          f"(step {step}); training streams must repeat") from None
        _warn_train_batch(host_batch, train_stats, train_name, reported, show)
        batch = partitioner.shard_batch(trainer.model_batch(host_batch), tc.batch_size)
        state, metrics = trainer.step(state, batch)
        step += 1
        data_position += 1
        metrics = jax.device_get(metrics)
        loss_value = float(metrics["loss"])
        bad = [k for k in ("loss", "grad_norm", "param_norm")
               if not math.isfinite(float(metrics[k]))]
        if bad:
          ckpt.wait()
          good = ckpt.path(last_saved) if last_saved is not None else "none (no checkpoint yet)"
          raise TrainingDivergedError(
              f"non-finite {', '.join(bad)} at step {step} of {tc.train_steps} (loss "
              f"{loss_value}, grad norm {float(metrics['grad_norm'])}, trainable param norm "
              f"{float(metrics['param_norm'])}); the diverged state was not saved. "
              f"Last good checkpoint: {good}")
        losses_seen.append((step, loss_value))
        window.append(metrics)
        bar.update(1)
        if step % tc.log_period == 0 or step == tc.train_steps:
          elapsed = max(time.time() - t_window, 1e-9)
          scalars = average_metrics(window)
          scalars["steps_per_sec"] = len(window) / elapsed
          bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                          steps_per_s=f"{scalars['steps_per_sec']:.2f}")
          writer.write(step, scalars, prefix="train/")
          window, t_window = [], time.time()
        if tc.eval_period and step % tc.eval_period == 0 and step < tc.train_steps:
          run_eval(step)  # before the checkpoint: its meta then holds this eval
        if checkpoint.period and step % checkpoint.period == 0 and step < tc.train_steps:
          save(step)
          last_saved = step
        if stop.requested is not None and step < tc.train_steps:
          if last_saved != step:
            save(step)
            last_saved = step
          ckpt.wait()
          show(f"{stop.signal_name}: saved {ckpt.path(step)}")
          raise TrainingInterrupted(step=step, model_dir=model_dir)
    if last_saved != step:
      save(step)
      last_saved = step
    if tc.eval_at_end and eval_data is not None and step not in eval_results:
      run_eval(step)
  except BaseException as e:
    failed = not isinstance(e, TrainingInterrupted)
    raise
  finally:
    bar.close()
    ckpt.close()
    writer.close()
    eval_writer.close()
    if failed:
      _remove_empty_dirs(model_dir, created_model_dir)

  truncation["train"] = _add_truncation(prior_train_truncation, train_stats)
  if truncation.get("train") and _any_truncated(truncation["train"]):
    show(f"truncated (train, {truncation['train']['examples']} examples seen): "
         + _truncation_counts(truncation["train"]))
  results = {
      "step": step, "start_step": start, "model_dir": model_dir,
      "checkpoint": ckpt.path(last_saved), "params": counts, "train_losses": losses_seen,
      "first_loss": losses_seen[0][1] if losses_seen else None,
      "last_loss": losses_seen[-1][1] if losses_seen else None,
      "eval": dict(sorted(eval_results.items())),
      "truncation": truncation,
      "mesh": {"data": partitioner.data_size, "model": partitioner.model_size,
               "processes": jax.process_count()},
      "wall_time_s": time.time() - t_start,
  }
  if results_path and is_chief:
    files.write_json(results_path, results)
    show(f"results: {results_path}")
  results["state"] = state
  return results


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


def _source_name(source: Any) -> str:
  return str(getattr(source, "name", None) or type(source).__name__)


def _template_names(source: Any) -> Optional[Sequence[str]]:
  names = getattr(source, "template_names", None)
  return names() if callable(names) else None


def check_vocabulary(source: Any, config: T5Config) -> None:
  """A source with a vocabulary larger than the model's embedding is a ConfigError."""
  vocabulary = getattr(source, "vocabulary", None)
  if not callable(vocabulary):
    return
  size = vocabulary().vocab_size
  if size > config.vocab_size:
    raise ConfigError(f"{_source_name(source)}: its vocabulary has {size} pieces but the model's "
                      f"embedding has vocab_size={config.vocab_size} rows; token ids beyond it "
                      "have no embedding (use the model's vocabulary, or a model with "
                      f"vocab_size >= {size})")


def check_token_ids(batch: Mapping[str, np.ndarray], vocab_size: int, where: str) -> None:
  """Token ids outside the embedding would turn the loss non-finite: a DataError instead."""
  for key in ("encoder_input_tokens", "choice_tokens"):
    if key in batch and np.size(batch[key]):
      top = int(np.max(batch[key]))
      if top >= vocab_size or int(np.min(batch[key])) < 0:
        raise DataError(f"{where}: feature {key!r} holds token id {top}, outside the model's "
                        f"vocab_size={vocab_size} (a task vocabulary larger than the model's "
                        "embedding?)")


def check_eval_result(result: Mapping[str, Any], name: str) -> None:
  """No labelled example, or answer choices that cannot be told apart, is a DataError."""
  if not result["num_examples"]:
    raise DataError(f"{name}: no labelled examples to evaluate ({result['num_unlabelled']} "
                    "unlabelled); an empty split or file?")
  if result.get("num_identical_choices"):
    raise DataError(f"{name}: {result['num_identical_choices']} of {result['num_examples']} "
                    "examples have identical answer choices (feature 'choices', e.g. after "
                    "cutting to TASK_FEATURE_LENGTHS['targets']); their accuracy would be "
                    "meaningless. Raise the targets length or fix the template's answer_choices")


def _warn_train_batch(batch: Batch, stats: Any, name: str, reported: dict,
                      show: Callable[[str], None]) -> None:
  """Reports (once) the first truncated and the first indistinguishable training example."""
  if stats is not None and not reported["truncated"]:
    if stats.any_truncated:
      reported["truncated"] = True
      show(f"truncated: {stats.report(name + ' (train, so far)')}")
  if not reported["identical"] and "choice_tokens" in batch:
    mask = np.asarray(batch.get("example_mask", np.ones(np.shape(batch["label"])))).astype(bool)
    same = metrics_lib.identical_choices(batch["choice_tokens"], batch["choice_mask"])[mask]
    if same.any():
      reported["identical"] = True
      msg = (f"warning: {name}: {int(same.sum())} training examples in one batch have "
             "identical answer choices (feature 'choices', e.g. after cutting to "
             "TASK_FEATURE_LENGTHS['targets']); the loss cannot separate them")
      log.warning("%s", msg)
      show(msg)


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


def last_logged_step(logdir: str) -> int:
  """The highest step with a summary in `logdir`'s TensorBoard event files (-1: none)."""
  files = [f for f in (os.listdir(logdir) if os.path.isdir(logdir) else [])
           if f.startswith("events.out.tfevents")]
  if not files:
    return -1
  from ia3_jax.sources import import_tf
  tf = import_tf()
  last = -1
  for name in files:
    try:
      for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
        if event.HasField("summary") and event.summary.value:
          last = max(last, int(event.step))
    except tf.errors.DataLossError:  # a record cut by a kill: the rest of that file is lost
      pass
  return last


def eval_result_json(result: Mapping[str, Any],
                      template_names: Optional[Sequence[str]] = None) -> dict:
  """An eval result for a JSON file: per-template entries keyed by template name."""
  out = {k: v for k, v in result.items() if k not in ("predictions", "labels", "scores")}
  out.update(eval_summary(result))
  if "per_template" in result:
    out["per_template"] = {_template_name(t, template_names): {**r, "template_id": int(t)}
                           for t, r in result["per_template"].items()}
  return out


def _template_name(template_id: Any, names: Optional[Sequence[str]]) -> str:
  t = int(template_id)
  return names[t] if names is not None and 0 <= t < len(names) else str(t)


def average_metrics(window: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Mean of each metric over a window of steps' metrics (what a log line reports)."""
  keys = window[0].keys()
  return {k: float(np.mean([np.asarray(m[k], np.float64) for m in window])) for k in keys}


def _printer(enabled: bool) -> Callable[[str], None]:
  from tqdm.auto import tqdm

  def show(msg: str) -> None:
    if enabled:
      tqdm.write(msg)
    else:
      log.info("%s", msg)
  return show


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
    frozen = trainer.init_frozen(base)
  state = TrainState(step=trainer.partitioner.place(np.asarray(step, np.int32),
                                                    trainer.partitioner.replicated),
                     trainable=trainable, opt_state=opt_state, frozen=frozen)
  show(f"resumed from {ckpt.path(step)} (step {step}, data position {meta['data_position']})")
  return state, int(meta["data_position"]), meta
