"""ia3-jax vs the PyTorch reference (transformers + peft IA3) on this CPU, side by side.

  python benchmarks/bench_cpu.py                       # t5_1_1_small, batch 8, 256 tokens
  python benchmarks/bench_cpu.py --preset tiny --iters 1 --memory-preset tiny   # smoke run

One process runs both frameworks alternately (never concurrently), on the
same model shape, the same batch and the same initial weights (the PyTorch
model's weights are converted to the ia3-jax tree), and prints a markdown
report: (IA)^3 training steps/s (L_LM alone, then the T-Few loss), rank
classification examples/s (against a per-choice PyTorch scorer and the
T-Few repo's encoder-reusing one), achieved FLOP/s against this machine's
measured matmul peak, and peak memory of (IA)^3 training vs full fine-tuning
(each mode in its own process). `--out FILE.md` / `--json FILE.json` save it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from typing import Any, Optional

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from benchmarks import report  # noqa: E402
from ia3_jax.model import config as config_lib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- sections


def bench_peaks(iters: int, n: int, torch_device: str) -> dict[str, float]:
  from benchmarks import torch_reference as tr
  import torch
  return {"xla_fp32": H.matmul_peak(jnp.float32, n, repeats=iters),
          "xla_bf16": H.matmul_peak(jnp.bfloat16, n, repeats=iters),
          "torch_fp32": tr.matmul_peak(torch.float32, n, repeats=iters, device=torch_device),
          "torch_bf16": tr.matmul_peak(torch.bfloat16, n, repeats=iters, device=torch_device),
          "size": n}


# The PyTorch side each ia3-jax dtype is compared with: fp32 with fp32, bf16 activations with
# torch.autocast(bfloat16) (float32 params on both sides).
TORCH_AUTOCAST = {"float32": None, "bfloat16": "bfloat16"}


def _torch_autocast(dtype: str):
  import torch
  name = TORCH_AUTOCAST[dtype]
  return None if name is None else getattr(torch, name)


def bench_training(w: H.Workload, batch: H.Batch, tm_builder, base: dict, loss: str,
                   dtypes: list[str], warmup: int, iters: int,
                   torch_device: str = "cpu") -> dict[str, Any]:
  """Interleaved steps of each ia3-jax dtype and its PyTorch counterpart (`torch_<dtype>`),
  all from the same weights."""
  from benchmarks import torch_reference as tr
  lm = loss == "lm"
  jbatch = H.correct_choice_batch(batch) if lm else batch
  cfg_loss = H.LM_ONLY if lm else H.TFEW
  out: dict[str, Any] = {"losses": {}, "seconds": {}, "compile_s": {}, "xla_flops": {}}
  fns = {}
  targs = tr.to_torch(batch, torch_device)
  tmodel = None
  for dt in dtypes:
    tmodel = tm_builder()
    tstep = tr.make_train_step(tmodel, lm_only=lm, autocast_dtype=_torch_autocast(dt))
    name = f"torch_{dt}"
    out["losses"][name] = []
    fns[name] = (lambda tstep=tstep, name=name: out["losses"][name].append(tstep(*targs)))
  for dt in dtypes:
    name = f"jax_{dt}"
    t = H.JaxTraining(dataclass_replace(w, dtype=dt), jbatch, loss=cfg_loss, base=base)
    t0 = _now()
    compiled = t.compiled()
    out["compile_s"][name] = _now() - t0
    out["xla_flops"][name] = H.xla_flops(compiled)
    if "matmul_flops" not in out:  # the same dots in every dtype
      out["matmul_flops"] = t.matmul_flops()
      out["num_trainable"] = t.num_trainable
    out["losses"][name] = [t.step()]  # traces and compiles the step
    fns[name] = (lambda t=t, name=name: out["losses"][name].append(t.step()))
  for dt in dtypes:
    fns[f"torch_{dt}"]()  # the first step, as ia3-jax's above
  times = H.interleaved_times(fns, warmup=warmup, iters=iters)
  out["seconds"] = times
  out["torch_num_trainable"] = sum(p.numel() for p in tmodel.parameters() if p.requires_grad)
  return out


def bench_rank(w: H.Workload, batch: H.Batch, tmodel, base: dict, dtypes: list[str],
               warmup: int, iters: int, torch_device: str = "cpu") -> dict[str, Any]:
  """Each ia3-jax dtype against both PyTorch scorers in the same precision
  (`torch_per_choice_<dtype>`, `torch_reuse_encoder_<dtype>`)."""
  from benchmarks import torch_reference as tr
  targs = tr.to_torch(batch, torch_device)
  preds: dict[str, list] = {}
  scores: dict[str, np.ndarray] = {}

  def torch_run(name: str, reuse: bool, autocast):
    return lambda: preds.setdefault(name, []).append(tr.rank_classify(
        tmodel, targs[0], targs[1], targs[2], reuse_encoder=reuse, autocast_dtype=autocast))
  fns = {}
  for dt in dtypes:
    for kind, reuse in (("per_choice", False), ("reuse_encoder", True)):
      fns[f"torch_{kind}_{dt}"] = torch_run(f"torch_{kind}_{dt}", reuse, _torch_autocast(dt))
  out: dict[str, Any] = {"xla_flops": {}}
  for dt in dtypes:
    name = f"jax_{dt}"
    training = H.JaxTraining(dataclass_replace(w, dtype=dt), batch, base=base)
    rc = H.JaxRankClassification(training, batch)

    def run(rc=rc, name=name):
      r = rc()
      preds.setdefault(name, []).append(r["predictions"])
      scores[name] = r["scores"]
    out["xla_flops"][name] = H.xla_flops(rc.compiled())
    if "matmul_flops" not in out:  # the same dots in every dtype
      out["matmul_flops"] = rc.matmul_flops()
    run()  # traces and compiles
    fns[name] = run
  out["seconds"] = H.interleaved_times(fns, warmup=warmup, iters=iters)
  out["predictions"] = {k: np.asarray(v[-1]).tolist() for k, v in preds.items()}
  if "jax_float32" in scores and "jax_bfloat16" in scores:
    a, b = scores["jax_float32"], scores["jax_bfloat16"]
    finite = np.isfinite(a)
    out["bf16_max_score_diff"] = float(np.max(np.abs(a[finite] - b[finite])))
  return out


MEMORY_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
# name -> (extra memory.py arguments, extra XLA flags); see benchmarks/README.md.
MEMORY_CONFIGS = {
    "default": ([], ""),
    "remat": (["--remat", "full"], MEMORY_SCHEDULER_FLAG),
}


def bench_memory(w: H.Workload, torch_side: bool, threads: int, steps: int,
                 torch_device: str = "cpu", configs: tuple[str, ...] = ("default",)
                 ) -> dict[str, Any]:
  """Each (side, mode, config) in a fresh process (peak RSS is per process)."""
  out = {}
  torch_autocast = TORCH_AUTOCAST.get(w.dtype) or "none"
  runs = [("jax", mode, c) for c in configs for mode in ("ia3", "full")]
  if torch_side:
    runs += [("torch", "ia3", "default"), ("torch", "full", "default")]
  for side, mode, config in runs:
    extra, flags = MEMORY_CONFIGS[config]
    cmd = [sys.executable, os.path.join(HERE, "memory.py"), "--side", side, "--mode", mode,
           "--preset", w.preset, "--batch-size", str(w.batch_size),
           "--input-length", str(w.input_length), "--target-length", str(w.target_length),
           "--max-choices", str(w.max_choices), "--min-choices", str(w.min_choices),
           "--dtype", w.dtype, "--steps", str(steps), "--torch-threads", str(threads),
           "--torch-device", torch_device, "--torch-autocast", torch_autocast] + extra
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), flags) if f)
    H.log(f"memory: {side} {mode} {config} ({w.preset})")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("MEMORY_JSON ")]
    if proc.returncode or not line:
      raise RuntimeError(f"memory run {side}/{mode}/{config} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    entry = json.loads(line[-1].split(" ", 1)[1])
    entry["config"] = config
    entry["xla_flags"] = env["XLA_FLAGS"]
    out[f"{side}_{mode}" + ("" if config == "default" else f"@{config}")] = entry
  return out


def dataclass_replace(w: H.Workload, **kw) -> H.Workload:
  import dataclasses
  return dataclasses.replace(w, **kw)


def _now() -> float:
  import time
  return time.perf_counter()


# --------------------------------------------------------------------------- main


def build_parser(description: str = __doc__.splitlines()[0], **defaults) -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--preset", default="t5_1_1_small")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--input-length", type=int, default=256)
  ap.add_argument("--target-length", type=int, default=16)
  ap.add_argument("--max-choices", type=int, default=4)
  ap.add_argument("--min-choices", type=int, default=2)
  ap.add_argument("--dtypes", default="float32,bfloat16",
                  help="ia3-jax activation dtypes to time (params stay float32): float32, "
                  "bfloat16, auto; each against PyTorch in the same precision (bfloat16: "
                  "torch.autocast), bfloat16 only where the CPU runs it natively")
  ap.add_argument("--allow-emulated-bf16", action="store_true",
                  help="time bfloat16 even on a CPU without avx512_bf16 / amx_bf16 (smoke runs)")
  ap.add_argument("--attention-impl", default="einsum", choices=config_lib.ATTENTION_IMPLS,
                  help="T5Config.attention_impl of the ia3-jax model")
  ap.add_argument("--dpa-implementation", default=None, choices=("xla", "cudnn"),
                  help="T5Config.dpa_implementation (jax.nn.dot_product_attention's "
                  "implementation=; default: JAX's choice)")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--torch-threads", type=int, default=2)
  ap.add_argument("--peak-size", type=int, default=2048, help="n of the n^3 peak matmul")
  ap.add_argument("--memory-preset", default="t5_1_1_base",
                  help="model shape for the memory comparison ('none' to skip)")
  ap.add_argument("--memory-steps", type=int, default=2)
  ap.add_argument("--memory-configs", default="default,remat",
                  help="ia3-jax memory configurations: " + ", ".join(MEMORY_CONFIGS))
  ap.add_argument("--no-torch-memory", action="store_true",
                  help="skip the PyTorch peak-RSS runs")
  ap.add_argument("--skip", default="", help="comma list of sections to skip: train,rank,memory")
  ap.add_argument("--torch-device", default="cpu")
  ap.add_argument("--peak-reference", default="xla_fp32", choices=("xla_fp32", "xla_bf16"),
                  help="the measured peak that achieved FLOP/s are a fraction of")
  H.add_host_memory_flag(ap)
  ap.add_argument("--out", help="write the markdown report here")
  ap.add_argument("--json", help="write the raw results here")
  ap.set_defaults(**defaults)
  return ap


def run(a: argparse.Namespace, host_memory: str = "host memory: not set") -> dict[str, Any]:
  """All sections; `host_memory`: `H.set_host_memory`'s line (`main` sets it first)."""
  import torch
  from benchmarks import torch_reference as tr
  torch.set_num_threads(a.torch_threads)
  dev = a.torch_device
  skip = {s for s in a.skip.split(",") if s}
  machine = {**H.machine_info(), "host_memory": host_memory}
  H.log(f"CPU: {machine['cpu_summary']}; {host_memory}")
  dtypes, dtype_notes = H.plan_dtypes([d for d in a.dtypes.split(",") if d],
                                      allow_emulated_bf16=a.allow_emulated_bf16)
  for note in dtype_notes:
    H.log(note)
  if not dtypes:
    raise SystemExit("bench: no dtype left to time (" + "; ".join(dtype_notes) + ")")
  w = H.Workload(a.preset, a.batch_size, a.input_length, a.target_length, a.max_choices,
                 a.min_choices, dtypes[0], attention_impl=a.attention_impl,
                 dpa_implementation=a.dpa_implementation)
  res: dict[str, Any] = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
      "machine": machine, "torch": torch.__version__,
      "torch_threads": torch.get_num_threads(), "workload": w.describe(with_dtype=False),
      "torch_device": dev, "torch_autocast": {d: TORCH_AUTOCAST[d] or "none" for d in dtypes},
      "peak_reference": a.peak_reference, "dtype_notes": dtype_notes,
      "iters": a.iters, "warmup": a.warmup, "dtypes": dtypes,
      "load_before": H.load_average(), "busy_before": H.busy_processes()}
  H.log(f"workload: {w.describe()}; load {res['load_before']}")
  res["peaks"] = bench_peaks(max(3, a.iters + 2), a.peak_size, dev)
  H.log("peaks: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in res["peaks"].items()
                              if k != "size"))
  batch = H.make_batch(w)
  builder = lambda: tr.build_model(w.config, ia3=True, seed=w.seed, device=dev)  # noqa: E731
  base = tr.jax_params(builder(), w.config)
  if "train" not in skip:
    res["train"] = {}
    for loss in ("lm", "tfew"):
      H.log(f"training ({loss})")
      res["train"][loss] = bench_training(w, batch, builder, base, loss, dtypes, a.warmup,
                                          a.iters, dev)
  if "rank" not in skip:
    H.log("rank classification")
    res["rank"] = bench_rank(w, batch, builder(), base, dtypes, a.warmup, a.iters, dev)
  res["load_after_speed"] = H.load_average()
  if "memory" not in skip and a.memory_preset != "none":
    mw = dataclass_replace(w, preset=a.memory_preset, dtype=dtypes[0])
    res["memory_workload"] = mw.describe()
    res["memory"] = bench_memory(mw, not a.no_torch_memory, a.torch_threads, a.memory_steps,
                                 dev, tuple(c for c in a.memory_configs.split(",") if c))
  res["load_after"] = H.load_average()
  res["busy_after"] = H.busy_processes()
  return res


def main(argv: Optional[list[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> int:
  a = (parser or build_parser()).parse_args(argv)
  res = run(a, H.set_host_memory(a.host_memory))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1, default=float)
  text = report.render(res)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
