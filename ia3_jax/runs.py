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
import optax

from ia3_jax import files
from ia3_jax.data import features
from ia3_jax.data.features import BatchSource
from ia3_jax.data.registration import dataset_template_names
from ia3_jax.errors import AdapterError, CheckpointError, ConfigError, DataError
from ia3_jax.interop import ia3_adapters
from ia3_jax.interop.adapter_files import ADAPTER_CONFIG
from ia3_jax.model import network, precision
from ia3_jax.model import params as params_lib
from ia3_jax.model.config import T5Config
from ia3_jax.model.storage import FrozenStorage
from ia3_jax.peft import ia3
from ia3_jax.peft.banks import AdapterBank
from ia3_jax.train import checkpointer
from ia3_jax.train.checks import check_eval_result, check_vocabulary
from ia3_jax.train.loop import ALL_PARAMS, build_model, load_base_params
from ia3_jax.train.partitioning import PartitionConfig, Partitioner
from ia3_jax.train.trainer import Trainer
from ia3_jax.train.writers import eval_result_json

log = logging.getLogger(__name__)

# An AdapterBank, {task name: adapter path}, or a directory of adapters.
Adapters = Union[AdapterBank, Mapping[str, str], str, os.PathLike]


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
  if jax.process_index() == 0:
    print(precision.describe_dtype(config.dtype), flush=True)
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


# --------------------------------------------------------------------------- adapter banks


def adapter_source(path: str | os.PathLike) -> str:
  """`path`, or for a training checkpoint (MODEL_DIR, checkpoints/, a step) the orbax
  params of its trainable params (`<step>/trainable`), as `ia3-jax merge` reads them."""
  p = pathlib.Path(path)
  if p.is_dir() and not (p / ADAPTER_CONFIG).exists() and not (
      p / ia3_adapters.ORBAX_METADATA).exists():
    return str(checkpointer.resolve_step_dir(p) / "trainable")
  return str(path)


def load_adapters(adapters: Adapters, config: T5Config, *,
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


def bank_blocks(bank: AdapterBank, blocks: Optional[network.Blocks] = None) -> network.Blocks:
  """(IA)^3 blocks for `bank` (its sites, one row per slot) on top of `blocks` (which may
  be (IA)^3 or no PEFT method, not another one)."""
  blocks = blocks or network.Blocks()
  default = network.Blocks()
  for field, allowed in (("attention", ia3.IA3Attention), ("mlp", ia3.IA3Mlp)):
    cls = getattr(getattr(blocks, field), "func", getattr(blocks, field))
    if cls is not getattr(default, field) and not (isinstance(cls, type)
                                                   and issubclass(cls, allowed)):
      raise ConfigError(f"ADAPTERS holds (IA)^3 adapters, but PEFT_BLOCKS uses "
                        f"{getattr(cls, '__name__', cls)} for the {field}; include peft/ia3.gin "
                        "(or no PEFT method)")
  others = [f for f in ("layer_norm", "encoder_layer", "decoder_layer", "encoder", "decoder")
            if getattr(blocks, f) is not getattr(default, f)]
  if others:
    raise ConfigError(f"ADAPTERS holds (IA)^3 adapters, but PEFT_BLOCKS overrides {others[0]} "
                      "(another PEFT method); include peft/ia3.gin (or no PEFT method)")
  return ia3.ia3_blocks(ia3.sites_of(bank.params()), bank.capacity, base=blocks)


def with_bank(tr: Trainer, params: Any, bank: AdapterBank) -> Any:
  """`params` with `bank`'s current values as the (IA)^3 params, placed as `tr` keeps them:
  same shapes, so a jitted eval step runs again without a new compilation."""
  expected = params_lib.flatten(ia3.init_ia3(tr.model.config, ia3.sites_of(bank.params()), 1))
  for path, shape in bank.row_shapes.items():
    if path not in expected or tuple(expected[path].shape[1:]) != shape:
      want = tuple(expected[path].shape[1:]) if path in expected else "no such param"
      raise AdapterError(f"adapter bank ({', '.join(bank.names)}): {path} rows are {shape}, the "
                         f"model has {want} (adapters for another base model shape?)")
  _, frozen = params_lib.partition(params, tr.mask)
  return params_lib.combine(tr.place_params(bank.params()), frozen)


def load_bank_for_inference(adapters: Adapters, *, config: T5Config,
                            blocks: Optional[network.Blocks] = None,
                            initial_checkpoint_path: Optional[str] = None,
                            partitioning: PartitionConfig = PartitionConfig(), seed: int = 42,
                            max_choices_per_step: Optional[int] = None,
                            frozen_dtype: str = "float32", scan_layers: Optional[bool] = None,
                            capacity: Optional[int] = None) -> tuple[Trainer, Any, AdapterBank]:
  """(trainer, params on the mesh, bank) of a base model with one (IA)^3 row per adapter
  (`task_id` picks it). After `bank.add(...)` under capacity, `with_bank(tr, params, bank)`
  gives the new params: the trainer's compiled programs are reused."""
  bank = load_adapters(adapters, config, capacity=capacity)
  tr, params, _ = load_for_inference(
      config=config, blocks=bank_blocks(bank, blocks), trainable=ia3.IA3_PATTERN,
      initial_checkpoint_path=initial_checkpoint_path, partitioning=partitioning, seed=seed,
      use_task_id=True, max_choices_per_step=max_choices_per_step, frozen_dtype=frozen_dtype,
      scan_layers=scan_layers)
  return tr, with_bank(tr, params, bank), bank


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


def _load(data: BatchSource, adapters: Optional[Adapters], **kwargs
          ) -> tuple[Trainer, Any, dict, BatchSource, Optional[AdapterBank]]:
  """(trainer, params, checkpoint meta, data, bank): one checkpoint, or a bank of adapters."""
  if adapters is None:
    return (*load_for_inference(**kwargs), data, None)
  if kwargs.get("checkpoint_path"):
    raise ConfigError(f"CHECKPOINT_PATH={kwargs['checkpoint_path']!r} and ADAPTERS are both "
                      "set; the adapters are the (IA)^3 params: set CHECKPOINT_PATH=None")
  for unused in ("checkpoint_path", "trainable", "use_task_id"):
    kwargs.pop(unused, None)
  bank = load_adapters(adapters, kwargs["config"])
  data = bank_data(data, bank)  # a task without an adapter fails before the model loads
  tr, params, bank = load_bank_for_inference(bank, **kwargs)
  return tr, params, {}, data, bank


# --------------------------------------------------------------------------- runs


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
             frozen_dtype: str = "float32", scan_layers: Optional[bool] = None,
             adapters: Optional[Adapters] = None) -> dict:
  """Rank-classification accuracy of a checkpoint, or of one adapter per task
  (`adapters`: then also per task, `per_task`); writes `eval_results.json`."""
  tr, params, meta, data, bank = _load(
      data, adapters, config=config, blocks=blocks, trainable=trainable,
      initial_checkpoint_path=initial_checkpoint_path, checkpoint_path=checkpoint_path,
      partitioning=partitioning, seed=seed, use_task_id=use_task_id,
      max_choices_per_step=max_choices_per_step, frozen_dtype=frozen_dtype,
      scan_layers=scan_layers)
  check_vocabulary(data, config)
  batches = _batches(data, tr, batch_size)
  result = tr.evaluate(params, batches, batch_size, length_normalize=length_normalize,
                       progress=progress, total=getattr(batches, "num_batches", None),
                       per_task=bank is not None)
  truncation = _truncation(batches, data)
  name = str(getattr(data, "name", "eval data"))
  check_eval_result(result, name)
  out = {"checkpoint": checkpoint_path, "step": meta.get("step"),
         "initial_checkpoint_path": initial_checkpoint_path}
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
                batch_size: int, adapters: Optional[Adapters] = None, **kwargs) -> dict:
  length_normalize = kwargs.pop("length_normalize", True)
  check_vocabulary(data, config)
  vocab = _vocabulary(data) if kind == "infer" else None
  tr, params, meta, data, bank = _load(data, adapters, config=config, **kwargs)
  created = not os.path.exists(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  path = _rows_file(output_dir, "scores" if kind == "score" else "predictions")
  count = 0
  batches = _batches(data, tr, batch_size)
  try:
    with files.atomic_open(path) as f:
      for row in _rows(tr, params, batches, batch_size, length_normalize):
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


def score(*, output_dir: str, config: T5Config, data: BatchSource, batch_size: int,
          **kwargs) -> dict:
  """Writes every choice's rank-classification score per example to `scores.jsonl`.

  kwargs: blocks, trainable, initial_checkpoint_path, checkpoint_path,
  partitioning, seed, use_task_id, length_normalize, max_choices_per_step,
  frozen_dtype, scan_layers, adapters (one per task: rows then name their `task`).
  """
  return _write_rows("score", output_dir=output_dir, config=config, data=data,
                     batch_size=batch_size, **kwargs)


def infer(*, output_dir: str, config: T5Config, data: BatchSource, batch_size: int,
          **kwargs) -> dict:
  """Writes the predicted choice (index, tokens, text) per example to `predictions.jsonl`
  (kwargs as `score`; with `adapters` each row names its `task`)."""
  return _write_rows("infer", output_dir=output_dir, config=config, data=data,
                     batch_size=batch_size, **kwargs)
