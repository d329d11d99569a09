"""A model's parameters on a mesh: abstract trees, what trains, storage, shardings, placement.

`ParamLayout` is what training and inference share (T5X's `TrainStateInitializer`):
the abstract param tree of the model with its logical axes; the trainable mask;
how the frozen params are stored (`storage.FrozenStorage`: float32, bfloat16,
int8, int4); the shardings of both parts; the layer layout (scanned `layers` or
unrolled `layers_i`); checks of a base checkpoint against the model; the random
init of the params a checkpoint lacks; and placing any param tree as the layout
keeps it. Inference (`ia3_jax.runs`) uses a layout alone; `trainer.Trainer`
adds the optimizer and the step. A layout is built from a `ModelSpec` by
`assembly.layout`.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from ia3_jax.errors import CheckpointError
from ia3_jax.model import families, network, storage
from ia3_jax.model import params as params_lib
from ia3_jax.train import evaluation
from ia3_jax.train.partitioning import Partitioner

Params = dict[str, Any]
Batch = Mapping[str, np.ndarray]


class ParamLayout:
  """The params of `model` on a mesh: abstract trees, mask, storage, shardings, placement.

  Args:
    model: the network (with PEFT blocks, if any) of either family (`model.families`).
    trainable: regex(es) over "/"-joined param paths (`params.trainable_mask`);
      ".*" trains everything (full fine-tuning).
    partitioner: mesh and rules.
    seed: the random init of params a base checkpoint lacks.
    use_task_id: batches carry `task_id` (per-task banks with several rows).
    max_choices_per_step: scoring of the answer choices in chunks of this many.
    frozen_storage: how the frozen params are stored; every way of placing params
      (`init_params`, `init_frozen`, `place_params`) stores them so.
    check_task_ids: `check_task_ids(task_id, source)`, the host-side check of a batch's
      task ids (`ModelSpec.check_task_ids`); None checks nothing.
  """

  def __init__(self, model: Any, *, trainable: params_lib.Patterns,
               partitioner: Optional[Partitioner] = None, seed: int = 42,
               use_task_id: bool = False, max_choices_per_step: Optional[int] = None,
               frozen_storage: storage.FrozenStorage = storage.FrozenStorage(),
               check_task_ids: Optional[Any] = None):
    self.model = model
    self.family = families.of(model)
    self.scanned = model.blocks.scan_layers
    self.storage = frozen_storage
    self.partitioner = p = partitioner or Partitioner()
    self.seed = seed
    self.use_task_id = use_task_id
    self.max_choices_per_step = max_choices_per_step
    self.task_id_check = check_task_ids
    self._classifiers: dict[tuple, evaluation.ShardedClassifier] = {}

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

  # ---- sizes
  @property
  def trainable_paths(self) -> list[str]:
    return sorted(params_lib.flatten(self.abstract_trainable))

  def num_params(self) -> dict[str, int]:
    return {"total": params_lib.count(self.abstract),
            "trainable": params_lib.count(self.abstract_trainable),
            "trainable_bytes": params_lib.nbytes(self.abstract_trainable),
            "frozen_bytes": storage.nbytes(self.abstract_frozen)}

  # ---- base checkpoints
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

  def store_base_tensor(self, path: str, value: Any) -> Any:
    """A base tensor as this layout keeps it (frozen: stored; trainable: float32): the
    `convert` of `hf_checkpoints.load_initial_params`, applied as each tensor is read."""
    layout_path = network.SCANNED_PATH.sub("/layers/", path) if self.scanned else path
    if layout_path in self._frozen_paths:
      return self.storage.store(path, value)
    return np.asarray(value, np.float32)

  # ---- init and placement
  def _place(self, flat: Mapping[str, Any]) -> dict[str, Any]:
    """Params by path (host or device arrays, any placement) as this layout keeps them:
    frozen ones in their storage, all on `param_shardings`."""
    shardings = params_lib.flatten(self.param_shardings)
    frozen = self._frozen_paths
    with self.partitioner.context():
      return {k: self.partitioner.place(self.storage.store(k, v) if k in frozen else v,
                                        shardings[k]) for k, v in flat.items()}

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

  def init_params(self, base: Optional[Params] = None, *,
                  source: str = "initial checkpoint") -> Params:
    """Every param, placed: `base` (host arrays, e.g. an HF checkpoint) where given, random
    init (seed) elsewhere."""
    if base is None:
      base, missing = {}, sorted(params_lib.flatten(self.abstract))
    else:
      base = self.in_layout(base)
      missing = self.check_base_params(base, source)
    return self.place_params(params_lib.combine(base, self._init_subset(missing)))

  def init_frozen(self, base: Optional[Params] = None, *,
                  source: str = "initial checkpoint") -> Params:
    """The frozen params alone, as `init_params` would make them (for resuming)."""
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
    """A param tree (any placement and layer layout, float or stored) as this layout keeps it."""
    return params_lib.unflatten(self._place(params_lib.flatten(self.in_layout(full))))

  def split(self, params: Params) -> tuple[Params, Params]:
    """(trainable, frozen) parts of a placed param tree."""
    return params_lib.partition(params, self.mask)

  # ---- batches and eval
  def check_task_ids(self, batch: Batch, source: str) -> None:
    """The batch's `task_id` against the PEFT bank (host side, before the step); only when
    the model reads it (`use_task_id`: otherwise the ids only name the batch's datasets)."""
    if self.use_task_id and self.task_id_check is not None and "task_id" in batch:
      self.task_id_check(batch["task_id"], source=source)

  def classifier(self, global_batch_size: int,
                 length_normalize: bool = True) -> evaluation.ShardedClassifier:
    """The jitted rank classifier for this batch size (built once, reused by every eval)."""
    key = (global_batch_size, length_normalize)
    if key not in self._classifiers:
      self._classifiers[key] = evaluation.ShardedClassifier(self, global_batch_size,
                                                            length_normalize)
    return self._classifiers[key]

  def evaluate(self, params: Params, batches: Iterator[Batch], global_batch_size: int, *,
               length_normalize: bool = True, progress: bool = False,
               total: Optional[int] = None, per_task: bool = False) -> dict[str, Any]:
    """Rank-classification accuracy over this host's eval batches, summed over hosts
    (`per_task`: also per `task_id`, see `scoring.evaluate`)."""
    return evaluation.evaluate(self, params, batches, global_batch_size,
                               length_normalize=length_normalize, progress=progress,
                               total=total, per_task=per_task)
