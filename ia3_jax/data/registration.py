"""seqio glue: registering few-shot prompted tasks (the batches are `ia3_jax.data.batches`).

Registering a dataset (`register_dataset`, or `register_task` for a user's
JSONL/CSV files or lists) creates these seqio tasks and mixtures:

  {key}_fewshot_seed{S}   training: the k few-shot examples for seed S, one
                          random template per example each time it is drawn
                          (only split "train")
  {key}_train             training on the whole train split (when num_shots is None)
  {key}_eval_{template}   evaluation: one task per template, every split of the source
  {key}_eval              mixture of all of the dataset's evaluation tasks

Every task yields `inputs`, `targets` (the correct choice), `choices`,
`label`, `task_id`, `template_id`, `example_id`; `RankClassificationFeatureConverter`
turns them into the batch layout.

Task ids (`data.task_registry`) and the vocabulary of tasks registered without one
(`data.vocabularies`) have their own modules; this one registers and renders.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
import threading
from typing import Any, Iterator, Mapping, Sequence

from ia3_jax import runtime

tf = runtime.import_tf()  # quietly, before seqio imports it
import seqio  # pylint: disable=g-import-not-at-top

from ia3_jax.data import fewshot
from ia3_jax.data.sources import CsvSource, InMemorySource, JsonlSource, Record, Source
from ia3_jax.data.task_registry import register_task_id
from ia3_jax.data.templates import DataError, Template, TemplateSet, load_templates
from ia3_jax.data.vocabularies import default_vocabulary
from ia3_jax.errors import EmptyRenderError

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[a-z0-9_]+$")

# --------------------------------------------------------------------------- specs

@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A dataset with its templates and few-shot setup.

  Attributes:
    key: short lower-case name; prefixes every task name.
    source: where the examples come from.
    templates: the template set (or the path of a template file).
    train_split: source split few-shot (or full) training examples come from.
    eval_split: source split `get_batches` evaluates on by default.
    num_shots: k few-shot examples per seed; None trains on the whole train split.
    seeds: few-shot seeds, one training task each.
    num_choices: expected number of answer choices (checked for every example).
    unlabeled_splits: splits without labels (targets empty, label -1).
    task_id: fixed task id (None: assigned, see module doc).
    skip_empty_renders: a template that renders an empty input or target for an
      example is skipped for that example (counted and logged) instead of failing;
      for promptsource's question-specific templates (COPA's "cause"-only ones).
  """
  key: str
  source: Source
  templates: TemplateSet | str
  train_split: str = "train"
  eval_split: str = "validation"
  num_shots: int | None = None
  seeds: tuple[int, ...] = fewshot.TFEW_SEEDS
  num_choices: int | None = None
  unlabeled_splits: frozenset[str] = frozenset()
  task_id: int | None = None
  skip_empty_renders: bool = False


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What `get_batches` knows about a task or mixture registered here."""
  name: str
  key: str
  kind: str                  # "train" or "eval"
  default_split: str
  template_names: tuple[str, ...]
  task_id: int
  vocabulary: Any


_INFO: dict[str, TaskInfo] = {}
_RENDERERS: dict[str, Any] = {}  # task name -> split -> rendered rows
_LOCK = threading.Lock()


def get_task_info(name: str) -> TaskInfo | None:
  """Our metadata for a registered task or mixture (None for foreign seqio ones)."""
  return _INFO.get(name)


def dataset_template_names(key: str) -> tuple[str, ...] | None:
  """Names of dataset `key`'s templates by template id (None: not registered here)."""
  info = _INFO.get(f"{key}_eval")  # every template's evaluation task, in template order
  return info.template_names if info is not None and info.key == key else None


def rendered_examples(name: str, split: str | None = None) -> list[dict]:
  """The rendered rows of a task registered here (before tokenization), for inspection.

  Each row holds, per template the task renders (all of them for training
  tasks, one for evaluation tasks): `inputs`, `targets`, `choices`, `label`,
  `template_id`; plus `example_id` and `task_id`.
  """
  if name not in _RENDERERS:
    raise DataError(f"{name!r} is not a task registered by ia3_jax.data")
  return _RENDERERS[name](split or _INFO[name].default_split)


def registered_names(key: str | None = None) -> list[str]:
  """Names of the tasks and mixtures registered here (of one dataset key if given)."""
  return sorted(n for n, i in _INFO.items() if key is None or i.key == key)


# --------------------------------------------------------------------------- rendering

_RECORD_CACHE: dict[tuple, tuple[Source, list[Record]]] = {}
_ROW_CACHE: dict[tuple, tuple[DatasetSpec, TemplateSet, list[dict]]] = {}


def clear_cache() -> None:
  """Forgets loaded and rendered examples (e.g. after the data files changed)."""
  _RECORD_CACHE.clear()
  _ROW_CACHE.clear()


# Cache entries keep the objects whose ids are in their keys alive, so ids are not reused.
def _records(spec: DatasetSpec, split: str) -> list[Record]:
  key = (id(spec.source), split)
  with _LOCK:
    if key not in _RECORD_CACHE:
      _RECORD_CACHE[key] = (spec.source, spec.source.load(split))
    return _RECORD_CACHE[key][1]


def _renders(spec: DatasetSpec, templates: Sequence[Template], template_ids: Sequence[int],
             record: Record, labeled: bool) -> tuple[list, list[int]]:
  """(template, render) per template slot, and the slots' template ids.

  With `spec.skip_empty_renders`, a slot whose template renders empty takes a
  valid render of another template of the row (its id with it), so rows keep
  one slot per template; no valid render at all gives `([], [])`.
  """
  out, ids = [], []
  for template, tid in zip(templates, template_ids):
    try:
      out.append((template, template.render(record.fields, where=record.where, labeled=labeled)))
      ids.append(tid)
    except EmptyRenderError:
      if not spec.skip_empty_renders:
        raise
      out.append(None)
      ids.append(None)
  valid = [i for i, r in enumerate(out) if r is not None]
  if not valid:
    return [], []
  for i, r in enumerate(out):
    if r is None:
      j = valid[i % len(valid)]
      out[i], ids[i] = out[j], ids[j]
  return out, ids


def _render_row(spec: DatasetSpec, templates: Sequence[Template], template_ids: Sequence[int],
                record: Record, labeled: bool, tid: int) -> dict:
  rendered, kept_ids = _renders(spec, templates, template_ids, record, labeled)
  if not rendered:
    return None
  row = {"inputs": [], "targets": [], "choices": [], "label": [], "template_id": kept_ids,
         "example_id": record.index, "task_id": tid}
  for template, r in rendered:
    choices = list(r.choices) if r.choices is not None else [r.target]
    if spec.num_choices is not None and len(choices) != spec.num_choices:
      raise DataError(f"{record.where}: {template.location}: renders {len(choices)} answer "
                      f"choices; dataset {spec.key!r} expects {spec.num_choices}: {choices}")
    row["inputs"].append(r.inputs)
    row["targets"].append(r.target)
    row["choices"].append(choices)
    row["label"].append(r.label if r.choices is not None or not labeled else 0)
  return row


def _rows(spec: DatasetSpec, templates: TemplateSet, template_idx: Sequence[int], split: str,
          shots: tuple[int | None, int] | None, tid: int) -> list[dict]:
  """Rendered rows of a split (optionally a few-shot sample), cached."""
  key = (id(spec), id(templates), split, tuple(template_idx), shots)
  with _LOCK:
    cached = _ROW_CACHE.get(key)
  if cached is not None:
    return cached[2]
  records = _records(spec, split)
  if shots is not None:
    records = fewshot.sample(records, shots[0], shots[1], what=f"{spec.source.name} split {split!r}")
  chosen = [templates.templates[i] for i in template_idx]
  labeled = split not in spec.unlabeled_splits
  rows = [_render_row(spec, chosen, template_idx, r, labeled, tid) for r in records]
  rows = _without_empty(rows, spec, split, [templates.templates[i].name for i in template_idx])
  with _LOCK:
    _ROW_CACHE[key] = (spec, templates, rows)
  return rows


def _without_empty(rows: list, spec: DatasetSpec, split: str, names: Sequence[str]) -> list[dict]:
  """Drops examples no template renders, logging how many renders were skipped."""
  kept = [r for r in rows if r is not None]
  if not spec.skip_empty_renders:
    return kept
  skipped = sum(len(names) - len(set(r["template_id"])) for r in kept) + (
      len(names) * (len(rows) - len(kept)))
  if skipped:
    log.warning("%s split %r: %d of %d renders empty (question-specific templates among %s) "
                "were skipped; %d of %d examples have no valid template and were dropped",
                spec.key, split, skipped, len(names) * len(rows), list(names),
                len(rows) - len(kept), len(rows))
  if not kept and rows:
    raise DataError(f"{spec.key} split {split!r}: no template among {list(names)} renders any of "
                    f"its {len(rows)} examples")
  return kept


def _stream_rows(spec: DatasetSpec, templates: TemplateSet, template_idx: Sequence[int], split: str,
                 tid: int) -> Iterator[dict]:
  """Rendered rows of a whole split, read and rendered lazily."""
  chosen = [templates.templates[i] for i in template_idx]
  labeled = split not in spec.unlabeled_splits
  for record in spec.source.iterate(split):
    row = _render_row(spec, chosen, template_idx, record, labeled, tid)
    if row is not None:
      yield row


def rows_dataset(rows: Sequence[dict], num_templates: int):
  """Rows -> tf.data with choices stored flat (rebuilt as ragged by `_pick`)."""
  flat, counts = [], []
  for row in rows:
    counts.append([len(c) for c in row["choices"]])
    flat.append([x for c in row["choices"] for x in c])
  n = len(rows)
  features = {
      "inputs": tf.constant([r["inputs"] for r in rows], tf.string, shape=[n, num_templates]),
      "targets": tf.constant([r["targets"] for r in rows], tf.string, shape=[n, num_templates]),
      "choices_flat": tf.ragged.constant(flat, dtype=tf.string, ragged_rank=1) if n else
                      tf.RaggedTensor.from_row_lengths(tf.constant([], tf.string), tf.zeros([0], tf.int64)),
      "choices_count": tf.constant(counts, tf.int32, shape=[n, num_templates]),
      "label": tf.constant([r["label"] for r in rows], tf.int32, shape=[n, num_templates]),
      "template_id": tf.constant([r["template_id"] for r in rows], tf.int32, shape=[n, num_templates]),
      "example_id": tf.constant([r["example_id"] for r in rows], tf.int32, shape=[n]),
      "task_id": tf.constant([r["task_id"] for r in rows], tf.int32, shape=[n]),
  }
  return tf.data.Dataset.from_tensor_slices(features)


def _row_signature(num_templates: int) -> dict:
  return {"inputs": tf.TensorSpec([num_templates], tf.string),
          "targets": tf.TensorSpec([num_templates], tf.string),
          "choices_flat": tf.TensorSpec([None], tf.string),
          "choices_count": tf.TensorSpec([num_templates], tf.int32),
          "label": tf.TensorSpec([num_templates], tf.int32),
          "template_id": tf.TensorSpec([num_templates], tf.int32),
          "example_id": tf.TensorSpec([], tf.int32), "task_id": tf.TensorSpec([], tf.int32)}


def _row_tensors(row: dict) -> dict:
  return {"inputs": row["inputs"], "targets": row["targets"],
          "choices_flat": [x for c in row["choices"] for x in c],
          "choices_count": [len(c) for c in row["choices"]], "label": row["label"],
          "template_id": row["template_id"], "example_id": row["example_id"], "task_id": row["task_id"]}


class RenderedSource(seqio.FunctionDataSource):
  """A FunctionDataSource over rendered rows.

  Materialized (few-shot samples, evaluation splits: errors surface when the
  dataset is built, sizes are known) or streamed (whole training splits:
  examples are read and rendered as the pipeline pulls them).
  """

  def __init__(self, rows_fn, splits, num_templates: int, stream_fn=None):
    def dataset_fn(split, shuffle_files=False):
      del shuffle_files
      if stream_fn is not None:
        gen = lambda: (_row_tensors(row) for row in stream_fn(split))
        return tf.data.Dataset.from_generator(gen, output_signature=_row_signature(num_templates))
      return rows_dataset(rows_fn(split), num_templates)
    super().__init__(dataset_fn=dataset_fn, splits=splits)
    self.rows = rows_fn
    self.streaming = stream_fn is not None

  def num_input_examples(self, split: str) -> int | None:
    return None if self.streaming else len(self.rows(split))

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **unused):
    if shard_info and shard_info.num_shards > 1:
      raise ValueError("shard with tf.data.Dataset.shard")  # seqio shards examples itself
    return self._dataset_fn(split=split, shuffle_files=shuffle)


# --------------------------------------------------------------------------- preprocessors

def _pick(ex, i):
  choices = tf.RaggedTensor.from_row_lengths(ex["choices_flat"], ex["choices_count"])
  return {"inputs": ex["inputs"][i], "targets": ex["targets"][i], "choices": choices[i],
          "label": ex["label"][i], "template_id": ex["template_id"][i],
          "example_id": ex["example_id"], "task_id": ex["task_id"]}


@seqio.map_over_dataset(num_seeds=1)
@tf.autograph.experimental.do_not_convert
def select_random_template(ex, seed):
  """Keeps one template per example, drawn with a seqio-managed stateless seed."""
  n = tf.shape(ex["inputs"])[0]
  return _pick(ex, tf.random.stateless_uniform([], seed=seed, maxval=n, dtype=tf.int32))


@seqio.map_over_dataset
@tf.autograph.experimental.do_not_convert
def select_first_template(ex):
  """Keeps the (only) rendered template."""
  return _pick(ex, 0)


def tokenize_prompted(dataset, output_features):
  """Tokenizes inputs, targets and every choice; appends EOS to each."""
  def fn(ex):
    out = dict(ex)
    for key in ("inputs", "targets", "choices"):
      feature = output_features[key]
      tokens = feature.vocabulary.encode_tf(ex[key])
      if key == "choices":
        eos = tf.fill([tokens.nrows(), 1], tf.constant(feature.vocabulary.eos_id, tokens.dtype))
        tokens = tf.concat([tokens, tf.RaggedTensor.from_tensor(eos)], axis=1)
      else:
        tokens = tf.concat([tokens, [feature.vocabulary.eos_id]], axis=0)
      out[key] = tokens
      out[f"{key}_pretokenized"] = ex[key]
    return out
  return dataset.map(tf.autograph.experimental.do_not_convert(fn), num_parallel_calls=tf.data.AUTOTUNE)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """The output features of every prompted task."""
  ints = seqio.PassThroughVocabulary(size=0)
  scalar = functools.partial(seqio.Feature, ints, add_eos=False, dtype=tf.int32, rank=0)
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary, add_eos=True),
      "choices": seqio.Feature(vocabulary, add_eos=True, rank=2),
      "label": scalar(), "task_id": scalar(), "template_id": scalar(), "example_id": scalar(),
  }


# --------------------------------------------------------------------------- registration

@dataclasses.dataclass(frozen=True)
class Registered:
  """Names created by `register_dataset`."""
  train: tuple[str, ...]
  eval: tuple[str, ...]
  eval_mixture: str


def _remove(name: str) -> None:
  seqio.TaskRegistry.remove(name)
  seqio.MixtureRegistry.remove(name)
  _INFO.pop(name, None)
  _RENDERERS.pop(name, None)


def _add_task(name, info: TaskInfo, source, preprocessors, vocabulary, replace: bool):
  if replace:
    _remove(name)
  elif name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
    raise ValueError(f"seqio task or mixture {name!r} already registered")
  seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                         output_features=output_features(vocabulary), metric_fns=[])
  _INFO[name] = info
  _RENDERERS[name] = source.rows


def add_mixture(name: str, tasks: Sequence[str], *, kind: str, default_split: str,
                rates: Sequence[float] | None = None, replace: bool = True) -> str:
  """Registers a seqio mixture of tasks registered here (equal rates by default)."""
  infos = [_INFO.get(t) for t in tasks]
  if any(i is None for i in infos):
    raise DataError(f"mixture {name!r}: unknown tasks {[t for t, i in zip(tasks, infos) if i is None]}")
  if replace:
    _remove(name)
  entries = list(zip(tasks, rates)) if rates is not None else list(tasks)
  seqio.MixtureRegistry.add(name, entries, default_rate=None if rates is not None else 1.0)
  keys = {i.key for i in infos}
  _INFO[name] = TaskInfo(name, keys.pop() if len(keys) == 1 else name, kind, default_split,
                         tuple(n for i in infos for n in i.template_names),
                         infos[0].task_id if len(keys) <= 1 else -1, infos[0].vocabulary)
  return name


def register_dataset(spec: DatasetSpec, vocabulary: seqio.Vocabulary | None = None, *,
                     replace: bool = True) -> Registered:
  """Registers the training tasks, evaluation tasks and evaluation mixture of `spec`."""
  if not _KEY_RE.match(spec.key):
    raise ValueError(f"dataset key {spec.key!r} must match {_KEY_RE.pattern}")
  vocabulary = vocabulary or default_vocabulary()
  templates = spec.templates if isinstance(spec.templates, TemplateSet) else load_templates(spec.templates)
  if replace:  # forget this dataset's earlier tasks (e.g. registered with other templates)
    for name in registered_names(spec.key):
      _remove(name)
  tid = register_task_id(spec.key, spec.task_id)
  names_all = tuple(t.name for t in templates)
  for split in (spec.train_split, spec.eval_split):
    if split not in spec.source.splits:
      raise DataError(f"dataset {spec.key!r}: split {split!r} not in source {spec.source.name} "
                      f"(splits {list(spec.source.splits)})")

  all_idx = tuple(range(len(templates)))
  train_names = []
  if spec.num_shots is None:
    runs = [(f"{spec.key}_train", None)]
  else:
    runs = [(f"{spec.key}_fewshot_seed{seed}", (spec.num_shots, seed)) for seed in spec.seeds]
  for name, shots in runs:
    rows_fn = lambda split, _shots=shots: _rows(spec, templates, all_idx, spec.train_split, _shots, tid)
    stream_fn = None
    if shots is None:  # a whole training split: stream it
      stream_fn = lambda split: _stream_rows(spec, templates, all_idx, spec.train_split, tid)
    _add_task(name, TaskInfo(name, spec.key, "train", "train", names_all, tid, vocabulary),
              RenderedSource(rows_fn, ["train"], len(all_idx), stream_fn),
              [select_random_template, tokenize_prompted], vocabulary, replace)
    train_names.append(name)

  eval_names = []
  for i, template in enumerate(templates):
    name = f"{spec.key}_eval_{template.slug}"
    rows_fn = lambda split, _i=i: _rows(spec, templates, (_i,), split, None, tid)
    _add_task(name, TaskInfo(name, spec.key, "eval", spec.eval_split, (template.name,), tid, vocabulary),
              RenderedSource(rows_fn, list(spec.source.splits), 1),
              [select_first_template, tokenize_prompted], vocabulary, replace)
    eval_names.append(name)
  mixture = add_mixture(f"{spec.key}_eval", eval_names, kind="eval", default_split=spec.eval_split,
                        replace=replace)
  return Registered(tuple(train_names), tuple(eval_names), mixture)


def register_task(key: str, data: Mapping[str, Any], templates: str | TemplateSet, *,
                  vocabulary: seqio.Vocabulary | None = None, num_shots: int | None = None,
                  seeds: Sequence[int] = (0,), train_split: str = "train",
                  eval_split: str = "validation", num_choices: int | None = None,
                  unlabeled_splits: Sequence[str] = (), task_id: int | None = None,
                  replace: bool = True) -> Registered:
  """Registers a user's dataset in one call.

  Args:
    key: dataset name (lower case, digits, underscores).
    data: split -> a `.jsonl` / `.csv` path, or a list of dicts (or a `Source`
      under the key "source").
    templates: template file path (promptsource format) or a TemplateSet.
    vocabulary: None (default): the model's own, looked up when the task first tokenizes
      (`default_vocabulary`: the run's INITIAL_CHECKPOINT_PATH, $IA3_JAX_SPM_PATH, ...).
    num_shots: k examples per few-shot seed; None trains on the whole split.
    seeds: few-shot seeds (one training task `{key}_fewshot_seed{S}` each).
    Other args: see `DatasetSpec`.
  """
  source = data.get("source") if isinstance(data.get("source"), Source) else _source_for(key, data)
  spec = DatasetSpec(key=key, source=source, templates=templates, train_split=train_split,
                     eval_split=eval_split if eval_split in source.splits else train_split,
                     num_shots=num_shots, seeds=tuple(seeds), num_choices=num_choices,
                     unlabeled_splits=frozenset(unlabeled_splits), task_id=task_id)
  return register_dataset(spec, vocabulary, replace=replace)


def _source_for(key: str, data: Mapping[str, Any]) -> Source:
  if all(isinstance(v, (list, tuple)) for v in data.values()):
    return InMemorySource(key, data)
  paths = {s: os.fspath(p) for s, p in data.items()}
  exts = {os.path.splitext(p)[1].lower() for p in paths.values()}
  if exts <= {".jsonl", ".json"}:
    return JsonlSource(paths, name=key)
  if exts == {".csv"}:
    return CsvSource(paths, name=key)
  if exts == {".tsv"}:
    return CsvSource(paths, name=key, delimiter="\t")
  raise DataError(f"dataset {key!r}: files must all be .jsonl, .csv or .tsv, got {sorted(paths.values())}")


def lookup(name: str):
  """The seqio task or mixture `name`, or a DataError naming it (with close matches)."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    pass
  names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
  hint = f"; did you mean {close}?" if close else ""
  raise DataError(f"unknown task or mixture name {name!r}{hint} ({len(names)} registered; "
                  "built-in tasks need ia3_jax.tasks.register_all())")
