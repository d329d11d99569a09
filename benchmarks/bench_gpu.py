"""The GPU variant: T0-3B shape in bfloat16, ia3-jax vs PyTorch (CUDA when available).

  python benchmarks/bench_gpu.py                       # on a GPU machine (jax[cuda], torch+cuda)
  python benchmarks/bench_gpu.py --preset tiny --iters 1 --memory-preset tiny   # CPU smoke run
  python benchmarks/bench_gpu.py --dpa-implementation cudnn     # cuDNN's fused attention

The same sections as `bench_cpu.py` with other defaults: t0_3b shape, batch
8, 256 input tokens, ia3-jax in bfloat16 (float32 params, bf16 activations
and matmul inputs with f32 accumulation) with its attention through
`jax.nn.dot_product_attention`, PyTorch under `torch.autocast` bfloat16 with
float32 params, achieved FLOP/s as a fraction of the measured
XLA bf16 matmul peak (8192^3), and peak memory from XLA's buffer assignment
plus the device allocator's peak per mode (a fresh process each). Without
a GPU it runs on CPU (useful only as a smoke check).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# JAX and PyTorch share the GPU in one process: JAX must not preallocate 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from benchmarks import bench_cpu  # noqa: E402


def _torch_device() -> str:
  try:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
  except ImportError:
    return "cpu"


def build_parser():
  gpu = _torch_device() == "cuda"
  return bench_cpu.build_parser(
      __doc__.splitlines()[0], preset="t0_3b", dtypes="bfloat16", memory_preset="t0_3b",
      torch_device=_torch_device(), attention_impl="dot_product_attention",
      peak_reference="xla_bf16",
      peak_size=8192 if gpu else 2048, iters=5 if gpu else 3, warmup=2 if gpu else 1,
      torch_threads=os.cpu_count() or 2)


def main(argv: Optional[list[str]] = None) -> int:
  return bench_cpu.main(argv, parser=build_parser())


if __name__ == "__main__":
  sys.exit(main())
