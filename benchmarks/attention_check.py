"""The attention cores side by side on this machine: same logits and gradients, and their speed.

  python benchmarks/attention_check.py                          # t5_1_1_small shape, random weights
  python benchmarks/attention_check.py --preset t0_3b --dtype bfloat16 --batch-size 8   # on a GPU

For each `T5Config.attention_impl` / `dpa_implementation` this backend has
("einsum"; "dot_product_attention" with XLA's implementation; on a CUDA GPU
also cuDNN's fused kernel), one forward + backward of the network (a
length-masked log-likelihood of random targets, gradients for every
parameter) from the same params and batch: the largest difference of the
logits and gradients from the einsum core's, relative to their magnitudes,
and the median time of `--iters` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ia3_jax.model import config as config_lib  # noqa: E402
from ia3_jax.model import network  # noqa: E402


def cores(backend: str) -> list[tuple[str, Optional[str]]]:
  """(attention_impl, dpa_implementation) pairs this backend runs."""
  out = [("einsum", None), ("dot_product_attention", "xla")]
  if backend in ("gpu", "cuda"):
    out.append(("dot_product_attention", "cudnn"))
  return out


def _batch(config: config_lib.T5Config, batch: int, enc: int, dec: int) -> dict[str, Any]:
  rng = np.random.default_rng(0)
  tokens = lambda n: rng.integers(2, config.vocab_size, (batch, n)).astype(np.int32)
  out = {"enc": tokens(enc), "dec_in": tokens(dec), "targets": tokens(dec)}
  for row in range(batch):  # padded rows: every length different
    out["enc"][row, enc - row * enc // (2 * batch):] = 0
    out["targets"][row, dec - row * dec // (2 * batch):] = 0
  return out


def _loss_and_grad(config: config_lib.T5Config, params: Any, b: dict[str, Any]):
  model = network.Transformer(config)

  def loss(p):
    logits = model.apply({"params": p}, b["enc"], b["dec_in"], b["targets"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)[..., 0]
    return -jnp.sum(logp * (b["targets"] > 0)) / jnp.sum(b["targets"] > 0), logits
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _rel(x: Any, ref: Any) -> float:
  """max |x - ref| / (max |ref| + tiny) over the leaves."""
  worst = 0.0
  for a, r in zip(jax.tree.leaves(x), jax.tree.leaves(ref)):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    worst = max(worst, float(np.max(np.abs(a - r)) / (np.max(np.abs(r)) + 1e-30)))
  return worst


def run(a: argparse.Namespace) -> dict[str, Any]:
  base = config_lib.get_config(a.preset, dtype=a.dtype)
  params = network.init_params(network.Transformer(base), jax.random.PRNGKey(0))
  b = {k: jnp.asarray(v) for k, v in _batch(base, a.batch_size, a.input_length,
                                             a.target_length).items()}
  rows, ref = [], None
  for impl, dpa in cores(jax.default_backend()):
    fn = _loss_and_grad(base.replace(attention_impl=impl, dpa_implementation=dpa), params, b)
    (loss, logits), grads = jax.block_until_ready(fn(params))
    times = []
    for _ in range(a.iters):
      t = time.perf_counter()
      jax.block_until_ready(fn(params))
      times.append(time.perf_counter() - t)
    out = (logits, grads)
    ref = ref or out
    rows.append({"attention_impl": impl, "dpa_implementation": dpa, "loss": float(loss),
                 "logits_rel_diff": _rel(out[0], ref[0]), "grads_rel_diff": _rel(out[1], ref[1]),
                 "seconds": float(np.median(times))})
  return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()][:2],
          "preset": a.preset, "dtype": a.dtype, "batch": a.batch_size,
          "input_length": a.input_length, "target_length": a.target_length, "rows": rows}


def render(res: dict[str, Any]) -> str:
  lines = [f"{res['preset']}, {res['dtype']}, batch {res['batch']} x {res['input_length']} "
           f"input / {res['target_length']} target tokens on {res['backend']} "
           f"({', '.join(res['devices'])})", "",
           "| attention core | loss | logits vs einsum | gradients vs einsum | s / fwd+bwd |",
           "|---|---|---|---|---|"]
  for r in res["rows"]:
    core = r["attention_impl"] + (f" ({r['dpa_implementation']})" if r["dpa_implementation"]
                                  else "")
    lines.append(f"| {core} | {r['loss']:.6f} | {r['logits_rel_diff']:.1e} | "
                 f"{r['grads_rel_diff']:.1e} | {r['seconds']:.4f} |")
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="t5_1_1_small")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--input-length", type=int, default=256)
  ap.add_argument("--target-length", type=int, default=16)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--json", help="also write the results here")
  a = ap.parse_args(argv)
  res = run(a)
  print(render(res))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
