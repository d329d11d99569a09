"""What a run writes as it goes: TensorBoard scalars and log lines, eval summaries for JSON.

`MetricWriter` writes TensorBoard (clu, process 0) and a stdout line per write;
`eval_summary` / `eval_result_json` turn a rank-classification result into the
scalars and the JSON entries every run kind reports.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from ia3_jax import runtime

log = logging.getLogger(__name__)


class MetricWriter:
  """TensorBoard (clu, process 0) + a stdout line per write.

  Steps already in `logdir`'s event files (written by an earlier segment of a
  resumed run, which repeats the steps after its last checkpoint) are not
  written to TensorBoard again, so no step has two points.
  """

  def __init__(self, logdir: Optional[str], tensorboard: bool, show: Callable[[str], None]):
    self._show = show
    self._writer = None
    self.enabled = jax.process_index() == 0
    self.logged_through = -1
    if tensorboard and logdir and self.enabled:
      from clu import metric_writers
      self.logged_through = last_logged_step(logdir)
      self._writer = metric_writers.create_default_writer(logdir, asynchronous=False)

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
    if self._writer is not None and step > self.logged_through:
      self._writer.write_scalars(step, scalars)
      self._writer.flush()
    self._show(f"[{step}] " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def last_logged_step(logdir: str) -> int:
  """The highest step with a summary in `logdir`'s TensorBoard event files (-1: none)."""
  files = [f for f in (os.listdir(logdir) if os.path.isdir(logdir) else [])
           if f.startswith("events.out.tfevents")]
  if not files:
    return -1
  tf = runtime.import_tf()
  last = -1
  for name in files:
    try:
      for record in tf.data.TFRecordDataset(os.path.join(logdir, name)).as_numpy_iterator():
        event = tf.compat.v1.Event.FromString(record)
        if event.HasField("summary") and event.summary.value:
          last = max(last, int(event.step))
    except tf.errors.DataLossError:  # a record cut by a kill: the rest of that file is lost
      pass
  return last


def eval_summary(result: Mapping[str, Any],
                  template_names: Optional[Sequence[str]] = None) -> dict[str, float]:
  """Accuracy, example count, median over templates; with `template_names`, also every
  template's accuracy (`template/<name>`, as TensorBoard shows it)."""
  out = {"accuracy": result["accuracy"], "num_examples": result["num_examples"]}
  per = result.get("per_template")
  if per:
    accs = [r["accuracy"] for r in per.values()]
    out["median_template_accuracy"] = float(np.median(accs))
    if template_names is not None:
      for t, r in per.items():
        tag = re.sub(r"[^\w.-]+", "_", template_name(t, template_names))
        out[f"template/{tag}/accuracy"] = r["accuracy"]
  return out


def eval_result_json(result: Mapping[str, Any],
                      template_names: Optional[Sequence[str]] = None) -> dict:
  """An eval result for a JSON file: per-template entries keyed by template name."""
  out = {k: v for k, v in result.items() if k not in ("predictions", "labels", "scores")}
  out.update(eval_summary(result))
  if "per_template" in result:
    out["per_template"] = {template_name(t, template_names): {**r, "template_id": int(t)}
                           for t, r in result["per_template"].items()}
  return out


def template_name(template_id: Any, names: Optional[Sequence[str]]) -> str:
  t = int(template_id)
  return names[t] if names is not None and 0 <= t < len(names) else str(t)


def average_metrics(window: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Mean of each metric over a window of steps' metrics (what a log line reports)."""
  keys = window[0].keys()
  return {k: float(np.mean([np.asarray(m[k], np.float64) for m in window])) for k in keys}


def printer(enabled: bool) -> Callable[[str], None]:
  from tqdm.auto import tqdm

  def show(msg: str) -> None:
    if enabled:
      tqdm.write(msg)
    else:
      log.info("%s", msg)
  return show
