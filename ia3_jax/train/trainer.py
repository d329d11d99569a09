"""The jitted pieces of training one model on one mesh: init, the train step, eval.

`Trainer` differentiates `loss(combine(trainable, frozen))` with respect to
`trainable` alone, so no gradient buffers exist for frozen weights, and
optimizer state exists only for the trainable params. With gradient
accumulation over `a` microbatches, microbatch i holds rows i, i + a, i + 2a,
... of the global batch (so every data-parallel device gets its share of each
microbatch); the gradient is the mean of the microbatch gradients, and the
logged loss the mean of the microbatch losses (each microbatch pools its own
tokens, as T-Few's `grad_accum_factor` does). Dropout keys are folded from
(seed, step, microbatch), so a resumed run draws the same masks. The loop
around it (hooks, checkpoints, resume) is `ia3_jax.train.loop`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ia3_jax.data import features
from ia3_jax.errors import CheckpointError
from ia3_jax.model import families, network, storage
from ia3_jax.model import params as params_lib
from ia3_jax.objectives import losses, scoring
from ia3_jax.train.checks import check_token_ids
from ia3_jax.train.partitioning import Partitioner
from ia3_jax.train.train_state import TrainState, opt_state_shardings

# What the train step needs from a host batch (example_mask defaults to all ones).
REQUIRED_TRAIN_FEATURES = tuple(k for k in features.TRAIN_FEATURES if k != "example_mask")

Params = dict[str, Any]
Batch = Mapping[str, np.ndarray]





# --------------------------------------------------------------------------- trainer


def _dict_leaves_to_paths(tree: Params) -> list[str]:
  return sorted(params_lib.flatten(tree))


class Trainer:
  """The jit-compiled init / train step / eval of one model on one mesh.

  Args:
    model: the network (with PEFT blocks, if any): a T5 `network.Transformer` or a
      decoder-only `decoder.DecoderOnly` (`model.families` tells them apart).
    trainable: regex(es) over "/"-joined param paths (`params.trainable_mask`);
      ".*" trains everything (full fine-tuning).
    optimizer: an optax transformation (e.g. `OptimizerConfig.build()`).
    loss: T-Few loss weights.
    partitioner: mesh and rules.
    learning_rate_fn: schedule, only for logging the learning rate.
    frozen_storage: how the frozen params are stored (float32, bfloat16, int8, int4);
      every way of placing params (`init_state`, `state_from_params`, `place_params`)
      stores them so, and `param_shardings` are those of the stored tree.
  """

  def __init__(self, model: Any, *, trainable: params_lib.Patterns,
               optimizer: optax.GradientTransformation,
               loss: losses.LossConfig = losses.LossConfig(),
               partitioner: Optional[Partitioner] = None, grad_accum_steps: int = 1,
               seed: int = 42, enable_dropout: bool = True, use_task_id: bool = False,
               max_choices_per_step: Optional[int] = None,
               learning_rate_fn: Optional[Callable] = None,
               frozen_storage: storage.FrozenStorage = storage.FrozenStorage()):
    self.model = model
    self.family = families.of(model)
    self.scanned = model.blocks.scan_layers
    self.storage = frozen_storage
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
    self.abstract_boxed = self.family.abstract_params(model, with_task_id=use_task_id)
    self.abstract = nn.unbox(self.abstract_boxed)
    self.mask = params_lib.trainable_mask(self.abstract, trainable)
    self.abstract_trainable, float_frozen = params_lib.partition(self.abstract, self.mask)
    if not params_lib.flatten(self.abstract_trainable):
      raise ValueError(f"trainable params {trainable!r} select nothing")
    self.abstract_frozen = frozen_storage.abstract_tree(float_frozen)  # as stored
    self._frozen_paths = frozenset(params_lib.flatten(float_frozen))
    self.float_param_shardings = p.shardings(self.abstract_boxed)
    self.trainable_shardings, float_frozen_shardings = params_lib.partition(
        self.float_param_shardings, self.mask)
    self.frozen_shardings = frozen_storage.shardings(self.abstract_frozen, float_frozen_shardings)
    self.param_shardings = params_lib.combine(self.trainable_shardings, self.frozen_shardings)
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
            "trainable_bytes": params_lib.nbytes(self.abstract_trainable),
            "frozen_bytes": storage.nbytes(self.abstract_frozen)}

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

  def in_layout(self, tree: Params) -> Params:
    """`tree` (unrolled `layers_i` or scanned `layers`) in this model's layer layout."""
    tree = nn.unbox(tree)
    return network.scan_params(tree) if self.scanned else network.unscan_params(tree)

  def check_base_params(self, base: Params, source: str) -> list[str]:
    """Checks an initial checkpoint against the model; returns the paths it lacks.

    Every param it has must exist with the same shape, and every param it
    lacks must be trainable (e.g. new (IA)^3 vectors): a frozen param left at
    its random init would be a silent bug. Either layer layout is accepted.
    """
    flat_abs = params_lib.flatten(self.abstract)
    flat_base = params_lib.flatten(self.in_layout(base))
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

  def _place(self, flat: Mapping[str, Any]) -> dict[str, Any]:
    """Params by path (host or device arrays, any placement) as this trainer keeps them:
    frozen ones in their storage (`self.storage`), all on `param_shardings`."""
    shardings = params_lib.flatten(self.param_shardings)
    frozen = self._frozen_paths
    with self.partitioner.context():
      return {k: self.partitioner.place(self.storage.store(k, v) if k in frozen else v,
                                        shardings[k]) for k, v in flat.items()}

  def store_base_tensor(self, path: str, value: Any) -> Any:
    """A base tensor as this trainer keeps it (frozen: stored; trainable: float32): the
    `convert` of `hf_checkpoints.load_initial_params`, applied as each tensor is read."""
    layout_path = network.SCANNED_PATH.sub("/layers/", path) if self.scanned else path
    if layout_path in self._frozen_paths:
      return self.storage.store(path, value)
    return np.asarray(value, np.float32)

  def _init_subset(self, paths: Sequence[str]) -> Params:
    """Random init of only `paths` (XLA drops the rest of the init computation)."""
    if not paths:
      return {}
    shardings = params_lib.flatten(self.float_param_shardings)
    out_shardings = params_lib.unflatten({k: shardings[k] for k in paths})

    def init(rng):
      flat = params_lib.flatten(self.family.init_params(self.model, rng,
                                                        with_task_id=self.use_task_id))
      return params_lib.unflatten({k: flat[k] for k in paths})
    with self.partitioner.context():
      return jax.jit(init, out_shardings=out_shardings)(jax.random.key(self.seed))

  def init_state(self, base: Optional[Params] = None, *, source: str = "initial checkpoint"
                 ) -> TrainState:
    """A fresh state: `base` params (host arrays, e.g. an HF checkpoint) where given,
    random init (seed) elsewhere; step 0 and a new optimizer state."""
    if base is None:
      base, missing = {}, sorted(params_lib.flatten(self.abstract))
    else:
      base = self.in_layout(base)
      missing = self.check_base_params(base, source)
    return self.state_from_params(params_lib.combine(base, self._init_subset(missing)))

  def init_frozen(self, base: Optional[Params] = None, *,
                  source: str = "initial checkpoint") -> Params:
    """The frozen params alone, as `init_state` would make them (for resuming)."""
    frozen_paths = sorted(params_lib.flatten(self.abstract_frozen))
    if not frozen_paths:
      return {}
    if base is None:
      frozen = params_lib.flatten(self._init_subset(frozen_paths))
    else:
      base = self.in_layout(base)
      self.check_base_params(base, source)
      flat = params_lib.flatten(base)
      frozen = {k: flat[k] for k in frozen_paths}
    return params_lib.unflatten(self._place(frozen))

  def place_params(self, full: Params) -> Params:
    """A full param tree (any placement and layer layout, float or stored) as this trainer
    keeps it."""
    return params_lib.unflatten(self._place(params_lib.flatten(self.in_layout(full))))

  def state_from_params(self, full: Params, step: int = 0) -> TrainState:
    """A state at `step` with a new optimizer state; `full` is placed as `place_params` does."""
    trainable, frozen = params_lib.partition(self.place_params(full), self.mask)
    with self.partitioner.context():
      opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(trainable)
    step_arr = self.partitioner.place(np.asarray(step, np.int32), self.partitioner.replicated)
    return TrainState(step=step_arr, trainable=trainable, opt_state=opt_state, frozen=frozen)

  # ---- the step
  def _loss_fn(self, trainable: Params, frozen: Params, batch: Batch, rng: jax.Array):
    params = params_lib.combine(trainable, frozen)
    rngs = {"dropout": rng} if self.enable_dropout else None
    model_batch = {k: batch[k] for k in features.MODEL_FEATURES if k != "task_id"}
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
    missing = [k for k in REQUIRED_TRAIN_FEATURES if k not in host_batch]
    if missing:
      raise ValueError(f"train batch lacks features {missing} (has {sorted(host_batch)})")
    out = {k: np.asarray(host_batch[k]) for k in REQUIRED_TRAIN_FEATURES}
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
               total: Optional[int] = None, per_task: bool = False) -> dict[str, Any]:
    """Rank-classification accuracy over this host's eval batches, summed over hosts
    (`per_task`: also per `task_id`, see `scoring.evaluate`)."""
    result = scoring.evaluate(self.model, params, batches,
                              classifier=self.classifier(global_batch_size, length_normalize),
                              progress=progress and jax.process_index() == 0, total=total,
                              per_task=per_task)
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
  if "per_task" in result:
    out["per_task"] = _allreduce_per_task(result["per_task"])
  n = out["num_examples"]
  out["accuracy"] = out["num_correct"] / n if n else math.nan
  return out


def _allreduce_per_task(per_task: Mapping[int, Any]) -> dict[int, Any]:
  """Sums per-task, per-template counts over processes (template -1: rows without one)."""
  from jax.experimental import multihost_utils
  counts = {(task, -1): [r["num_correct"], r["num_examples"]] for task, r in per_task.items()}
  for task, r in per_task.items():
    for template, t in r.get("per_template", {}).items():
      counts[(task, template)] = [t["num_correct"], t["num_examples"]]
      counts[(task, -1)][0] -= t["num_correct"]
      counts[(task, -1)][1] -= t["num_examples"]
  top = np.max(multihost_utils.process_allgather(np.array(
      [max((k[i] for k in counts), default=-1) for i in (0, 1)])), axis=0)
  dense = np.zeros((int(top[0]) + 1, int(top[1]) + 2, 2), np.int64)
  for (task, template), cn in counts.items():
    dense[task, template + 1] = cn
  dense = np.sum(multihost_utils.process_allgather(dense), axis=0)
  return scoring.per_task_result({(int(t), int(p) - 1): dense[t, p]
                                  for t, p in zip(*np.nonzero(dense[..., 1]))})
