"""Memory of T-Few on real-size models, without weights: compile from abstract shapes.

  python benchmarks/memory_real_size.py --presets t0_3b,t0_11b \
      --frozen-dtypes float32,bfloat16,int8,int4          # the README's memory table
  python benchmarks/memory_real_size.py --loader          # the HF loader's peak memory

Step memory: the (IA)^3 train step (T-Few loss, Adafactor, bf16 activations,
`Blocks(remat="full")`, batch 8 x 256 input tokens, 4 choices x 16 tokens) is
lowered from ShapeDtypeStructs and compiled for one device; XLA's buffer
assignment (`memory_analysis()`) gives the argument bytes (params, optimizer
state, batch) and the temporaries. Nothing is allocated. (XLA stores int4
packed, two per byte, on CPU too.)

Loader: a random HF T5 directory (transformers `save_pretrained`, safetensors)
is read with `FROZEN_DTYPE` storage in a fresh process; the peak of its anonymous
memory (RssAnon, sampled; the peak RSS would also count the file's pages mapped while
reading) above the start of the load is compared with the file and the stored size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2 ** 30


def step_memory(preset: str, frozen_dtype: str, batch: int = 8, inputs: int = 256,
                choices: int = 4, targets: int = 16, scan_layers: bool = False) -> dict:
  import jax
  import jax.numpy as jnp
  from ia3_jax.model import config as config_lib, storage
  from ia3_jax.objectives import losses
  from ia3_jax.peft import ia3
  from ia3_jax.train import assembly, optimizers, trainer
  from benchmarks import harness
  spec = assembly.ModelSpec(config_lib.get_config(preset, dtype="bfloat16"),
                            peft=ia3.IA3Config(), remat="full", scan_layers=scan_layers,
                            frozen_dtype=frozen_dtype)
  tr = trainer.Trainer(assembly.layout(spec),
                       optimizer=optimizers.OptimizerConfig(total_steps=1000).build(),
                       loss=losses.LossConfig(), enable_dropout=False)
  sh = tr.partitioner.batch_sharding()
  sds = lambda *shape: jax.ShapeDtypeStruct((batch, *shape), jnp.int32, sharding=sh)  # noqa: E731
  abstract_batch = {"encoder_input_tokens": sds(inputs), "choice_tokens": sds(choices, targets),
                    "choice_mask": sds(choices), "label": sds(), "example_mask": sds()}
  t0 = time.time()
  compiled = tr.lower_step(tr.abstract_state(), abstract_batch).compile()
  stats = harness.memory_stats(compiled)
  frozen = tr.layout.abstract_frozen
  return {"preset": preset, "frozen_dtype": frozen_dtype, "scan_layers": scan_layers,
          "compile_s": round(time.time() - t0, 1),
          "argument_gib": stats["argument"] / GIB, "temp_gib": stats["temp"] / GIB,
          "peak_gib": stats["peak_bytes"] / GIB,
          "frozen_gib": storage.nbytes(frozen) / GIB, "num_params": tr.layout.num_params()}


class AnonPeak:
  """Samples this process's anonymous resident memory (/proc/self/status RssAnon) every few
  ms in a thread: unlike the peak RSS it leaves out file pages mapped while reading."""

  def __init__(self):
    import threading
    self.peak, self._stop = 0, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  @staticmethod
  def now() -> int:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          return int(line.split()[1]) * 1024
    return 0

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.now())
      self._stop.wait(0.002)

  def __enter__(self):
    self.start = self.now()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.now())


def loader_memory(frozen_dtype: str, directory: str) -> dict:
  """Peak memory of reading `directory` into `frozen_dtype` storage (run in a fresh process)."""
  from benchmarks import harness
  baseline = harness.peak_rss_bytes()
  import jax
  from ia3_jax.interop import hf_checkpoints
  from ia3_jax.model import storage
  from ia3_jax.peft import ia3
  from ia3_jax.train import assembly
  lay = assembly.layout(assembly.ModelSpec(hf_checkpoints.load_hf_config(directory),
                                           peft=ia3.IA3Config(), frozen_dtype=frozen_dtype))
  before = harness.peak_rss_bytes()
  with AnonPeak() as anon:
    _, params = hf_checkpoints.load_hf_checkpoint(directory, convert=lay.store_base_tensor)
    jax.block_until_ready(params)
  stored = storage.nbytes(params)
  files = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
              if f.endswith(".safetensors"))
  return {"frozen_dtype": frozen_dtype, "file_bytes": files, "stored_bytes": stored,
          "load_peak_above_start": harness.peak_rss_bytes() - before,
          "anon_peak_above_start": anon.peak - anon.start,
          "baseline_rss": baseline}


def make_random_t5(directory: str, shape: str) -> None:
  from tests import hf_utils
  sizes = {"base": dict(d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12,
                        num_heads=12, d_kv=64, vocab_size=32128)}
  hf_utils.make_hf_model(directory, "t5_1_1", "small", **sizes[shape])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--presets", default="t0_3b,t0_11b")
  p.add_argument("--frozen-dtypes", default="float32,bfloat16,int8,int4")
  p.add_argument("--scan-layers", default="false",
                 help="comma-separated: false, true (Blocks(scan_layers=...)); default false")
  p.add_argument("--loader", action="store_true", help="measure the HF loader instead")
  p.add_argument("--loader-shape", default="base")
  p.add_argument("--one", nargs=3, metavar=("PRESET", "DTYPE", "SCAN"), help=argparse.SUPPRESS)
  p.add_argument("--load-one", nargs=2, metavar=("DTYPE", "DIR"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    preset, dtype, scan = args.one
    print(json.dumps(step_memory(preset, dtype, scan_layers=scan == "true")), flush=True)
    return 0
  if args.load_one:
    print(json.dumps(loader_memory(*args.load_one)), flush=True)
    return 0
  me = [sys.executable, os.path.abspath(__file__)]
  if args.loader:
    with tempfile.TemporaryDirectory() as d:
      make_random_t5(d, args.loader_shape)
      for dtype in args.frozen_dtypes.split(","):
        out = subprocess.run(me + ["--load-one", dtype, d], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{dtype:>9}: file {r['file_bytes'] / GIB:.2f} GiB, stored "
              f"{r['stored_bytes'] / GIB:.2f} GiB; while loading, peak anonymous memory "
              f"{r['anon_peak_above_start'] / GIB:.2f} GiB above the start "
              f"({r['anon_peak_above_start'] / r['stored_bytes']:.2f}x stored), peak RSS "
              f"{r['load_peak_above_start'] / GIB:.2f} GiB (with the file's mapped pages)",
              flush=True)
    return 0
  print("| model | FROZEN_DTYPE | SCAN_LAYERS | arguments GiB | temporaries GiB | total GiB "
        "| frozen GiB | compile s |\n|---|---|---|---|---|---|---|---|", flush=True)
  for preset, dtype, scan in itertools.product(args.presets.split(","),
                                               args.frozen_dtypes.split(","),
                                               args.scan_layers.split(",")):
    out = subprocess.run(me + ["--one", preset, dtype, scan], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    print(f"| {preset} | {dtype} | {scan} | {r['argument_gib']:.1f} | {r['temp_gib']:.1f} | "
          f"{r['argument_gib'] + r['temp_gib']:.1f} | {r['frozen_gib']:.1f} | "
          f"{r['compile_s']:.0f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
