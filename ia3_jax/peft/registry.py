"""One uniform description per fine-tuning method, picked by name.

    method = registry.get_method("lora")
    blocks = method.blocks(config, rank=8)        # module overrides -> network.Transformer
    model = network.Transformer(config, blocks=blocks)
    trainable, frozen = params.select(tree, method.trainable_patterns)  # ia3_jax.model.params
    loop.train(..., blocks=blocks, trainable=method.trainable_patterns)

`blocks(config, **kw)` takes the method's hyper-parameters (see `defaults`),
always including `num_tasks`; methods without per-task banks raise a clear
ValueError for `num_tasks > 1`, and `check_task_ids` rejects non-zero task ids
for them (and out-of-range ids for all methods) on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import numpy as np

from ia3_jax.model import network
from ia3_jax.model.config import T5Config
from ia3_jax.peft import bitfit, full, ia3, layernorm, lora, prefix_tuning, prompt_tuning


@dataclasses.dataclass(frozen=True)
class Method:
  """A fine-tuning method: module overrides, what trains, and whether batches may mix tasks.

  Attributes:
    name: registry name.
    blocks: `blocks(config, **kw) -> network.Blocks`.
    trainable_patterns: regexes over "/"-joined T5X param paths (full match).
    supports_mixed_tasks: whether examples of one batch may use different `task_id`s.
    defaults: the hyper-parameters `blocks` uses when not given (documentation, counts).
    description: one line for tables and --help.
  """

  name: str
  blocks: Callable[..., network.Blocks]
  trainable_patterns: tuple[str, ...]
  supports_mixed_tasks: bool
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  description: str = ""

  def check_task_ids(self, task_id: Any, num_tasks: int = 1) -> None:
    """Host-side check of a batch's `task_id` (None is fine) against the method and bank size."""
    if task_id is None:
      return
    ids = np.asarray(task_id)
    if ids.size == 0:
      return
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"{self.name}: task_id must be integers, got dtype {ids.dtype}")
    if not self.supports_mixed_tasks and np.any(ids != 0):
      raise ValueError(
          f"{self.name} does not support mixed-task batches: task_id has values "
          f"{sorted(set(ids.ravel().tolist()))[:8]}, expected all 0. Train one adapter per "
          "task, or use ia3, prompt_tuning or prefix_tuning.")
    if ids.min() < 0 or ids.max() >= num_tasks:
      raise ValueError(f"{self.name}: task_id values must lie in [0, {num_tasks}) "
                       f"(num_tasks={num_tasks}); got min {ids.min()}, max {ids.max()}")


def _ia3_blocks(config: Optional[T5Config] = None, **kw) -> network.Blocks:
  """(IA)^3 blocks (`ia3.ia3_blocks` takes no config)."""
  return ia3.ia3_blocks(**kw)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("ia3", _ia3_blocks, ia3.TRAINABLE_PATTERNS, True, dict(sites=("k", "v", "ff")),
           description="(IA)^3: learned rescaling of keys, values and FFN activations"),
    Method("lora", lora.lora_blocks, lora.TRAINABLE_PATTERNS, False,
           dict(rank=4, alpha=4.0, dropout=0.0, targets=lora.DEFAULT_TARGETS, use_rslora=False),
           description="LoRA: low-rank updates of the projection kernels"),
    Method("bitfit", bitfit.bitfit_blocks, bitfit.TRAINABLE_PATTERNS, False,
           dict(targets=("all",)),
           description="BitFit: zero-initialised biases after every projection"),
    Method("layernorm", layernorm.layernorm_blocks, layernorm.TRAINABLE_PATTERNS, False, {},
           description="LayerNorm: the layer-norm scales"),
    Method("prompt_tuning", prompt_tuning.prompt_tuning_blocks, prompt_tuning.TRAINABLE_PATTERNS,
           True, dict(length=100, init_seed=0),
           description="Prompt tuning: a soft prompt before the input"),
    Method("prefix_tuning", prefix_tuning.prefix_tuning_blocks, prefix_tuning.TRAINABLE_PATTERNS,
           True, dict(length=10, sites=tuple(prefix_tuning.SITES), init_scale=1.0),
           description="Prefix tuning: learned key/value prefixes in every attention"),
    Method("full", full.full_blocks, full.TRAINABLE_PATTERNS, False, {},
           description="Full fine-tuning: every parameter"),
]}


def get_method(name: str) -> Method:
  """The registered method called `name` (ia3, lora, bitfit, layernorm, prompt_tuning, ...)."""
  if name not in METHODS:
    raise KeyError(f"Unknown PEFT method {name!r}; known: {', '.join(METHODS)}")
  return METHODS[name]


def method_names() -> tuple[str, ...]:
  return tuple(METHODS)


def trainable_patterns(name: str) -> list[str]:
  """The regexes of the params method `name` trains (what gin's TRAINABLE_PARAMS reads)."""
  return list(get_method(name).trainable_patterns)
