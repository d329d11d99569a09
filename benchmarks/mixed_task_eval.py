"""Mixed-task evaluation from one adapter bank vs one task at a time, on this machine.

  python benchmarks/mixed_task_eval.py                    # the bundled demo model, 8 tasks
  python benchmarks/mixed_task_eval.py --preset t5_1_1_small   # random weights
  python benchmarks/mixed_task_eval.py --preset t5_1_1_small --examples 1,2,4,8   # a sweep
  python benchmarks/mixed_task_eval.py --preset tiny --examples 2 --iters 1   # smoke run

`--tasks` tasks (random (IA)^3 adapters), `--examples` examples each (random rank-
classification batches, `harness.make_batch`); a comma-separated `--examples` runs one
measurement per value with the model and bank loaded once. Three ways to evaluate all of them:

  mixed      one (IA)^3 model whose bank holds every adapter (`peft.banks.AdapterBank`,
             `runs.load_bank_for_inference`), one jitted rank classifier
             (`scoring.RankClassifier`, compiled once per batch shape), the examples of all
             tasks in mixed batches of at most `--batch-size` rows (each row picks its adapter
             by `task_id`); the rows are split evenly over ceil(rows / batch size) batches, so
             8 tasks x 1 example run as one batch of 8, not 8 real rows padded to 32
  merge      task after task: `ia3.merge` folds the task's vectors into the base kernels,
             then the base network's classifier (compiled once) scores the task's examples
             in one small batch
  recompile  task after task: a classifier specialised to the task (its bank row picked
             statically) is compiled and run; compilation is part of the cost

mixed and merge run alternately after a warm-up (`harness.interleaved_times`); recompile
is timed over whole passes (each compiles `--tasks` programs). The report gives examples/s,
the speed-up of mixed over each baseline (target >= 1.5x), how many predictions agree, and
where a merge pass spends its time (the `--tasks` calls of `ia3.merge` vs the classifier).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

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


def examples_list(text: str) -> list[int]:
  """'8' -> [8]; '1,2,4,8' -> [1, 2, 4, 8] (the --examples sweep)."""
  try:
    values = [int(v) for v in str(text).split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--examples {text!r}: give positive integers, e.g. 8 "
                                     "or 1,2,4,8") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"--examples {text!r}: give positive integers, e.g. 8 "
                                     "or 1,2,4,8")
  return values


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="demo",
                 help="'demo' (the bundled model, ia3_jax/assets/demo) or a model preset "
                      "(random weights), e.g. tiny, t5_1_1_small")
  p.add_argument("--tasks", type=int, default=8, help="number of tasks (adapters)")
  p.add_argument("--examples", type=examples_list, default="8",
                 help="examples per task (its batch); a comma-separated list (e.g. 1,2,4,8) "
                      "measures each value in turn, loading the model once")
  p.add_argument("--batch-size", type=int, default=32, help="most rows per mixed batch")
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


def _task_batches(args, config, examples: int) -> list[dict[str, np.ndarray]]:
  """One batch of `examples` rows per task, rows carrying their task's id."""
  w = H.Workload(preset=args.preset, batch_size=examples, input_length=args.input_length,
                 target_length=args.target_length, max_choices=args.choices,
                 min_choices=min(2, args.choices))
  out = []
  for t in range(args.tasks):
    batch = H.make_batch(dataclasses.replace(w, seed=t), vocab_size=config.vocab_size)
    batch["task_id"] = np.full((examples,), t, np.int32)
    out.append(batch)
  return out


def mixed_batch_rows(n: int, batch_size: int) -> int:
  """Rows per mixed batch for `n` rows and at most `batch_size` a batch: as few batches as
  `batch_size` allows, the rows split evenly over them (n = 8, batch_size 32: one batch of
  8, not 8 rows padded to 32; n = 40: two of 20, not 32 + 8 padded to 32)."""
  num_batches = -(-n // batch_size)
  return -(-n // num_batches)


def _mixed_batches(task_batches: list[dict], batch_size: int) -> list[dict[str, np.ndarray]]:
  """All tasks' rows in equal batches of at most `batch_size` (`mixed_batch_rows`; the last
  padded with empty rows when the rows do not split evenly)."""
  rows = {k: np.concatenate([b[k] for b in task_batches]) for k in task_batches[0]}
  n = len(rows["label"])
  size = mixed_batch_rows(n, batch_size)
  total = -(-n // size) * size
  padded = {k: np.concatenate([v, np.zeros((total - n,) + v.shape[1:], v.dtype)])
            for k, v in rows.items()}
  padded["choice_mask"][n:, 0] = 1  # a valid (ignored) choice for padding rows
  return [{k: v[i:i + size] for k, v in padded.items()} for i in range(0, total, size)]


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


def merge_pass(classifier, params, task_batches: list[dict],
               split: Optional[dict[str, list[float]]] = None) -> Callable[[], np.ndarray]:
  """Task after task: `ia3.merge`, then the base classifier on the task's batch. With `split`,
  each pass appends its seconds in the merges ("merge") and in the classifier ("classify"),
  waiting for the merged params before classifying (a sync the timed passes leave out)."""
  from ia3_jax.peft import ia3

  def run() -> np.ndarray:
    out, merging, classifying = [], 0.0, 0.0
    for t, batch in enumerate(task_batches):
      t0 = time.perf_counter()
      merged, _ = ia3.merge(params, task=t)
      if split is not None:
        H.block(merged)
      t1 = time.perf_counter()
      out.append(np.asarray(H.block(classifier(merged, _features(batch, False))["predictions"])))
      merging, classifying = merging + t1 - t0, classifying + time.perf_counter() - t1
    if split is not None:
      split["merge"].append(merging)
      split["classify"].append(classifying)
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


@dataclasses.dataclass
class Setup:
  """What every `--examples` value shares: the model, its bank and the two classifiers."""
  config: Any
  trainer: Any
  params: Any
  bank: Any
  mixed_classifier: Any
  merged_classifier: Any


def setup(args: argparse.Namespace) -> Setup:
  from ia3_jax import runs
  from ia3_jax.model import network
  from ia3_jax.objectives import scoring
  config, init = _model(args.preset)
  from ia3_jax.train import assembly
  tr, params, bank = runs.load_bank_for_inference(
      _bank(config, args.tasks), assembly.ModelSpec(config, initial_checkpoint_path=init), seed=0)
  return Setup(config, tr, params, bank, scoring.RankClassifier(tr.model),
               scoring.RankClassifier(network.Transformer(config)))


def measure(args: argparse.Namespace, s: Setup, examples: int) -> dict[str, Any]:
  """The three ways on `--tasks` tasks x `examples` examples."""
  task_batches = _task_batches(args, s.config, examples)
  n = args.tasks * examples
  mixed = _mixed_batches(task_batches, args.batch_size)
  _log(f"{args.preset}: {args.tasks} tasks x {examples} examples, mixed: {len(mixed)} "
       f"batch(es) of {len(mixed[0]['label'])} rows, {args.input_length} input tokens, "
       f"2-{args.choices} choices")
  traces = s.mixed_classifier.num_traces, s.merged_classifier.num_traces
  fns = {"mixed": mixed_pass(s.mixed_classifier, s.params, mixed, n),
         "merge": merge_pass(s.merged_classifier, s.params, task_batches)}
  preds = {name: fn() for name, fn in fns.items()}  # compiles each once (per batch shape)
  times = H.interleaved_times(fns, warmup=max(0, args.warmup - 1), iters=args.iters)
  seconds = {name: H.median(ts) for name, ts in times.items()}
  split: dict[str, list[float]] = {"merge": [], "classify": []}
  split_pass = merge_pass(s.merged_classifier, s.params, task_batches, split)
  for _ in range(min(3, max(1, args.iters))):  # untimed passes: where a merge pass goes
    split_pass()
  if args.recompile_iters:
    fn = recompile_pass(s.config, s.params, task_batches)
    ts = []
    for _ in range(args.recompile_iters):
      t0 = time.perf_counter()
      preds["recompile"] = fn()
      ts.append(time.perf_counter() - t0)
    seconds["recompile"] = H.median(ts)
  return {"preset": args.preset, "tasks": args.tasks, "examples_per_task": examples,
          "batch_size": args.batch_size, "mixed_batches": len(mixed),
          "mixed_batch_rows": int(len(mixed[0]["label"])),
          "mixed_padding_rows": int(len(mixed) * len(mixed[0]["label"]) - n),
          "input_length": args.input_length,
          "target_length": args.target_length, "choices": args.choices,
          "devices": f"{jax.devices()[0].platform} x {jax.device_count()}",
          "seconds_per_pass": seconds,
          "examples_per_s": {k: n / v for k, v in seconds.items()},
          "speedup": {k: v / seconds["mixed"] for k, v in seconds.items() if k != "mixed"},
          "merge_split_s": {k: H.median(v) for k, v in split.items()},
          "best_seconds_per_pass": {k: min(ts) for k, ts in times.items()},
          "mixed_compilations": s.mixed_classifier.num_traces - traces[0],
          "merge_compilations": s.merged_classifier.num_traces - traces[1],
          "agreement": {k: float(np.mean(p == preds["mixed"])) for k, p in preds.items()
                        if k != "mixed"},
          "bank": repr(s.bank)}


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
  """One `measure` per `--examples` value, the model and bank loaded once."""
  s = setup(args)
  return [measure(args, s, e) for e in _examples(args)]


def run(args: argparse.Namespace) -> dict[str, Any]:
  """The measurement for one `--examples` value (`sweep` for several)."""
  values = _examples(args)
  if len(values) != 1:
    raise ValueError(f"run: --examples {values} has several values; use sweep(args)")
  return sweep(args)[0]


def _examples(args: argparse.Namespace) -> list[int]:
  e = args.examples
  return [int(e)] if isinstance(e, (int, np.integer)) else [int(v) for v in e]


def render(r: dict[str, Any]) -> str:
  lines = [f"Mixed-task evaluation: {r['preset']}, {r['tasks']} tasks x "
           f"{r['examples_per_task']} examples, mixed: {r['mixed_batches']} batch(es) of "
           f"{r['mixed_batch_rows']} rows (at most {r['batch_size']}), "
           f"{r['input_length']} input tokens, 2-{r['choices']} choices of <= "
           f"{r['target_length']} tokens, {r['devices']}",
           "", "| way | s / pass | examples/s | mixed speed-up | predictions = mixed |",
           "|---|---|---|---|---|"]
  for k, s in r["seconds_per_pass"].items():
    speed = "1.00x" if k == "mixed" else f"{r['speedup'][k]:.2f}x"
    agree = "-" if k == "mixed" else f"{100 * r['agreement'][k]:.1f}%"
    lines.append(f"| {k} | {s:.3f} | {r['examples_per_s'][k]:.1f} | {speed} | {agree} |")
  ok = r["speedup"]["merge"] >= TARGET_SPEEDUP
  split = r["merge_split_s"]
  best = r["best_seconds_per_pass"]
  lines += ["", f"fastest pass: mixed {best['mixed']:.3f} s, merge {best['merge']:.3f} s "
            f"({best['merge'] / best['mixed']:.2f}x; the table gives medians)",
            f"merge pass: {split['merge']:.3f} s in {r['tasks']} ia3.merge calls, "
            f"{split['classify']:.3f} s classifying (medians of separate passes)",
            f"mixed compiled {r['mixed_compilations']} program(s); target mixed >= "
            f"{TARGET_SPEEDUP}x merge: {'met' if ok else 'NOT met'}"]
  return "\n".join(lines)


def render_sweep(results: Sequence[dict[str, Any]]) -> str:
  """One line per `--examples` value."""
  r0 = results[0]
  lines = [f"Sweep: {r0['preset']}, {r0['tasks']} tasks, mixed batches of at most "
           f"{r0['batch_size']} rows, {r0['devices']}", "",
           "| examples / task | mixed batches | mixed (examples/s) | merge (examples/s) | "
           "mixed vs merge | mixed vs recompile | merge s in ia3.merge |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    eps, sp = r["examples_per_s"], r["speedup"]
    rec = f"{sp['recompile']:.1f}x" if "recompile" in sp else "-"
    lines.append(f"| {r['examples_per_task']} | {r['mixed_batches']} x "
                 f"{r['mixed_batch_rows']} | {eps['mixed']:.1f} | {eps['merge']:.1f} | "
                 f"{sp['merge']:.2f}x | {rec} | "
                 f"{r['merge_split_s']['merge']:.3f} of {r['seconds_per_pass']['merge']:.3f} |")
  met = [r["examples_per_task"] for r in results if r["speedup"]["merge"] >= TARGET_SPEEDUP]
  lines += ["", f"target mixed >= {TARGET_SPEEDUP}x merge met at examples/task: "
            f"{', '.join(map(str, met)) or 'none'}"]
  return "\n".join(lines)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  results = sweep(args)
  for r in results:
    print(render(r) + "\n")
  if len(results) > 1:
    print(render_sweep(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results[0] if len(results) == 1 else results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
