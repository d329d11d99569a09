"""Few-shot evaluation metrics: accuracy, then median and IQR over templates x seeds.

The T-Few protocol: evaluate every prompt template of a dataset for every
few-shot seed, then report the median accuracy over all (template, seed)
runs and its interquartile range. Everything here is host-side NumPy.

Quantiles use NumPy's default "linear" interpolation (`np.percentile(...,
method="linear")`, type 7 of Hyndman and Fan): the q-th quantile of n sorted
values sits at position q * (n - 1) and is interpolated linearly between its
neighbours. IQR = q75 - q25.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Hashable, Mapping, Optional, Sequence, Union

import numpy as np

from ia3_jax import files

PathLike = Union[str, pathlib.Path]
Results = Mapping[str, Mapping[Hashable, float]]  # {template_or_task: {seed: accuracy}}

QUANTILE_METHOD = "linear"


def accuracy_counts(predictions: Any, labels: Any,
                    example_mask: Optional[Any] = None) -> tuple[int, int]:
  """(number correct, number counted) over rows with example_mask != 0.

  Raises ValueError on mismatched shapes or a negative (unlabelled) label in
  a counted row: unlabelled rows must be masked out by the caller.
  """
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape or predictions.ndim != 1:
    raise ValueError(f"predictions {predictions.shape} and label {labels.shape} must both be [B]")
  mask = (np.ones(labels.shape, bool) if example_mask is None
          else np.asarray(example_mask).astype(bool))
  if mask.shape != labels.shape:
    raise ValueError(f"example_mask shape {mask.shape} != label shape {labels.shape}")
  if np.any(labels[mask] < 0):
    raise ValueError(f"label has {int(np.sum(labels[mask] < 0))} negative (unlabelled) entries "
                     "in rows counted by example_mask; mask them out")
  return int(np.sum((predictions == labels) & mask)), int(np.sum(mask))


def accuracy(predictions: Any, labels: Any, example_mask: Optional[Any] = None) -> float:
  """Fraction of counted rows (example_mask != 0) whose prediction equals the label.

  NaN when no row is counted.
  """
  correct, total = accuracy_counts(predictions, labels, example_mask)
  return correct / total if total else math.nan


def _stats(values: Sequence[float]) -> dict[str, float]:
  x = np.asarray(values, np.float64)
  q25, median, q75 = np.percentile(x, [25, 50, 75], method=QUANTILE_METHOD)
  return {"median": float(median), "iqr": float(q75 - q25), "q25": float(q25),
          "q75": float(q75), "mean": float(np.mean(x)), "std": float(np.std(x)),
          "min": float(np.min(x)), "max": float(np.max(x)), "num_runs": int(x.size)}


def summarize(results: Results) -> dict[str, Any]:
  """Median, IQR (and mean, std, min, max) over every (template, seed) accuracy.

  Args:
    results: {template_or_task_name: {seed: accuracy}}; seeds need not be the
      same for every template. Accuracies must be finite.

  Returns:
    dict with the pooled statistics (median, iqr, q25, q75, mean, std, min,
    max, num_runs), num_templates, seeds (sorted, as given), per_template
    {name: {median, mean, ..., accuracies: {seed: acc}}} over that template's
    seeds, and per_seed {seed: statistics over templates}.
  """
  if not results:
    raise ValueError("summarize: results is empty")
  values, per_seed = [], {}
  per_template = {}
  for name, by_seed in results.items():
    if not by_seed:
      raise ValueError(f"summarize: template {name!r} has no seed results")
    for seed, acc in by_seed.items():
      acc = float(acc)
      if not math.isfinite(acc):
        raise ValueError(f"summarize: accuracy of template {name!r}, seed {seed!r} is {acc}")
      values.append(acc)
      per_seed.setdefault(seed, []).append(acc)
    per_template[str(name)] = dict(_stats(list(by_seed.values())),
                                   accuracies={_key(s): float(a) for s, a in by_seed.items()})
  seeds = sorted(per_seed, key=_sort_key)
  return dict(_stats(values), num_templates=len(results), seeds=[_key(s) for s in seeds],
              per_template=per_template,
              per_seed={_key(s): _stats(per_seed[s]) for s in seeds})


def _key(seed: Hashable) -> Any:
  """Seeds stay ints (or strings); NumPy integers become ints, anything else a string."""
  if isinstance(seed, (int, np.integer)):
    return int(seed)
  return seed if isinstance(seed, str) else str(seed)


def _sort_key(seed: Hashable) -> tuple:
  return (0, seed, "") if isinstance(seed, (int, np.integer)) else (1, 0, str(seed))


def write_results_json(path: PathLike, summaries: Mapping[str, Any], *,
                       metadata: Optional[Mapping[str, Any]] = None) -> pathlib.Path:
  """Writes {"results": summaries, "metadata": ...} as JSON (parents created).

  `summaries` is usually {dataset: summarize(...)}. Keys become strings (JSON),
  NumPy values become Python numbers, and NaN/inf become null.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  doc = {"results": summaries, "metadata": dict(metadata or {}),
         "quantile_method": f"numpy.percentile method={QUANTILE_METHOD!r}"}
  return files.write_json(path, doc, sort_keys=True)


def _pct(x: float, digits: int) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def markdown_table(summaries: Mapping[str, Mapping[str, Any]], *, digits: int = 1) -> str:
  """One row per dataset: median and IQR accuracy (percent) over templates x seeds.

  `summaries` maps a dataset (or task) name to the output of `summarize`.
  """
  lines = ["| Dataset | Median acc. (%) | IQR | Q25 | Q75 | Mean | Templates | Seeds | Runs |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, s in summaries.items():
    lines.append(f"| {name} | {_pct(s['median'], digits)} | {_pct(s['iqr'], digits)} | "
                 f"{_pct(s['q25'], digits)} | {_pct(s['q75'], digits)} | "
                 f"{_pct(s['mean'], digits)} | {s['num_templates']} | {len(s['seeds'])} | "
                 f"{s['num_runs']} |")
  return "\n".join(lines) + "\n"


def template_table(summary: Mapping[str, Any], *, digits: int = 1) -> str:
  """One row per template, one column per seed (accuracy in percent), then the median."""
  seeds = list(summary["seeds"])
  lines = ["| Template | " + " | ".join(f"seed {s}" for s in seeds) + " | Median |",
           "|---|" + "---|" * (len(seeds) + 1)]
  for name, t in summary["per_template"].items():
    accs = t["accuracies"]
    cells = [_pct(accs[s], digits) if s in accs else "" for s in map(_key, seeds)]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(t['median'], digits)} |")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- eval counts

NO_ID = -1  # the task or template id of rows that carry none


@dataclasses.dataclass
class EvalCounts:
  """The counts of a rank-classification pass: correct and counted rows per (task_id,
  template_id) group (`NO_ID` where a batch carries none), plus the rows left out.

  One typed home for what an eval reports: `add` counts a batch, `merge` adds another
  pass, `summed_over_processes` all-reduces over hosts (each evaluates its shard), and
  `as_dict` gives the result dict (accuracy, num_correct, num_examples, num_unlabelled,
  num_batches, num_identical_choices, per_template, per_task) that eval files hold.
  """

  groups: dict[tuple[int, int], list[int]] = dataclasses.field(default_factory=dict)
  num_unlabelled: int = 0
  num_identical_choices: int = 0
  num_batches: int = 0

  def add(self, predictions: np.ndarray, labels: np.ndarray, counted: np.ndarray,
          task_id: Optional[np.ndarray] = None, template_id: Optional[np.ndarray] = None) -> None:
    """Counts the `counted` rows of one batch by (task_id, template_id)."""
    ids = [np.full(labels.shape, NO_ID) if a is None else np.maximum(np.asarray(a), NO_ID)
           for a in (task_id, template_id)]
    keys = np.stack(ids, axis=1)
    for key in np.unique(keys[counted], axis=0):
      c, n = accuracy_counts(predictions, labels, counted & np.all(keys == key, axis=1))
      acc = self.groups.setdefault((int(key[0]), int(key[1])), [0, 0])
      acc[0] += c
      acc[1] += n

  def merge(self, other: "EvalCounts") -> "EvalCounts":
    out = EvalCounts({k: list(v) for k, v in self.groups.items()},
                     self.num_unlabelled + other.num_unlabelled,
                     self.num_identical_choices + other.num_identical_choices,
                     self.num_batches + other.num_batches)
    for key, (c, n) in other.groups.items():
      acc = out.groups.setdefault(key, [0, 0])
      acc[0] += c
      acc[1] += n
    return out

  def summed_over_processes(self) -> "EvalCounts":
    """The counts summed over all processes (a no-op with one); `num_batches` stays this
    process's."""
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
      return self
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    gather = lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x)))  # noqa: E731
    top = np.max(gather([max((k[i] for k in self.groups), default=NO_ID) for i in (0, 1)]),
                 axis=0)
    dense = np.zeros((int(top[0]) + 2, int(top[1]) + 2, 2), np.int64)  # ids shifted by 1
    for (task, template), cn in self.groups.items():
      dense[task + 1, template + 1] = cn
    dense = np.sum(gather(dense), axis=0)
    scalars = np.sum(gather([self.num_unlabelled, self.num_identical_choices]), axis=0)
    groups = {(int(t) - 1, int(p) - 1): [int(c) for c in dense[t, p]]
              for t, p in zip(*np.nonzero(dense[..., 1]))}
    return EvalCounts(groups, int(scalars[0]), int(scalars[1]), self.num_batches)

  @property
  def num_correct(self) -> int:
    return sum(c for c, _ in self.groups.values())

  @property
  def num_examples(self) -> int:
    return sum(n for _, n in self.groups.values())

  def as_dict(self, *, per_task: bool = False) -> dict[str, Any]:
    """The result dict; `per_template` (pooled over tasks) when rows carry templates,
    `per_task` {task_id: dict(accuracy, num_correct, num_examples, per_template)} if asked."""
    out = {**_accuracy_entry(self.num_correct, self.num_examples),
           "num_unlabelled": self.num_unlabelled, "num_batches": self.num_batches,
           "num_identical_choices": self.num_identical_choices}
    per_template = _pooled(self.groups, lambda k: k[1])
    if per_template:
      out["per_template"] = per_template
    if per_task:
      out["per_task"] = {}
      for task in sorted({k[0] for k in self.groups}):
        mine = {k: v for k, v in self.groups.items() if k[0] == task}
        entry = _accuracy_entry(sum(c for c, _ in mine.values()), sum(n for _, n in mine.values()))
        templates = _pooled(mine, lambda k: k[1])
        out["per_task"][task] = {**entry, "per_template": templates} if templates else entry
    return out


def _accuracy_entry(c: int, n: int) -> dict[str, Any]:
  return {"accuracy": c / n if n else math.nan, "num_correct": int(c), "num_examples": int(n)}


def _pooled(groups: Mapping[tuple[int, int], list[int]], by) -> dict[int, dict[str, Any]]:
  """Counts summed per `by(key)` (a template id), for ids >= 0 with counted rows."""
  pooled: dict[int, list[int]] = {}
  for key, (c, n) in groups.items():
    if by(key) >= 0 and n:
      acc = pooled.setdefault(by(key), [0, 0])
      acc[0] += c
      acc[1] += n
  return {k: _accuracy_entry(c, n) for k, (c, n) in sorted(pooled.items())}
