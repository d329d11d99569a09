"""Mixed-task evaluation from one adapter bank vs one task at a time, on this machine.

  python benchmarks/mixed_task_eval.py                    # the bundled demo model, 8 tasks
  python benchmarks/mixed_task_eval.py --preset t5_1_1_small   # random weights
  python benchmarks/mixed_task_eval.py --preset tiny --examples 2 --iters 1   # smoke run

`--tasks` tasks (random (IA)^3 adapters), `--examples` examples each (random rank-
classification batches, `harness.make_batch`). Three ways to evaluate all of them:

  mixed      one (IA)^3 model whose bank holds every adapter (`peft.banks.AdapterBank`,
             `runs.load_bank_for_inference`), one jitted rank classifier
             (`scoring.RankClassifier`, compiled once), the examples of all tasks in mixed
             batches of `--batch-size` (each row picks its adapter by `task_id`)
  merge      task after task: `ia3.merge` folds the task's vectors into the base kernels,
             then the base network's classifier (compiled once) scores the task's examples
             in one small batch
  recompile  task after task: a classifier specialised to the task (its bank row picked
             statically) is compiled and run; compilation is part of the cost

mixed and merge run alternately after a warm-up (`harness.interleaved_times`); recompile
is timed over whole passes (each compiles `--tasks` programs). The report gives examples/s,
the speed-up of mixed over each baseline (target >= 1.5x) and how many predictions agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any, Callable

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow (the data layer's) start-up logs

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness as H  # noqa: E402

TARGET_SPEEDUP = 1.5


def _log(msg: str) -> None:
  print(f"[mixed_task_eval {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr,
        flush=True)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="demo",
                 help="'demo' (the bundled model, ia3_jax/assets/demo) or a model preset "
                      "(random weights), e.g. tiny, t5_1_1_small")
  p.add_argument("--tasks", type=int, default=8, help="number of tasks (adapters)")
  p.add_argument("--examples", type=int, default=8, help="examples per task (its batch)")
  p.add_argument("--batch-size", type=int, default=32, help="rows per mixed batch")
  p.add_argument("--input-length", type=int, default=64)
  p.add_argument("--target-length", type=int, default=8)
  p.add_argument("--choices", type=int, default=4, help="answer choices (2 to this many)")
  p.add_argument("--iters", type=int, default=5, help="timed passes of mixed and merge")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--recompile-iters", type=int, default=1,
                 help="timed passes of recompile (0: skip it)")
  p.add_argument("--json", default=None, help="also write the results to this file")
  return p


# --------------------------------------------------------------------------- setup


def _model(preset: str):
  """(config, initial checkpoint path or None for random weights)."""
  from ia3_jax import demo
  from ia3_jax.interop import hf_checkpoints
  from ia3_jax.model import config as config_lib
  if preset == "demo":
    return hf_checkpoints.load_hf_config(demo.BUNDLED_MODEL_DIR), demo.BUNDLED_MODEL_DIR
  return config_lib.get_config(preset), None


def _bank(config, num_tasks: int, seed: int = 0):
  """An AdapterBank of `num_tasks` random adapters (vectors in [0.5, 1.5])."""
  from ia3_jax.model import params as params_lib
  from ia3_jax.peft import banks, ia3
  like = ia3.init_ia3(config)
  bank = banks.AdapterBank(like, num_tasks)
  rng = np.random.default_rng(seed)
  for t in range(num_tasks):
    bank.add(f"task_{t}", {p: rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
                           for p, v in params_lib.flatten(like).items()})
  return bank


def _task_batches(args, config) -> list[dict[str, np.ndarray]]:
  """One batch of `--examples` rows per task, rows carrying their task's id."""
  w = H.Workload(preset=args.preset, batch_size=args.examples, input_length=args.input_length,
                 target_length=args.target_length, max_choices=args.choices,
                 min_choices=min(2, args.choices))
  out = []
  for t in range(args.tasks):
    batch = H.make_batch(dataclasses.replace(w, seed=t), vocab_size=config.vocab_size)
    batch["task_id"] = np.full((args.examples,), t, np.int32)
    out.append(batch)
  return out


def _mixed_batches(task_batches: list[dict], batch_size: int) -> list[dict[str, np.ndarray]]:
  """All tasks' rows in batches of `batch_size` (the last padded with empty rows)."""
  rows = {k: np.concatenate([b[k] for b in task_batches]) for k in task_batches[0]}
  n = len(rows["label"])
  total = -(-n // batch_size) * batch_size
  padded = {k: np.concatenate([v, np.zeros((total - n,) + v.shape[1:], v.dtype)])
            for k, v in rows.items()}
  padded["choice_mask"][n:, 0] = 1  # a valid (ignored) choice for padding rows
  return [{k: v[i:i + batch_size] for k, v in padded.items()} for i in range(0, total, batch_size)]


# --------------------------------------------------------------------------- the three ways


def _features(batch: dict, with_task_id: bool) -> dict:
  keys = ("encoder_input_tokens", "choice_tokens", "choice_mask") + (
      ("task_id",) if with_task_id else ())
  return {k: batch[k] for k in keys}


def mixed_pass(classifier, params, batches: list[dict], n: int) -> Callable[[], np.ndarray]:
  def run() -> np.ndarray:
    out = [classifier(params, _features(b, True))["predictions"] for b in batches]
    return np.concatenate([np.asarray(H.block(p)) for p in out])[:n]
  return run


def merge_pass(classifier, params, task_batches: list[dict]) -> Callable[[], np.ndarray]:
  from ia3_jax.peft import ia3

  def run() -> np.ndarray:
    out = []
    for t, batch in enumerate(task_batches):
      merged, _ = ia3.merge(params, task=t)
      out.append(np.asarray(H.block(classifier(merged, _features(batch, False))["predictions"])))
    return np.concatenate(out)
  return run


def recompile_pass(config, params, task_batches: list[dict]) -> Callable[[], np.ndarray]:
  """A fresh classifier per task with the task's row fixed at compile time."""
  from ia3_jax.model import params as params_lib
  from ia3_jax.objectives import scoring
  from ia3_jax.peft import ia3
  one_task = ia3.ia3_model(config, ia3.sites_of(ia3.extract_ia3(params)[0]), 1)

  def classify(p, batch, task):
    flat = {k: (v[task:task + 1] if k.rsplit("/", 1)[-1] in ia3.SITE_OF_PARAM else v)
            for k, v in params_lib.flatten(p).items()}
    return scoring.rank_classify(one_task, params_lib.unflatten(flat), batch)

  def run() -> np.ndarray:
    out = []
    for t, batch in enumerate(task_batches):
      fn = jax.jit(classify, static_argnums=2)  # a new program per task (and per pass)
      out.append(np.asarray(H.block(fn(params, _features(batch, False), t)["predictions"])))
    return np.concatenate(out)
  return run


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
  from ia3_jax import runs
  from ia3_jax.model import network
  from ia3_jax.objectives import scoring
  config, init = _model(args.preset)
  _log(f"{args.preset}: {args.tasks} tasks x {args.examples} examples, mixed batches of "
       f"{args.batch_size}, {args.input_length} input tokens, 2-{args.choices} choices")
  tr, params, bank = runs.load_bank_for_inference(_bank(config, args.tasks), config=config,
                                                  initial_checkpoint_path=init, seed=0)
  task_batches = _task_batches(args, config)
  n = args.tasks * args.examples
  mixed_clf = scoring.RankClassifier(tr.model)
  merged_clf = scoring.RankClassifier(network.Transformer(config))
  fns = {"mixed": mixed_pass(mixed_clf, params, _mixed_batches(task_batches, args.batch_size), n),
         "merge": merge_pass(merged_clf, params, task_batches)}
  preds = {name: fn() for name, fn in fns.items()}  # compiles each once
  times = H.interleaved_times(fns, warmup=max(0, args.warmup - 1), iters=args.iters)
  seconds = {name: H.median(ts) for name, ts in times.items()}
  if args.recompile_iters:
    fn = recompile_pass(config, params, task_batches)
    ts = []
    for _ in range(args.recompile_iters):
      t0 = time.perf_counter()
      preds["recompile"] = fn()
      ts.append(time.perf_counter() - t0)
    seconds["recompile"] = H.median(ts)
  out = {"preset": args.preset, "tasks": args.tasks, "examples_per_task": args.examples,
         "batch_size": args.batch_size, "input_length": args.input_length,
         "target_length": args.target_length, "choices": args.choices,
         "devices": f"{jax.devices()[0].platform} x {jax.device_count()}",
         "seconds_per_pass": seconds,
         "examples_per_s": {k: n / s for k, s in seconds.items()},
         "speedup": {k: s / seconds["mixed"] for k, s in seconds.items() if k != "mixed"},
         "mixed_compilations": mixed_clf.num_traces,
         "agreement": {k: float(np.mean(p == preds["mixed"])) for k, p in preds.items()
                       if k != "mixed"},
         "bank": repr(bank)}
  return out


def render(r: dict[str, Any]) -> str:
  lines = [f"Mixed-task evaluation: {r['preset']}, {r['tasks']} tasks x "
           f"{r['examples_per_task']} examples, mixed batches of {r['batch_size']}, "
           f"{r['input_length']} input tokens, 2-{r['choices']} choices of <= "
           f"{r['target_length']} tokens, {r['devices']}",
           "", "| way | s / pass | examples/s | mixed speed-up | predictions = mixed |",
           "|---|---|---|---|---|"]
  for k, s in r["seconds_per_pass"].items():
    speed = "1.00x" if k == "mixed" else f"{r['speedup'][k]:.2f}x"
    agree = "-" if k == "mixed" else f"{100 * r['agreement'][k]:.1f}%"
    lines.append(f"| {k} | {s:.3f} | {r['examples_per_s'][k]:.1f} | {speed} | {agree} |")
  ok = r["speedup"]["merge"] >= TARGET_SPEEDUP
  lines += ["", f"mixed compiled {r['mixed_compilations']} program(s); target mixed >= "
            f"{TARGET_SPEEDUP}x merge: {'met' if ok else 'NOT met'}"]
  return "\n".join(lines)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  results = run(args)
  print(render(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
