"""Rank-classification eval on the mesh: the sharded classifier and counts summed over hosts.

`ShardedClassifier` runs `scoring.rank_classify` for one global batch size on a
`ParamLayout`'s shardings (each host passes and gets back its own rows);
`evaluate` runs it over this host's batches (`scoring.evaluate_counts`) and sums the
counts over processes (`metrics.EvalCounts.summed_over_processes`).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import jax
import numpy as np

from ia3_jax.objectives import scoring
from ia3_jax.train.checks import check_token_ids

Params = dict[str, Any]
Batch = Mapping[str, np.ndarray]


def evaluate(layout: Any, params: Params, batches: Iterator[Batch], global_batch_size: int, *,
             length_normalize: bool = True, progress: bool = False,
             total: Optional[int] = None, per_task: bool = False) -> dict[str, Any]:
  """Rank-classification accuracy of `params` over this host's `batches`, summed over hosts
  (`per_task`: also per `task_id`, see `scoring.evaluate`)."""
  counts, _ = scoring.evaluate_counts(
      layout.model, params, batches,
      classifier=layout.classifier(global_batch_size, length_normalize),
      progress=progress and jax.process_index() == 0, total=total, per_task=per_task)
  return counts.summed_over_processes().as_dict(per_task=per_task)


class ShardedClassifier:
  """`scoring.rank_classify` on the mesh: takes this host's rows, returns this host's rows."""

  def __init__(self, layout: Any, global_batch_size: int, length_normalize: bool):
    self.layout = layout
    self.global_batch_size = global_batch_size
    sh = layout.partitioner.batch_sharding()

    def classify(params, batch):
      return scoring.rank_classify(layout.model, params, batch, length_normalize=length_normalize,
                                   max_choices_per_step=layout.max_choices_per_step)
    self._fn = jax.jit(classify, in_shardings=(layout.param_shardings, sh), out_shardings=sh)

  def __call__(self, params: Params, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    p = self.layout.partitioner
    with p.context():
      out = self._fn(params, self._global_batch(inputs))
    return {k: host_rows(v) for k, v in out.items()}

  def lower(self, params: Params, inputs: Mapping[str, np.ndarray]) -> jax.stages.Lowered:
    """The classifier lowered for `params` and this host's `inputs`, as `__call__`
    would run it; `.compile()` gives XLA's cost and memory analyses."""
    p = self.layout.partitioner
    with p.context():
      return self._fn.lower(params, self._global_batch(inputs))

  def _global_batch(self, inputs: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    inputs = dict(inputs)
    check_token_ids(inputs, self.layout.model.config.vocab_size, "eval batch")
    self.layout.check_task_ids(inputs, "eval batch")
    if not self.layout.use_task_id:
      inputs.pop("task_id", None)
    return self.layout.partitioner.shard_batch(inputs, self.global_batch_size)


def host_rows(x: jax.Array) -> np.ndarray:
  """This host's rows of a global array split over its leading dim."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = {}
  for s in x.addressable_shards:
    shards.setdefault(s.index[0].start or 0, np.asarray(s.data))
  return np.concatenate([shards[k] for k in sorted(shards)])
