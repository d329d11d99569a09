"""ia3-jax train-step time and achieved matmul FLOP/s across batch sizes and frozen-base storage.

  python benchmarks/step_sweep.py --preset t0_3b --dtype bfloat16 --batch-sizes 8,32 \\
      --frozen-dtypes float32,bfloat16 --attention-impl dot_product_attention \\
      --dpa-implementation cudnn                                 # on a GPU
  python benchmarks/step_sweep.py --preset tiny --batch-sizes 2,4 --iters 2   # CPU smoke run

No PyTorch side (`bench_cpu.py` / `bench_gpu.py` do the like-for-like
comparison): this shows how far the step is from the matmul peak as the
batch grows (kernel-launch and small-GEMM overhead shrink) and what a frozen
base stored in bfloat16 saves (no float32 -> bfloat16 conversion of every
frozen kernel in each step). FLOPs are the step's matmul FLOPs counted from
its jaxpr (`JaxTraining.matmul_flops`); the peak is the best n^3 `jnp.dot` in
the activation dtype, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from ia3_jax.model import config as config_lib  # noqa: E402
from ia3_jax.model import storage  # noqa: E402


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def sweep(a: argparse.Namespace) -> list[dict]:
  """One row per (batch size, frozen dtype): median seconds per step and achieved FLOP/s.

  The base params and each batch size's batch are made once, and its FLOPs counted once:
  none depends on the frozen base's storage.
  """
  workloads = [H.Workload(a.preset, bs, a.input_length, a.target_length, dtype=a.dtype,
                          attention_impl=a.attention_impl,
                          dpa_implementation=a.dpa_implementation)
               for bs in _ints(a.batch_sizes)]
  base, flops_of, rows = H.random_base(workloads[0]), {}, []
  batches = {w.batch_size: H.make_batch(w) for w in workloads}
  for frozen in a.frozen_dtypes.split(","):
    for w in workloads:
      H.log(f"{w.describe()}, frozen base {frozen}")
      t = H.JaxTraining(w, batches[w.batch_size], frozen_dtype=frozen, base=base)
      secs = H.median(H.interleaved_times({"step": t.step}, warmup=a.warmup,
                                          iters=a.iters)["step"])
      if w.batch_size not in flops_of:
        flops_of[w.batch_size] = t.matmul_flops()
      flops = flops_of[w.batch_size]
      rows.append({"batch_size": w.batch_size, "frozen_dtype": frozen, "s_per_step": secs,
                   "matmul_gflop": flops / 1e9, "gflops": flops / secs / 1e9,
                   "loss": t.last_metrics["loss"]})
      H.log(f"  {secs * 1e3:.1f} ms / step, {flops / secs / 1e9:.0f} GFLOP/s")
      del t
  return rows


def render(rows: list[dict], header: str, peak: float) -> str:
  out = [header, "", "| batch | frozen base | ms / step | matmul GFLOP / step | GFLOP/s | "
         "of peak |", "|---|---|---|---|---|---|"]
  out += [f"| {r['batch_size']} | {r['frozen_dtype']} | {r['s_per_step'] * 1e3:.1f} | "
          f"{r['matmul_gflop']:.1f} | {r['gflops']:.0f} | {r['gflops'] * 1e9 / peak:.0%} |"
          for r in rows]
  return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="t5_1_1_small")
  ap.add_argument("--dtype", default="float32", help="activation dtype (T5Config.dtype)")
  ap.add_argument("--batch-sizes", default="8,32")
  ap.add_argument("--frozen-dtypes", default="float32,bfloat16",
                  help=f"comma list of {', '.join(storage.FROZEN_DTYPES)}")
  ap.add_argument("--input-length", type=int, default=256)
  ap.add_argument("--target-length", type=int, default=16)
  ap.add_argument("--attention-impl", default="einsum", choices=config_lib.ATTENTION_IMPLS)
  ap.add_argument("--dpa-implementation", default=None, choices=("xla", "cudnn"))
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--peak-size", type=int, default=2048, help="n of the n^3 peak matmul")
  ap.add_argument("--json", help="also write the rows here")
  H.add_host_memory_flag(ap)
  a = ap.parse_args(argv)
  memory_line = H.set_host_memory(a.host_memory)
  peak = H.matmul_peak(jnp.dtype(a.dtype), a.peak_size)
  H.log(f"peak {a.dtype} matmul {peak / 1e9:.0f} GFLOP/s on {jax.default_backend()}")
  rows = sweep(a)
  header = (f"{a.preset}, T-Few loss, {a.dtype} activations, attention {a.attention_impl}"
            f"{f' ({a.dpa_implementation})' if a.dpa_implementation else ''}, {a.input_length} "
            f"input tokens, on {jax.devices()[0].device_kind}; {a.dtype} matmul peak "
            f"{peak / 1e9:.0f} GFLOP/s ({a.peak_size}^3); medians of {a.iters} steps; "
            f"{memory_line}")
  print(render(rows, header, peak))
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"header": header, "peak_flops": peak, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
