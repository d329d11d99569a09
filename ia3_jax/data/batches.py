"""Batches for the trainer and evaluator: numpy arrays in the rank-classification layout.

`get_batches(name, split, batch_size, feature_lengths)` reads a registered
seqio task or mixture: training streams are shuffled, repeated and resumable
(`start_step`); evaluation streams yield every example once, padded to full
batches with `example_mask` 0 rows. `SeqioBatches` is the same as a
`BatchSource`, the callable the train loop and the run kinds take (gin:
`train_data/batches.SeqioBatches`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import re
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
from ia3_jax import runtime

tf = runtime.import_tf()  # quietly, before seqio imports it
import seqio  # pylint: disable=g-import-not-at-top

from ia3_jax.data import features
from ia3_jax.data.features import Batch
from ia3_jax.data.feature_converters import (EOS_ID, RankClassificationFeatureConverter,
                                             TruncationStats)
from ia3_jax.data.registration import (RenderedSource, get_task_info, lookup, output_features,
                                       rows_dataset, select_first_template, tokenize_prompted)
from ia3_jax.data.task_registry import task_ids
from ia3_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SeqioBatches:
  """A `BatchSource` over a seqio task or mixture registered with `ia3_jax.data.registration`.

  feature_lengths: {"inputs": L, "targets": T, "num_choices": C} (T5X
  TASK_FEATURE_LENGTHS). Training streams (few-shot tasks) are shuffled with
  `seed` and repeat; evaluation streams yield every example once.
  `task_modules` are imported first (T5X MIXTURE_OR_TASK_MODULE). The
  built-in tasks are registered by the entry points (`ia3_jax.tasks.register_all()`).
  """

  name: str
  feature_lengths: Mapping[str, int]
  split: Optional[str] = None
  seed: int = 0
  shuffle: Optional[bool] = None
  repeat: Optional[bool] = None
  task_id_map: Optional[Mapping[str, int]] = None
  task_modules: Sequence[str] = ()

  def __post_init__(self):
    lengths = self.feature_lengths
    try:
      if not isinstance(lengths, Mapping) or not {"inputs", "targets"} <= set(lengths):
        raise ValueError("a dict with 'inputs', 'targets' (and 'num_choices') is needed")
      RankClassificationFeatureConverter()._lengths(dict(lengths))  # pylint: disable=protected-access
    except ValueError as e:
      raise ConfigError(f"TASK_FEATURE_LENGTHS={lengths!r}: {e}") from None

  def _import_task_modules(self) -> None:
    for module in self.task_modules:
      if not module:
        continue
      try:
        importlib.import_module(module)
      except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
          raise  # the module exists; something it imports does not
        raise ConfigError(f"MIXTURE_OR_TASK_MODULES: no module named {module!r} (a Python "
                          "module that registers your tasks, importable from PYTHONPATH)"
                          ) from None

  def __call__(self, *, batch_size: int, start_step: int = 0, shard_id: int = 0,
               num_shards: int = 1) -> Iterator[Batch]:
    self._import_task_modules()
    kwargs = dict(shuffle=self.shuffle, seed=self.seed, shard_id=shard_id, num_shards=num_shards,
                  repeat=self.repeat, task_id_map=self.task_id_map)
    if start_step:
      kwargs["start_step"] = start_step
    return get_batches(self.name, self.split, batch_size, dict(self.feature_lengths), **kwargs)

  def validate(self) -> int:
    """Renders every example of the split now (rendered rows are cached, so its batches reuse
    them), so that a bad example stops a run before its first training step instead of at its
    first evaluation; streamed splits are left to the stream. Returns the examples rendered."""
    self._import_task_modules()
    provider, info = lookup(self.name), get_task_info(self.name)
    split = self.split or (info.default_split if info is not None else None)
    return sum(_count(task, split) for task in _leaf_tasks(provider)
               if split in task.splits and isinstance(task.source, RenderedSource)
               and not task.source.streaming)

  def vocabulary(self) -> seqio.Vocabulary:
    """The vocabulary of the task's output features ("targets"): what decodes its tokens."""
    self._import_task_modules()
    return lookup(self.name).output_features["targets"].vocabulary

  def dataset_keys(self) -> tuple[str, ...]:
    """The dataset keys of the task or mixture's tasks, in order (what `task_id_map`
    maps to bank rows)."""
    self._import_task_modules()
    keys: list[str] = []
    for task in _leaf_tasks(lookup(self.name)):
      info = get_task_info(task.name)
      if info is None:
        raise DataError(f"{self.name}: task {task.name!r} is not registered by "
                        "ia3_jax.data.registration, so it has no dataset key")
      keys += [info.key] if info.key not in keys else []
    return tuple(keys)

  def task_ids(self) -> dict[str, int]:
    """The `task_id` each dataset's examples carry: its `task_id_map` row, else its global
    id (`data.task_ids`)."""
    ids, rows = task_ids(), self.task_id_map or {}
    return {k: rows.get(k, ids[k]) for k in self.dataset_keys()}

  def template_names(self) -> Optional[tuple[str, ...]]:
    """Names of the template ids in the batches (None for tasks not registered by ia3_jax.data.registration)."""
    self._import_task_modules()
    info = get_task_info(self.name)
    return info.template_names if info is not None else None


def _leaf_tasks(provider) -> list:
  if isinstance(provider, seqio.Mixture):
    return list(provider.tasks)  # already flattened, in mixture order
  return [provider]


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a partial batch with dummy rows (example_mask 0) that are still valid inputs."""
  n = batch["label"].shape[0]
  out = {}
  for key, value in batch.items():
    pad = np.zeros((batch_size - n,) + value.shape[1:], value.dtype)
    out[key] = np.concatenate([value, pad])
  if n < batch_size:
    out["task_id"][n:] = batch["task_id"][0] if n else 0
    out["encoder_input_tokens"][n:, 0] = EOS_ID
    out["choice_tokens"][n:, 0, 0] = EOS_ID
    out["choice_mask"][n:, 0] = 1
    out["example_id"][n:] = -1
    out["template_id"][n:] = -1
  out["example_mask"] = (np.arange(batch_size) < n).astype(np.int32)
  return out


class BatchIterator:
  """Iterator of numpy batches; `stats` counts truncation over the rows yielded so far."""

  def __init__(self, name: str, batches: Iterator[dict], stats: TruncationStats,
               num_batches: int | None, task_id_map: Mapping[str, int] | None):
    self.name = name
    self.stats = stats
    self.num_batches = num_batches  # known for evaluation; None when repeating
    self._batches = batches
    self._remap = None
    if task_id_map is not None:
      ids = task_ids()
      unknown = set(task_id_map) - set(ids)
      if unknown:
        raise DataError(f"task_id_map: unknown dataset keys {sorted(unknown)}")
      self._remap = {ids[k]: v for k, v in task_id_map.items()}
    self._reported = False

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    error = None
    try:
      batch = next(self._batches)
    except StopIteration:
      if not self._reported and self.stats.any_truncated:
        log.warning("%s", self.stats.report(self.name))
      self._reported = True
      raise
    except tf.errors.OpError as e:  # a failed check or a DataError raised inside tf.data
      error = DataError(f"{self.name}: {op_error_message(e)}")
    if error is not None:
      # Raised outside the `except`, after closing the stream: no reference to the
      # tf.data iterator survives, so its threads stop now (a live iterator whose
      # threads still run Python generators hangs the interpreter at exit).
      self.close()
      raise error
    self.stats.update(batch)
    if self._remap is not None:
      ids, real = batch["task_id"], batch["example_mask"].astype(bool)
      missing = set(np.unique(ids[real]).tolist()) - set(self._remap)
      if missing:
        raise DataError(f"{self.name}: task ids {sorted(missing)} not in task_id_map")
      fallback = min(self._remap.values())  # padding rows: any valid bank row
      batch["task_id"] = np.array([self._remap[i] if r else fallback for i, r in zip(ids.tolist(), real)],
                                  np.int32)
    return batch

  def truncation_report(self) -> str:
    return self.stats.report(self.name)

  def close(self) -> None:
    """Stops the underlying tf.data pipeline (later `next` calls end the iteration)."""
    close = getattr(self._batches, "close", None)
    if close is not None:
      close()
    self._batches = iter(())


def op_error_message(error: tf.errors.OpError) -> str:
  """The first line of a tf.data error, or of the DataError raised inside it.

  A DataError raised by a generator or `py_function` reaches the caller wrapped
  in TF's text ("{{function_node ...}} DataError: file, line 6: ...\nTraceback
  ..."); this returns just "file, line 6: ...".
  """
  text = error.message or str(error)
  m = re.search(r"DataError: (.+)", text)
  line = m.group(1) if m else (text.strip().splitlines() or [""])[0]
  return re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line).strip()


def _converted(ds, feature_lengths, lm_only):
  converter = RankClassificationFeatureConverter(lm_only=lm_only)
  return converter(ds, dict(feature_lengths))


def get_batches(name: str, split: str | None, batch_size: int, feature_lengths: Mapping[str, int],
                *, shuffle: bool | None = None, seed: int = 0, shard_id: int = 0,
                num_shards: int = 1, repeat: bool | None = None, start_step: int = 0,
                lm_only: bool | None = None, task_id_map: Mapping[str, int] | None = None
                ) -> BatchIterator:
  """Numpy batches of a seqio task or mixture in the rank-classification layout.

  Training (the default for `*_fewshot_seed*` / `*_train` tasks and their
  mixtures): shuffled with `seed`, repeated, full batches only; the stream is a
  pure function of (name, split, batch size, lengths, seed, shard), so
  `start_step=n` resumes exactly where n batches were consumed.

  Evaluation (the default for other tasks): every example once, in order,
  mixtures task after task; the last batch is padded with `example_mask` 0
  rows, and every shard yields the same number of batches.

  Args:
    name: seqio task or mixture name.
    split: split; None picks the task's default (training: "train"; evaluation:
      the dataset's evaluation split, e.g. ANLI's test split).
    batch_size: rows per batch (per shard).
    feature_lengths: {"inputs": L, "targets": T, "num_choices": C}.
    shuffle, repeat: override the training/evaluation defaults.
    seed: shuffling and template-drawing seed.
    shard_id, num_shards: this host's shard.
    start_step: batches to skip (training resume).
    lm_only: LM layout (C=1, the choice is the target, label 0); default: True
      when feature_lengths["num_choices"] == 1.
    task_id_map: dataset key -> row of the task bank (default: global ids).
  """
  provider = lookup(name)
  info = get_task_info(name)
  if split is None:
    if info is None:
      raise DataError(f"{name!r} is not registered by ia3_jax.data.registration: pass split explicitly")
    split = info.default_split
  training = info is not None and info.kind == "train"
  shuffle = training if shuffle is None else shuffle
  repeat = training if repeat is None else repeat
  if batch_size < 1 or not 0 <= shard_id < num_shards:
    raise ValueError(f"bad batch_size={batch_size} or shard {shard_id}/{num_shards}")
  if lm_only is None:
    lm_only = feature_lengths.get("num_choices") == 1
  lengths = dict(feature_lengths)
  probe = RankClassificationFeatureConverter(lm_only=lm_only)
  length, target_length, c = probe._lengths(lengths)  # validates early  # pylint: disable=protected-access
  stats = TruncationStats(length, target_length, c)
  lengths["num_choices"] = c
  for task in _leaf_tasks(provider):
    if split not in task.splits:
      raise DataError(f"{name}: task {task.name!r} has no split {split!r}; splits {list(task.splits)}")

  if repeat or shuffle:
    ds = _stream(provider, split, shuffle, seed, shard_id, num_shards, repeat)
    ds = _converted(ds, lengths, lm_only).batch(batch_size, drop_remainder=True).skip(start_step)
    batches = (_pad_batch(b, batch_size) for b in ds.as_numpy_iterator())
    return BatchIterator(name, batches, stats, None, task_id_map)
  if start_step:
    raise ValueError("start_step applies to training streams (repeat or shuffle)")
  batches, num_batches = _eval_batches(provider, split, batch_size, lengths, lm_only,
                                       shard_id, num_shards)
  return BatchIterator(name, batches, stats, num_batches, task_id_map)


def _stream(provider, split, shuffle, seed, shard_id, num_shards, repeat):
  kwargs = dict(sequence_length=None, split=split, shuffle=shuffle, seed=seed,
                shard_info=seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None,
                num_epochs=None if repeat else 1, trim_output_features=False)
  ds = provider.get_dataset(**kwargs)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _task_dataset(task, split):
  return task.get_dataset(sequence_length=None, split=split, shuffle=False, seed=0,
                          num_epochs=1, trim_output_features=False)


def _count(task, split) -> int:
  size = None
  if isinstance(task.source, RenderedSource) and not task.source.streaming:
    size = len(task.source.rows(split))
  if size is None:
    size = int(_task_dataset(task, split).reduce(0, lambda n, _: n + 1))
  return size


def _eval_dataset(tasks, split):
  """Every example of every task once, task after task (unconverted)."""
  infos = [get_task_info(t.name) for t in tasks]
  if all(i is not None and i.kind == "eval" for i in infos) and len({id(i.vocabulary) for i in infos}) == 1:
    # Our evaluation tasks: one pipeline over all their rendered rows, with the same
    # preprocessors seqio would run per task (tracing one pipeline, not one per template).
    rows = [row for t in tasks for row in t.source.rows(split)]
    ds = select_first_template(rows_dataset(rows, 1))
    return tokenize_prompted(ds, output_features(infos[0].vocabulary))
  keep = set(output_features(seqio.PassThroughVocabulary(0)))
  select = tf.autograph.experimental.do_not_convert(lambda ex: {k: v for k, v in ex.items() if k in keep})
  datasets = [_task_dataset(t, split).map(select) for t in tasks]
  return functools.reduce(lambda a, b: a.concatenate(b), datasets)


def _eval_batches(provider, split, batch_size, lengths, lm_only, shard_id, num_shards):
  tasks = _leaf_tasks(provider)
  total = sum(_count(t, split) for t in tasks)
  ds = _converted(_eval_dataset(tasks, split), lengths, lm_only)
  if num_shards > 1:
    ds = ds.shard(num_shards, shard_id)
  num_batches = math.ceil(math.ceil(total / num_shards) / batch_size)
  ds = ds.batch(batch_size)

  def gen():
    count = 0
    template = None
    for batch in ds.as_numpy_iterator():
      template = batch
      count += 1
      yield _pad_batch(batch, batch_size)
    if template is None:
      template = _empty_batch(lengths, lm_only)
    empty = {k: v[:0] for k, v in template.items()}
    for _ in range(count, num_batches):
      yield _pad_batch(empty, batch_size)
  return gen(), num_batches


def _empty_batch(lengths, lm_only) -> dict[str, np.ndarray]:
  c = 1 if lm_only else lengths["num_choices"]
  return features.empty_batch({"L": lengths["inputs"], "T": lengths["targets"], "C": c})


def truncation_report(name: str, split: str | None, feature_lengths: Mapping[str, int], *,
                      lm_only: bool | None = None) -> TruncationStats:
  """One pass over a split (no shuffling or repeat) counting what the lengths would cut."""
  it = get_batches(name, split, 64, feature_lengths, shuffle=False, repeat=False, lm_only=lm_only)
  for _ in it:
    pass
  return it.stats
