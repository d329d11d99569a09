"""Entry points of the eval, score and infer runs (train is `loop.train`).

Each loads the base params (INITIAL_CHECKPOINT_PATH: an HF directory, an
orbax param checkpoint, or None for the seed's random init), puts the
trainable params of a training checkpoint (CHECKPOINT_PATH: `MODEL_DIR`,
`MODEL_DIR/checkpoints` or one step directory; None evaluates the base model
with fresh PEFT params) on top, and runs rank classification on the mesh:

  evaluate: accuracy (overall, per template, median over templates) ->
            `<output_dir>/eval_results.json`
  score:    every choice's score per example -> `<output_dir>/scores.jsonl`
  infer:    the predicted choice (index and text) -> `<output_dir>/predictions.jsonl`

With several processes each host writes its own rows
(`scores.process_<i>.jsonl`); accuracy is summed over hosts.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Optional

import jax
import numpy as np
import optax

from ia3_jax import files
from ia3_jax.data import features
from ia3_jax.data.batches import BatchSource
from ia3_jax.model import network
from ia3_jax.model import params as params_lib
from ia3_jax.model.config import T5Config
from ia3_jax.model.storage import FrozenStorage
from ia3_jax.train import checkpointer
from ia3_jax.train.checks import check_eval_result, check_vocabulary
from ia3_jax.train.loop import ALL_PARAMS, build_model, load_base_params
from ia3_jax.train.partitioning import PartitionConfig, Partitioner
from ia3_jax.train.trainer import Trainer
from ia3_jax.train.writers import eval_result_json

log = logging.getLogger(__name__)


def load_for_inference(*, config: T5Config, blocks: Optional[network.Blocks] = None,
                       trainable: params_lib.Patterns = ALL_PARAMS,
                       initial_checkpoint_path: Optional[str] = None,
                       checkpoint_path: Optional[str] = None,
                       partitioning: PartitionConfig = PartitionConfig(), seed: int = 42,
                       use_task_id: bool = False, max_choices_per_step: Optional[int] = None,
                       frozen_dtype: str = "float32", scan_layers: Optional[bool] = None
                       ) -> tuple[Trainer, Any, dict]:
  """(trainer, params on the mesh, checkpoint meta) for eval / score / infer; `frozen_dtype`
  [FROZEN_DTYPE]: storage of the base params (`model.storage.FrozenStorage`)."""
  meta: dict = {}
  if checkpoint_path:
    _, meta = checkpointer.read_checkpoint_meta(checkpoint_path)
    if initial_checkpoint_path is None and meta.get("initial_checkpoint_path"):
      log.warning("checkpoint %s was trained from %s; this run uses a random base "
                  "(INITIAL_CHECKPOINT_PATH=None)", checkpoint_path,
                  meta["initial_checkpoint_path"])
    seed = int(meta.get("seed", seed))  # the random base (if any) of the training run
  model = build_model(config, blocks, dropout_rate=0.0, scan_layers=scan_layers)
  tr = Trainer(model, trainable=trainable, optimizer=optax.identity(),
               partitioner=Partitioner(partitioning), seed=seed, enable_dropout=False,
               use_task_id=use_task_id, max_choices_per_step=max_choices_per_step,
               frozen_storage=FrozenStorage(frozen_dtype))
  state = tr.init_state(load_base_params(tr, initial_checkpoint_path),
                        source=str(initial_checkpoint_path))
  if checkpoint_path:
    # Either layer layout (a run with or without SCAN_LAYERS): restored, then converted.
    restored, meta = checkpointer.restore_trainable(checkpoint_path)
    restored = tr.in_layout(restored)
    checkpointer.check_tree_matches(restored, tr.abstract_state().trainable,
                                    where=f"{checkpoint_path} (trainable)")
    state = state.replace(trainable=tr.place_params(restored))
  return tr, state.params, meta


def _batches(data: BatchSource, tr: Trainer, batch_size: int) -> Iterator:
  shard_id, num_shards = tr.partitioner.data_shard_info()
  return data(batch_size=tr.partitioner.local_batch_size(batch_size), start_step=0,
              shard_id=shard_id, num_shards=num_shards)


def _truncation(batches: Any, data: BatchSource) -> Optional[dict]:
  """The truncation counts of an eval pass (printed when anything was cut)."""
  stats = getattr(batches, "stats", None)
  if stats is None:
    return None
  if stats.any_truncated and jax.process_index() == 0:
    print(f"truncated: {stats.report(str(getattr(data, 'name', 'data')))}")
  return stats.as_dict()


def _template_names(data: BatchSource):
  names = getattr(data, "template_names", None)
  return names() if callable(names) else None


def evaluate(*, output_dir: str, config: T5Config, data: BatchSource, batch_size: int,
             blocks: Optional[network.Blocks] = None, trainable: params_lib.Patterns = ALL_PARAMS,
             initial_checkpoint_path: Optional[str] = None, checkpoint_path: Optional[str] = None,
             partitioning: PartitionConfig = PartitionConfig(), seed: int = 42,
             use_task_id: bool = False, length_normalize: bool = True,
             max_choices_per_step: Optional[int] = None, progress: bool = True,
             frozen_dtype: str = "float32", scan_layers: Optional[bool] = None) -> dict:
  """Rank-classification accuracy of a checkpoint; writes `eval_results.json`."""
  tr, params, meta = load_for_inference(
      config=config, blocks=blocks, trainable=trainable,
      initial_checkpoint_path=initial_checkpoint_path, checkpoint_path=checkpoint_path,
      partitioning=partitioning, seed=seed, use_task_id=use_task_id,
      max_choices_per_step=max_choices_per_step, frozen_dtype=frozen_dtype,
      scan_layers=scan_layers)
  check_vocabulary(data, config)
  batches = _batches(data, tr, batch_size)
  result = tr.evaluate(params, batches, batch_size, length_normalize=length_normalize,
                       progress=progress, total=getattr(batches, "num_batches", None))
  truncation = _truncation(batches, data)
  check_eval_result(result, str(getattr(data, "name", "eval data")))
  out = {"checkpoint": checkpoint_path, "step": meta.get("step"),
         "initial_checkpoint_path": initial_checkpoint_path,
         **eval_result_json(result, _template_names(data)), "truncation": truncation}
  if jax.process_index() == 0:
    files.write_json(os.path.join(output_dir, "eval_results.json"), out)
    print(f"accuracy {out['accuracy']:.4f} over {out['num_examples']} examples -> "
          f"{os.path.join(output_dir, 'eval_results.json')}")
  return out


def _rows(tr: Trainer, params: Any, batches: Iterator, batch_size: int,
          length_normalize: bool) -> Iterator[dict]:
  """Per-example scores and predictions of this host's rows (padding rows dropped)."""
  classify = tr.classifier(batch_size, length_normalize)
  for batch in batches:
    inputs = {k: np.asarray(batch[k]) for k in features.MODEL_FEATURES if k in batch}
    out = classify(params, inputs)
    rows = len(out["predictions"])
    mask = np.asarray(batch.get("example_mask", np.ones((rows,), np.int32))).astype(bool)
    for i in np.nonzero(mask)[0]:
      pred = int(out["predictions"][i])
      row = {k: int(np.asarray(batch[k])[i]) for k in (*features.ROW_IDS, "label") if k in batch}
      row["prediction"] = pred
      row["scores"] = [float(s) if np.isfinite(s) else None for s in out["scores"][i]]
      row["prediction_tokens"] = [int(t) for t in inputs["choice_tokens"][i, pred] if t > 0]
      yield row


def _rows_file(output_dir: str, name: str) -> str:
  suffix = f".process_{jax.process_index()}" if jax.process_count() > 1 else ""
  return os.path.join(output_dir, f"{name}{suffix}.jsonl")


def _vocabulary(data: BatchSource):
  """The task's own output vocabulary (what its tokens were made with), or None for a
  source without one (predictions then keep their token ids only)."""
  vocabulary = getattr(data, "vocabulary", None)
  if not callable(vocabulary):
    log.warning("%s has no vocabulary: predictions.jsonl gets token ids, no prediction_text",
                type(data).__name__)
    return None
  return vocabulary()


def _write_rows(kind: str, *, output_dir: str, config: T5Config, data: BatchSource,
                batch_size: int, **kwargs) -> dict:
  length_normalize = kwargs.pop("length_normalize", True)
  check_vocabulary(data, config)
  vocab = _vocabulary(data) if kind == "infer" else None
  tr, params, meta = load_for_inference(config=config, **kwargs)
  created = not os.path.exists(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  path = _rows_file(output_dir, "scores" if kind == "score" else "predictions")
  count = 0
  batches = _batches(data, tr, batch_size)
  try:
    with files.atomic_open(path) as f:
      for row in _rows(tr, params, batches, batch_size, length_normalize):
        if kind == "infer":
          row.pop("scores")
          if vocab is not None:
            row["prediction_text"] = vocab.decode([t for t in row["prediction_tokens"] if t != 1])
        f.write(json.dumps(row) + "\n")
        count += 1
  except BaseException:
    if created and not os.listdir(output_dir):
      os.rmdir(output_dir)
    raise
  truncation = _truncation(batches, data)
  print(f"{kind}: {count} examples -> {path}")
  return {"path": path, "num_examples": count, "step": meta.get("step"),
          "truncation": truncation}


def score(*, output_dir: str, config: T5Config, data: BatchSource, batch_size: int,
          **kwargs) -> dict:
  """Writes every choice's rank-classification score per example to `scores.jsonl`.

  kwargs: blocks, trainable, initial_checkpoint_path, checkpoint_path,
  partitioning, seed, use_task_id, length_normalize, max_choices_per_step.
  """
  return _write_rows("score", output_dir=output_dir, config=config, data=data,
                     batch_size=batch_size, **kwargs)


def infer(*, output_dir: str, config: T5Config, data: BatchSource, batch_size: int,
          **kwargs) -> dict:
  """Writes the predicted choice (index, tokens, text) per example to `predictions.jsonl`."""
  return _write_rows("infer", output_dir=output_dir, config=config, data=data,
                     batch_size=batch_size, **kwargs)
