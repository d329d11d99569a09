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

Several adapters at once (`adapters=`, gin ADAPTERS): an `AdapterBank`, or
{task name: adapter path} (peft IA3 directory, T-Few state dict, orbax params,
training checkpoint) or a directory of adapters. Each dataset of the task or
mixture uses its own adapter's row of one (IA)^3 bank, in mixed-task batches
(one compiled program, one pass); results are reported per task.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Iterator, Mapping, Optional, Union

import jax
import numpy as np

from ia3_jax import files
from ia3_jax.data import features
from ia3_jax.data.features import BatchSource
from ia3_jax.data.registration import dataset_template_names
from ia3_jax.errors import AdapterError, CheckpointError, ConfigError, DataError
from ia3_jax.interop import ia3_adapters
from ia3_jax.interop.adapter_files import ADAPTER_CONFIG
from ia3_jax.model import precision
from ia3_jax.model import params as params_lib
from ia3_jax.peft import ia3
from ia3_jax.peft.banks import AdapterBank
from ia3_jax.train import assembly, checkpointer
from ia3_jax.train.assembly import ModelSpec
from ia3_jax.train.checks import check_eval_result, check_source_task_ids, check_vocabulary
from ia3_jax.train.param_layout import ParamLayout
from ia3_jax.train.partitioning import PartitionConfig
from ia3_jax.train.writers import eval_result_json

log = logging.getLogger(__name__)

# An AdapterBank, {task name: adapter path}, or a directory of adapters.
Adapters = Union[AdapterBank, Mapping[str, str], str, os.PathLike]


def load_for_inference(model: ModelSpec, *, checkpoint_path: Optional[str] = None,
                       partitioning: PartitionConfig = PartitionConfig(), seed: int = 42
                       ) -> tuple[ParamLayout, Any, dict]:
  """(layout, params on the mesh, checkpoint meta) of `model` for eval / score / infer: the
  base at INITIAL_CHECKPOINT_PATH, the trainable params of `checkpoint_path` on top."""
  meta: dict = {}
  if checkpoint_path:
    _, meta = checkpointer.read_checkpoint_meta(checkpoint_path)
    if model.initial_checkpoint_path is None and meta.get("initial_checkpoint_path"):
      log.warning("checkpoint %s was trained from %s; this run uses a random base "
                  "(INITIAL_CHECKPOINT_PATH=None)", checkpoint_path,
                  meta["initial_checkpoint_path"])
    seed = int(meta.get("seed", seed))  # the random base (if any) of the training run
  lay = assembly.layout(model, partitioning, seed=seed, training=False)
  if jax.process_index() == 0:
    print(precision.describe_dtype(model.config.dtype), flush=True)
  params = assembly.initial_params(lay, model)
  if checkpoint_path:
    # Either layer layout (scanned or unrolled): restored, then converted.
    restored, meta = checkpointer.restore_trainable(checkpoint_path)
    restored = lay.in_layout(restored)
    checkpointer.check_tree_matches(restored, lay.abstract_trainable,
                                    where=f"{checkpoint_path} (trainable)")
    _, frozen = lay.split(params)
    params = params_lib.combine(lay.place_params(restored), frozen)
  return lay, params, meta


# --------------------------------------------------------------------------- adapter banks


def adapter_source(path: str | os.PathLike) -> str:
  """`path`, or for a training checkpoint (MODEL_DIR, checkpoints/, a step) the orbax
  params of its trainable params (`<step>/trainable`), as `ia3-jax merge` reads them."""
  p = pathlib.Path(path)
  if p.is_dir() and not (p / ADAPTER_CONFIG).exists() and not (
      p / ia3_adapters.ORBAX_METADATA).exists():
    return str(checkpointer.trainable_dir(p))
  return str(path)


def load_adapters(adapters: Adapters, config: Any, *,
                  capacity: Optional[int] = None) -> AdapterBank:
  """An `AdapterBank` (returned as is), or one loaded from {name: path} or a directory of
  adapters (`ia3_adapters.load_adapter_bank`; training checkpoints read as `adapter_source`)."""
  if isinstance(adapters, AdapterBank):
    return adapters
  if isinstance(adapters, (str, os.PathLike)):
    named = ia3_adapters.adapter_sources(adapters)
  elif isinstance(adapters, Mapping):
    named = dict(adapters)
  else:
    raise ConfigError(f"ADAPTERS must be {{task name: adapter path}} or a directory of "
                      f"adapters, got {adapters!r}")
  sources = {}
  for name, path in named.items():
    try:
      sources[name] = adapter_source(path) if isinstance(path, (str, os.PathLike)) else path
    except CheckpointError as e:
      raise AdapterError(f"adapter {name!r}: {path}: not a peft adapter directory, orbax params "
                         f"or a training checkpoint ({e})") from e
  return ia3_adapters.load_adapter_bank(sources, config, capacity=capacity)


def bank_spec(bank: AdapterBank, model: ModelSpec) -> ModelSpec:
  """`model` with (IA)^3 on `bank`'s sites, one row per slot (its PEFT method may be (IA)^3
  or none, not another one)."""
  if model.peft is not None and not isinstance(model.peft, ia3.IA3Config):
    raise ConfigError(f"ADAPTERS holds (IA)^3 adapters, but the run's PEFT method is "
                      f"{model.peft.name}; include peft/ia3.gin (or no PEFT method)")
  return model.replace(peft=ia3.IA3Config(sites=ia3.sites_of(bank.params())),
                       num_tasks=bank.capacity, trainable=None)


def with_bank(lay: ParamLayout, params: Any, bank: AdapterBank) -> Any:
  """`params` with `bank`'s current values as the (IA)^3 params, placed as `lay` keeps them:
  same shapes, so a jitted eval step runs again without a new compilation."""
  expected = params_lib.flatten(ia3.init_ia3(lay.model.config, ia3.sites_of(bank.params()), 1))
  for path, shape in bank.row_shapes.items():
    if path not in expected or tuple(expected[path].shape[1:]) != shape:
      want = tuple(expected[path].shape[1:]) if path in expected else "no such param"
      raise AdapterError(f"adapter bank ({', '.join(bank.names)}): {path} rows are {shape}, the "
                         f"model has {want} (adapters for another base model shape?)")
  _, frozen = lay.split(params)
  return params_lib.combine(lay.place_params(bank.params()), frozen)


def load_bank_for_inference(adapters: Adapters, model: ModelSpec, *,
                            partitioning: PartitionConfig = PartitionConfig(), seed: int = 42,
                            capacity: Optional[int] = None) -> tuple[ParamLayout, Any, AdapterBank]:
  """(layout, params on the mesh, bank) of `model`'s base with one (IA)^3 row per adapter
  (`task_id` picks it). After `bank.add(...)` under capacity, `with_bank(lay, params, bank)`
  gives the new params: the compiled programs are reused."""
  bank = load_adapters(adapters, model.config, capacity=capacity)
  lay, params, _ = load_for_inference(bank_spec(bank, model), partitioning=partitioning,
                                      seed=seed)
  return lay, with_bank(lay, params, bank), bank


def bank_data(data: BatchSource, bank: AdapterBank) -> BatchSource:
  """`data` with each dataset's examples on its adapter's row (`task_id_map`); a dataset
  without an adapter is a ConfigError. A source without dataset keys (not a
  `SeqioBatches`) is returned as is: its `task_id`s must be rows of the bank."""
  keys = getattr(data, "dataset_keys", None)
  if not callable(keys) or not dataclasses.is_dataclass(data):
    return data
  missing = [k for k in keys() if k not in bank]
  if missing:
    raise ConfigError(f"{getattr(data, 'name', 'data')}: task {missing[0]!r} has no adapter "
                      f"(ADAPTERS has {', '.join(bank.names)}); add one for it")
  return dataclasses.replace(data, task_id_map={k: bank.row(k) for k in keys()})


def _task_name(bank: AdapterBank, row: int) -> str:
  name = bank.name_of_row(int(row))
  if name is None:
    raise DataError(f"batches carry task_id {int(row)}, a row of the adapter bank without an "
                    f"adapter (rows: {bank.task_id_map()})")
  return name


def _per_task_json(result: Mapping[str, Any], bank: AdapterBank) -> dict:
  out = {}
  for row, r in sorted(result["per_task"].items()):
    name = _task_name(bank, row)
    info = bank.info(name)
    out[name] = {**eval_result_json(r, dataset_template_names(name)), "task_id": int(row),
                 "adapter": info.source, "sites": list(info.sites or ())}
  return out


def _load(data: BatchSource, adapters: Optional[Adapters], model: ModelSpec, **kwargs
          ) -> tuple[ParamLayout, Any, dict, BatchSource, Optional[AdapterBank]]:
  """(layout, params, checkpoint meta, data, bank): one checkpoint, or a bank of adapters."""
  if adapters is None:
    return (*load_for_inference(model, **kwargs), data, None)
  checkpoint_path = kwargs.pop("checkpoint_path", None)
  if checkpoint_path:
    raise ConfigError(f"CHECKPOINT_PATH={checkpoint_path!r} and ADAPTERS are both set; the "
                      "adapters are the (IA)^3 params: set CHECKPOINT_PATH=None")
  bank = load_adapters(adapters, model.config)
  data = bank_data(data, bank)  # a task without an adapter fails before the model loads
  lay, params, bank = load_bank_for_inference(bank, model, **kwargs)
  return lay, params, {}, data, bank


# --------------------------------------------------------------------------- runs


def _check_data(data: BatchSource, lay: ParamLayout, model: ModelSpec) -> None:
  """The data's vocabulary and (with per-task banks) task ids against the model."""
  check_vocabulary(data, model.config)
  if lay.use_task_id:
    check_source_task_ids(data, lay.task_id_check)


def _batches(data: BatchSource, lay: ParamLayout, batch_size: int) -> Iterator:
  shard_id, num_shards = lay.partitioner.data_shard_info()
  return data(batch_size=lay.partitioner.local_batch_size(batch_size), start_step=0,
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


def evaluate(*, output_dir: str, model: ModelSpec, data: BatchSource, batch_size: int,
             checkpoint_path: Optional[str] = None,
             partitioning: PartitionConfig = PartitionConfig(), seed: int = 42,
             length_normalize: bool = True, progress: bool = True,
             adapters: Optional[Adapters] = None) -> dict:
  """Rank-classification accuracy of `model` with a checkpoint's trainable params, or with
  one adapter per task (`adapters`: then also per task, `per_task`); writes
  `eval_results.json`."""
  lay, params, meta, data, bank = _load(data, adapters, model, checkpoint_path=checkpoint_path,
                                        partitioning=partitioning, seed=seed)
  _check_data(data, lay, model)
  batches = _batches(data, lay, batch_size)
  result = lay.evaluate(params, batches, batch_size, length_normalize=length_normalize,
                        progress=progress, total=getattr(batches, "num_batches", None),
                        per_task=bank is not None)
  truncation = _truncation(batches, data)
  name = str(getattr(data, "name", "eval data"))
  check_eval_result(result, name)
  out = {"checkpoint": checkpoint_path, "step": meta.get("step"),
         "initial_checkpoint_path": model.initial_checkpoint_path}
  if bank is None:
    out.update(eval_result_json(result, _template_names(data)))
  else:
    out.update(_bank_result_json(result, bank, data, name))
  out["truncation"] = truncation
  if jax.process_index() == 0:
    files.write_json(os.path.join(output_dir, "eval_results.json"), out)
    for task, r in out.get("per_task", {}).items():
      print(f"  {task}: accuracy {r['accuracy']:.4f} over {r['num_examples']} examples")
    print(f"accuracy {out['accuracy']:.4f} over {out['num_examples']} examples -> "
          f"{os.path.join(output_dir, 'eval_results.json')}")
  return out


def _bank_result_json(result: Mapping[str, Any], bank: AdapterBank, data: BatchSource,
                      name: str) -> dict:
  """Pooled accuracy plus `per_task` (template ids are per task, so no pooled per_template)."""
  per_task = _per_task_json(result, bank)
  keys = data.dataset_keys() if callable(getattr(data, "dataset_keys", None)) else ()
  empty = [k for k in keys if k not in per_task]
  if empty:
    raise DataError(f"{name}: task {empty[0]!r} has no labelled examples to evaluate")
  pooled = {k: v for k, v in result.items() if k not in ("per_task", "per_template")}
  return {"adapters": {n: {"task_id": bank.row(n), "source": bank.info(n).source}
                       for n in bank.names},
          **eval_result_json(pooled), "per_task": per_task}


def _rows(lay: ParamLayout, params: Any, batches: Iterator, batch_size: int,
          length_normalize: bool) -> Iterator[dict]:
  """Per-example scores and predictions of this host's rows (padding rows dropped)."""
  classify = lay.classifier(batch_size, length_normalize)
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


def _write_rows(kind: str, *, output_dir: str, model: ModelSpec, data: BatchSource,
                batch_size: int, adapters: Optional[Adapters] = None,
                length_normalize: bool = True, **kwargs) -> dict:
  vocab = _vocabulary(data) if kind == "infer" else None
  lay, params, meta, data, bank = _load(data, adapters, model, **kwargs)
  _check_data(data, lay, model)
  created = not os.path.exists(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  path = _rows_file(output_dir, "scores" if kind == "score" else "predictions")
  count = 0
  batches = _batches(data, lay, batch_size)
  try:
    with files.atomic_open(path) as f:
      for row in _rows(lay, params, batches, batch_size, length_normalize):
        if bank is not None:
          row = {"task": _task_name(bank, row["task_id"]), **row}
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


def score(*, output_dir: str, model: ModelSpec, data: BatchSource, batch_size: int,
          **kwargs) -> dict:
  """Writes every choice's rank-classification score per example to `scores.jsonl`.

  kwargs: checkpoint_path, partitioning, seed, length_normalize, adapters (one per task:
  rows then name their `task`).
  """
  return _write_rows("score", output_dir=output_dir, model=model, data=data,
                     batch_size=batch_size, **kwargs)


def infer(*, output_dir: str, model: ModelSpec, data: BatchSource, batch_size: int,
          **kwargs) -> dict:
  """Writes the predicted choice (index, tokens, text) per example to `predictions.jsonl`
  (kwargs as `score`; with `adapters` each row names its `task`)."""
  return _write_rows("infer", output_dir=output_dir, model=model, data=data,
                     batch_size=batch_size, **kwargs)
