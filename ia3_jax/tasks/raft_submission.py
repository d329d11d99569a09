"""RAFT leaderboard files from `ia3-jax infer` predictions over the RAFT test sets.

The RAFT submission repository (`ought/raft-submission`) holds one
`data/<task>/predictions.csv` per task with exactly two columns, `ID` (the test
row's ID) and `Label` (the label's name as the benchmark spells it).
`write_submission` builds them from the rows of `predictions.jsonl`:

    ia3-jax infer --gin.MIXTURE_OR_TASK_NAME="'raft_eval'" ...   # the 11 test sets, one run
    ia3-jax raft-submission --predictions RUN/predictions.jsonl --out SUBMISSION/data

A row's RAFT task is its `task` field when present (an infer run with ADAPTERS names
each row's task, and its `task_id` is then a row of the adapter bank), else its built-in
`task_id`.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import pathlib
import sys
from typing import Any, Iterable, Mapping, Optional

from ia3_jax import files
from ia3_jax.data import sources
from ia3_jax.errors import DataError
from ia3_jax.tasks import BUILTIN_TASK_IDS, RAFT_KEYS
from ia3_jax.tasks.raft import RAFT_TASKS, RaftSource

PREDICTIONS_FILE = "predictions.csv"
HEADER = ("ID", "Label")
TASK_OF_ID = {BUILTIN_TASK_IDS[k]: k[len("raft_"):] for k in RAFT_KEYS}  # built-in id -> task


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of a `predictions.jsonl` (errors name the file and line)."""
  try:
    f = open(path, "rb")
  except OSError as e:
    raise DataError(f"--predictions {path}: cannot read it ({e.strerror})") from None
  with f:
    return [sources.json_object(line, f"{path}, line {line_no}")
            for line_no, line in enumerate(sources.text_lines(f, path), 1) if line.strip()]


def task_of(row: Mapping[str, Any], where: str) -> str:
  """The RAFT task (e.g. `ade_corpus_v2`) of a prediction row: from its `task` (the dataset
  key `raft_<task>` of a run with ADAPTERS, or the bare task name) when present, else
  from its built-in `task_id`."""
  if "task" in row:
    return _task_of_name(row["task"], where)
  if "task_id" not in row:
    raise DataError(f"{where}: no task or task_id field (rows of `ia3-jax infer` "
                    "predictions.jsonl)")
  task = TASK_OF_ID.get(row["task_id"])
  if task is None:
    raise DataError(f"{where}: task_id {row['task_id']} is not a RAFT task (RAFT ids: "
                    f"{min(TASK_OF_ID)}..{max(TASK_OF_ID)}); predict with the built-in ids, "
                    "without a task_id_map")
  return task


def _task_of_name(name: Any, where: str) -> str:
  task = name[len("raft_"):] if isinstance(name, str) and name.startswith("raft_") else name
  if task not in RAFT_TASKS:
    raise DataError(f"{where}: task {name!r} is not a RAFT task (tasks: raft_<name> with "
                    f"<name> one of {', '.join(RAFT_TASKS)})")
  return task


def labels_by_id(rows: Iterable[tuple[Mapping[str, Any], str]], task: str
                 ) -> dict[int, str]:
  """example_id -> predicted label name of one task's rows; the same example predicted
  twice (several templates) must agree."""
  labels = RAFT_TASKS[task][1]
  out: dict[int, str] = {}
  for row, where in rows:
    pred = row.get("prediction")
    if not isinstance(pred, int) or isinstance(pred, bool) or not 0 <= pred < len(labels):
      raise DataError(f"{where}: prediction {pred!r} is not a label index of raft {task} "
                      f"(0..{len(labels) - 1})")
    example = row.get("example_id")
    if not isinstance(example, int) or isinstance(example, bool):
      raise DataError(f"{where}: field 'example_id' is {_shown(example)}, not the integer index "
                      "of a test row (rows of `ia3-jax infer` predictions.jsonl)")
    if example in out and out[example] != labels[pred]:
      raise DataError(f"{where}: raft {task} example {example} was predicted twice, as "
                      f"{out[example]!r} and {labels[pred]!r} (several templates?): infer with one")
    out[example] = labels[pred]
  return out


def _shown(value: Any) -> str:
  return "missing" if value is None else f"{value!r} ({type(value).__name__})"


def submission_csv(task: str, predicted: Mapping[int, str], raft_dir: Optional[str]) -> str:
  """The `ID,Label` CSV text of one task: every row of its test file, in file order."""
  records = RaftSource(task, raft_dir).load("test")
  missing = [r.fields["id"] for r in records if r.index not in predicted]
  if missing:
    raise DataError(f"raft {task}: {len(missing)} of {len(records)} test rows have no "
                    f"prediction (IDs {', '.join(map(str, missing[:5]))}"
                    f"{', ...' if len(missing) > 5 else ''})")
  extra = sorted(set(predicted) - {r.index for r in records})
  if extra:
    raise DataError(f"raft {task}: predictions for examples {extra[:5]} beyond its "
                    f"{len(records)} test rows: another test file?")
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(HEADER)
  for record in records:
    writer.writerow((record.fields["id"], predicted[record.index]))
  return text.getvalue()


def write_submission(predictions: str | os.PathLike | Iterable[Mapping[str, Any]],
                     out_dir: str | os.PathLike, raft_dir: Optional[str] = None
                     ) -> dict[str, pathlib.Path]:
  """Writes `<out_dir>/<task>/predictions.csv` for every RAFT task in `predictions`.

  `predictions`: a `predictions.jsonl` of `ia3-jax infer` over RAFT test sets (or its rows:
  `task` or `task_id`, `example_id`, `prediction`); `raft_dir` (default $IA3_JAX_RAFT_DIR):
  the RAFT CSV folder, read for the test IDs. Every file is checked (each test row predicted
  once, labels from the task's set) before any is written; each is written atomically.
  Returns task -> path.
  """
  is_file = isinstance(predictions, (str, os.PathLike))
  source = str(predictions) if is_file else "predictions"
  rows = read_predictions(predictions) if is_file else list(predictions)
  if not rows:
    raise DataError(f"{source}: no predictions")
  raft_dir = raft_dir or os.environ.get("IA3_JAX_RAFT_DIR")
  by_task: dict[str, list] = collections.defaultdict(list)
  for i, row in enumerate(rows, 1):
    where = f"{source}, row {i}"
    by_task[task_of(row, where)].append((row, where))
  texts = {task: submission_csv(task, labels_by_id(task_rows, task), raft_dir)
           for task, task_rows in sorted(by_task.items())}
  out = {}
  for task, text in texts.items():
    out[task] = files.write_text(pathlib.Path(out_dir) / task / PREDICTIONS_FILE, text)
  return out


def main(argv: Optional[list[str]] = None) -> int:
  """`ia3-jax raft-submission`: writes the leaderboard files, prints what it wrote."""
  import argparse
  p = argparse.ArgumentParser(prog="ia3-jax raft-submission", description=(
      "Write RAFT leaderboard files (<out>/<task>/predictions.csv: ID,Label) from the "
      "predictions.jsonl of `ia3-jax infer` over RAFT test sets (e.g. the raft_eval mixture)."))
  p.add_argument("--predictions", required=True, help="predictions.jsonl of an infer run")
  p.add_argument("--out", required=True,
                 help="output folder: the data/ folder of a RAFT submission repository")
  p.add_argument("--raft_dir", default=None,
                 help="RAFT CSV folder, for the test IDs (default: $IA3_JAX_RAFT_DIR)")
  args = p.parse_args(argv)
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise DataError(f"--out {args.out}: is a file, not a folder")
  written = write_submission(args.predictions, args.out, args.raft_dir)
  missing = [task for task in TASK_OF_ID.values() if task not in written]
  for task, path in written.items():
    print(f"raft {task}: wrote {path}")
  if missing:
    print(f"warning: no predictions for {len(missing)} of 11 RAFT tasks: {', '.join(missing)}",
          file=sys.stderr)
  return 0
