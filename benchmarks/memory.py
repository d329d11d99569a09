"""Peak memory of one training mode, measured in a fresh process (run by bench_cpu.py).

  python benchmarks/memory.py --side jax --mode ia3 --preset t5_1_1_base

prints one JSON line: XLA's buffer assignment for the compiled train step
(jax side), and the process's peak RSS after `--steps` updates, with the RSS
before any model was built (imports only) as the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402


def measure_jax(w: harness.Workload, mode: str, steps: int, loss: str, remat: str) -> dict:
  baseline = harness.peak_rss_bytes()
  batch = harness.make_batch(w)
  if loss == "lm":
    batch = harness.correct_choice_batch(batch)
  trainable = harness.IA3_TRAINABLE if mode == "ia3" else harness.FULL_TRAINABLE
  t = harness.JaxTraining(w, batch, trainable=trainable,
                          loss=harness.LM_ONLY if loss == "lm" else harness.TFEW, remat=remat)
  stats = harness.memory_stats(t.compiled())
  for _ in range(steps):
    t.step()
  out = {"side": "jax", "mode": mode, "remat": remat, "xla": stats,
         "baseline_rss": baseline,
         "peak_rss": harness.peak_rss_bytes(), "num_trainable": t.num_trainable}
  device_stats = harness.device_memory_stats()
  if device_stats:
    out["device_peak"] = device_stats.get("peak_bytes_in_use")
  return out


def measure_torch(w: harness.Workload, mode: str, steps: int, loss: str, threads: int,
                  device: str, autocast: str) -> dict:
  import torch
  from benchmarks import torch_reference as tr
  torch.set_num_threads(threads)
  baseline = harness.peak_rss_bytes()
  batch = harness.make_batch(w)
  model = tr.build_model(w.config, ia3=mode == "ia3", device=device)
  step = tr.make_train_step(model, lm_only=loss == "lm",
                            autocast_dtype=None if autocast == "none" else getattr(torch, autocast))
  args = tr.to_torch(batch, device)
  for _ in range(steps):
    step(*args)
  out = {"side": "torch", "mode": mode, "baseline_rss": baseline,
         "peak_rss": harness.peak_rss_bytes(),
         "num_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
  if device.startswith("cuda"):
    out["device_peak"] = int(torch.cuda.max_memory_allocated())
  return out


def main(argv: Optional[list[str]] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--side", choices=("jax", "torch"), required=True)
  ap.add_argument("--mode", choices=("ia3", "full"), required=True)
  ap.add_argument("--preset", default="t5_1_1_base")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--input-length", type=int, default=256)
  ap.add_argument("--target-length", type=int, default=16)
  ap.add_argument("--max-choices", type=int, default=4)
  ap.add_argument("--min-choices", type=int, default=2)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--loss", choices=("tfew", "lm"), default="tfew")
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--remat", default="none", choices=("none", "full", "dots"),
                  help="network.Blocks.remat for the ia3-jax side")
  ap.add_argument("--torch-threads", type=int, default=2)
  ap.add_argument("--torch-device", default="cpu")
  ap.add_argument("--torch-autocast", default="none")
  a = ap.parse_args(argv)
  w = harness.Workload(a.preset, a.batch_size, a.input_length, a.target_length, a.max_choices,
                       a.min_choices, a.dtype)
  if a.side == "jax":
    out = measure_jax(w, a.mode, a.steps, a.loss, a.remat)
  else:
    out = measure_torch(w, a.mode, a.steps, a.loss, a.torch_threads, a.torch_device,
                        a.torch_autocast)
  print("MEMORY_JSON " + json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
