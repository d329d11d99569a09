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
