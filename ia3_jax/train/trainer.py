"""The jitted pieces of training a model laid out on a mesh: states, the train step, eval.

`Trainer` differentiates `loss(combine(trainable, frozen))` with respect to
`trainable` alone, so no gradient buffers exist for frozen weights, and
optimizer state exists only for the trainable params. With gradient
accumulation over `a` microbatches, microbatch i holds rows i, i + a, i + 2a,
... of the global batch (so every data-parallel device gets its share of each
microbatch); the gradient is the mean of the microbatch gradients, and the
logged loss the mean of the microbatch losses (each microbatch pools its own
tokens, as T-Few's `grad_accum_factor` does). Dropout keys are folded from
(seed, step, microbatch), so a resumed run draws the same masks. The params'
layout (what trains, storage, shardings) is `param_layout.ParamLayout`; the loop
around the step (hooks, checkpoints, resume) is `ia3_jax.train.loop`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ia3_jax.data import features
from ia3_jax.errors import DataError
from ia3_jax.model import params as params_lib
from ia3_jax.objectives import losses, scoring
from ia3_jax.train import evaluation
from ia3_jax.train.checks import check_token_ids
from ia3_jax.train.param_layout import ParamLayout
from ia3_jax.train.train_state import TrainState, opt_state_shardings

# What the train step needs from a host batch (example_mask defaults to all ones).
REQUIRED_TRAIN_FEATURES = tuple(k for k in features.TRAIN_FEATURES if k != "example_mask")

Params = dict[str, Any]
Batch = Mapping[str, np.ndarray]





class Trainer:
  """The jit-compiled train step and eval of a model laid out on a mesh.

  Args:
    layout: the model's params on the mesh (`param_layout.ParamLayout`: what trains, how
      the frozen params are stored, shardings); `assembly.layout` builds it from a spec.
    optimizer: an optax transformation (e.g. `OptimizerConfig.build()`).
    loss: T-Few loss weights.
    learning_rate_fn: schedule, only for logging the learning rate.
  """

  def __init__(self, layout: ParamLayout, *, optimizer: optax.GradientTransformation,
               loss: losses.LossConfig = losses.LossConfig(), grad_accum_steps: int = 1,
               enable_dropout: bool = True, learning_rate_fn: Optional[Callable] = None):
    self.layout = layout
    self.model = layout.model
    self.partitioner = p = layout.partitioner
    self.seed = layout.seed
    self.use_task_id = layout.use_task_id
    self.optimizer = optimizer
    self.loss = loss
    self.grad_accum_steps = grad_accum_steps
    self.enable_dropout = enable_dropout and self.model.config.dropout_rate > 0
    self.learning_rate_fn = learning_rate_fn
    opt_shapes = jax.eval_shape(optimizer.init, layout.abstract_trainable)
    self.opt_shardings = opt_state_shardings(opt_shapes, layout.trainable_shardings,
                                             layout.abstract_trainable, p.replicated)
    self.abstract_opt_state = opt_shapes
    self._batch_sharding = p.batch_sharding()
    self._step_fn = jax.jit(
        self._train_step,
        in_shardings=(layout.trainable_shardings, self.opt_shardings, p.replicated,
                      layout.frozen_shardings, self._batch_sharding),
        out_shardings=(layout.trainable_shardings, self.opt_shardings, p.replicated,
                       p.replicated),
        donate_argnums=(0, 1))

  # ---- states
  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    lay = self.layout

    def sds(tree, shardings):
      return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          tree, shardings)
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.partitioner.replicated),
        trainable=sds(lay.abstract_trainable, lay.trainable_shardings),
        opt_state=sds(self.abstract_opt_state, self.opt_shardings),
        frozen=sds(lay.abstract_frozen, lay.frozen_shardings))

  def init_state(self, base: Optional[Params] = None, *, source: str = "initial checkpoint"
                 ) -> TrainState:
    """A fresh state: `base` params (host arrays, e.g. an HF checkpoint) where given,
    random init (seed) elsewhere; step 0 and a new optimizer state."""
    return self.state_from_params(self.layout.init_params(base, source=source))

  def state_from_params(self, full: Params, step: int = 0) -> TrainState:
    """A state at `step` with a new optimizer state; `full` is placed as the layout keeps it."""
    trainable, frozen = self.layout.split(self.layout.place_params(full))
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
                                    max_choices_per_step=self.layout.max_choices_per_step,
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
    self.layout.check_task_ids(host_batch, "train batch")
    if self.use_task_id:
      if "task_id" not in host_batch:
        raise DataError("train batch has no task_id, but the model's banks have a row per "
                        "task (NUM_TASKS > 1): every example needs one")
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
                 length_normalize: bool = True) -> evaluation.ShardedClassifier:
    return self.layout.classifier(global_batch_size, length_normalize)

  def evaluate(self, params: Params, batches: Iterator[Batch], global_batch_size: int,
               **kwargs) -> dict[str, Any]:
    """`ParamLayout.evaluate` of `params` (kwargs: length_normalize, progress, total, per_task)."""
    return self.layout.evaluate(params, batches, global_batch_size, **kwargs)
