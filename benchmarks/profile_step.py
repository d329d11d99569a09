"""Where the time of one ia3-jax train step (or rank classification) goes on this machine.

  python benchmarks/profile_step.py --loss tfew --dtype float32

  python benchmarks/profile_step.py --preset t0_3b --dtype bfloat16 \
      --attention-impl dot_product_attention --dpa-implementation cudnn   # on a GPU

Traces a few steps with `jax.profiler`, reads the trace back
(`jax.profiler.ProfileData`), and charges the time of every XLA thunk (CPU)
or kernel (GPU: the device plane's "XLA Ops" line) to its HLO instruction in
the compiled module; ops that run at the same time share it, so the charges
add up to the time during which something ran. Dot fusions and cuBLAS gemm
calls get their FLOPs from the dot (so each gets an achieved GFLOP/s), and
everything is grouped by the source op (`op_name` metadata: encoder/decoder,
layer kind, projection) and by kind (matmul, fused attention, elementwise
fusion, transpose/copy, ...).
`--trace-dir` keeps the trace and the compiled HLO for a later look.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from typing import Collection, Optional

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from ia3_jax.model import config as config_lib  # noqa: E402

_INSTR = re.compile(
    r"^\s*(?:ROOT )?%(\S+) = (\([^)]*\)|\S+?)(?:\{[^}]*\})? (\S+?)\((.*?)\)(.*)$")
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
_SHAPE = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")


def _shape(s: str) -> tuple[int, ...]:
  """Dimensions of an HLO shape; of its first element for a tuple (a gemm's result)."""
  m = _SHAPE.match(s.lstrip("("))
  return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def parse_hlo(text: str) -> tuple[dict, dict]:
  """(instructions by name: dict(opcode, shape, calls, op_name), dot FLOPs per computation)."""
  instrs: dict[str, dict] = {}
  comp_flops: dict[str, float] = collections.defaultdict(float)
  comp, shapes = None, {}
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      comp, shapes = head.group(1), {}
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, operands, rest = m.groups()
    shapes[name] = _shape(shape)
    calls = re.search(r"calls=%(\S+?)[,\s]", rest + " ")
    op_name = re.search(r'op_name="([^"]+)"', rest)
    instrs[name] = {"opcode": opcode, "shape": shapes[name], "comp": comp,
                    "calls": calls.group(1) if calls else None,
                    "op_name": op_name.group(1) if op_name else ""}
    gemm = opcode == "custom-call" and any(f'"{t}"' in rest for t in _GEMM_TARGETS)
    if opcode == "custom-call" and "__cudnn$fmha" in rest:
      instrs[name]["fused_attention"] = True
    if (opcode == "dot" or gemm) and comp is not None:
      lhs = operands.split(",")[0].strip().lstrip("%").split(" ")[-1].lstrip("%")
      contracting = (re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest) or
                     re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest))
      dims = [int(d) for d in re.findall(r"\d+", contracting.group(1))] if contracting else []
      lshape = shapes.get(lhs, ())
      k = float(np.prod([lshape[d] for d in dims])) if lshape and dims else 1.0
      instrs[name]["flops"] = 2.0 * float(np.prod(shapes[name] or (1,))) * k
      comp_flops[comp] += instrs[name]["flops"]
  return instrs, comp_flops


def _kind(name: str, info: Optional[dict], flops: float) -> str:
  if flops > 0:
    return "matmul"
  if info and info.get("fused_attention"):
    return "fused attention"
  base = re.sub(r"\.\d+$", "", name)
  if "transpose" in base or "copy" in base:
    return "transpose/copy"
  if "reduce" in base:
    return "reduction"
  return "elementwise/other"


def _site(op_name: str) -> str:
  """A short source label from XLA op_name metadata."""
  parts = op_name.split("/")
  bwd = "bwd" if any(p.startswith("transpose(") for p in parts) else "fwd"
  stack = ("encoder" if "/encoder/" in op_name else "decoder" if "/decoder/" in op_name
           else "other")
  block = next((p for p in ("attention", "self_attention", "encoder_decoder_attention", "mlp",
                            "logits_dense", "layer_norm", "relpos_bias")
                 if f"/{p}/" in op_name or op_name.endswith(p) or f"{p}/" in op_name), "")
  if not block:
    block = "/".join(q for q in parts[-2:] if q)[:60]
  proj = next((p for p in ("query", "key", "value", "out", "wi_0", "wi_1", "wi", "wo")
               if f"/{p}/" in op_name), "")
  if "bhqd,bhkd" in op_name or "bhqk,bhkd" in op_name:
    proj = "scores" if "bhqd,bhkd" in op_name else "weights@v"
  if not block and "logits" in op_name:
    block = "logits"
  return f"{stack} {block} {proj} {bwd}".replace("  ", " ").strip()


def wall_shares(intervals: list[tuple[float, float, str]]) -> tuple[collections.Counter, float]:
  """(wall time charged to each name, time with more than one name running).

  Ops that run at the same time (XLA:CPU dispatches independent thunks
  concurrently; a thunk can also show up on several threads) share each
  instant equally, so the charges add up to the wall time during which
  something ran: two 2 ms products side by side cost 1 ms each, not 2.
  """
  points = sorted([(s, 1, n) for s, e, n in intervals] + [(e, -1, n) for s, e, n in intervals],
                  key=lambda p: (p[0], p[1]))
  active: collections.Counter = collections.Counter()
  shares: collections.Counter = collections.Counter()
  overlapped, last = 0.0, 0.0
  for t, step, name in points:
    if active and t > last:  # `active` is empty before the first point
      for n in active:
        shares[n] += (t - last) / len(active)
      overlapped += (t - last) if len(active) > 1 else 0.0
    active[name] += step
    if active[name] == 0:
      del active[name]
    last = t
  return shares, overlapped


def op_times(data, steps: int, instructions: Collection[str] = ()
             ) -> tuple[collections.Counter, float, float]:
  """(wall ns charged to each HLO instruction, executor / module wall ns, ns with ops
  overlapping; all per step) from a trace.

  CPU: thunk events on the XLA pool threads, and on the caller's thread those named
  after one of `instructions` (with synchronous dispatch the caller runs thunks too);
  GPU: kernel events on the device plane's "XLA Ops" line, the module's time from
  its "XLA Modules" line. Concurrent ops share the time (`wall_shares`).
  """
  intervals: list[tuple[float, float, str]] = []
  wall = 0.0
  for plane in data.planes:
    gpu = plane.name.startswith("/device:GPU")
    for line in plane.lines:
      pool = "XLAEigen" in line.name
      for ev in line.events:
        name = ev.name.lstrip("%")
        if (gpu and line.name == "XLA Ops") or (pool and not ev.name.startswith(
            ("ThunkExecutor", "SlinkyThreadPool", "end: "))) or (not gpu and name in instructions):
          intervals.append((ev.start_ns, ev.start_ns + ev.duration_ns, name))
        elif (gpu and line.name == "XLA Modules") or (  # CPU: launch + wait on the caller's
            not gpu and not pool  # thread (PjRt's, or Python's if synchronous)
            and ev.name.startswith("ThunkExecutor::Execute")):
          wall += ev.duration_ns
  shares, overlapped = wall_shares(intervals)
  per = collections.Counter({k: v / steps for k, v in shares.items()})
  return per, wall / steps, overlapped / steps


def profile(fn, steps: int, compiled_text: str, trace_dir: Optional[str] = None) -> dict:
  """Times `steps` calls of `fn` (after one untraced call) and traces them."""
  d = trace_dir or tempfile.mkdtemp(prefix="ia3jax_trace_")
  H.log("first call (compiles)")
  fn()
  H.log(f"{steps} untraced + {steps} traced calls")
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  host = (time.perf_counter() - t0) / steps
  with jax.profiler.trace(d):
    for _ in range(steps):
      fn()
  f = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
  H.log(f"reading {f} ({os.path.getsize(f) / 1e6:.1f} MB)")
  instrs, comp_flops = parse_hlo(compiled_text)
  per, wall, overlapped = op_times(jax.profiler.ProfileData.from_file(f), steps, instrs)
  return {"per": per, "instrs": instrs, "comp_flops": comp_flops, "wall_ns": wall,
          "overlapped_ns": overlapped, "host_s": host}


def report(p: dict, top: int = 25) -> str:
  per, instrs, comp_flops = p["per"], p["instrs"], p["comp_flops"]
  total = sum(per.values())
  by_kind = collections.Counter()
  by_site = collections.Counter()
  site_flops = collections.Counter()
  rows = []
  for name, ns in per.items():
    info = instrs.get(name)
    flops = comp_flops.get(info["calls"], 0.0) if info and info["calls"] else 0.0
    if info and "flops" in info:  # a dot, or a cuBLAS gemm call
      flops = info["flops"]
    kind = _kind(name, info, flops)
    by_kind[kind] += ns
    site = _site(info["op_name"]) if info else "?"
    if kind == "matmul":
      by_site[site] += ns
      site_flops[site] += flops
    rows.append((ns, name, kind, flops, site, info["shape"] if info else ()))
  out = [f"step {p['host_s'] * 1e3:.1f} ms untraced (host clock); traced, executor / module "
         f"{p['wall_ns'] / 1e6:.1f} ms, of which ops ran {total / 1e6:.1f} ms (two or more at "
         f"once {p['overlapped_ns'] / 1e6:.1f} ms: they share that time) and none ran "
         f"{max(p['wall_ns'] - total, 0.0) / 1e6:.1f} ms", "",
         "| kind | ms | share |", "|---|---|---|"]
  out += [f"| {k} | {v / 1e6:.1f} | {100 * v / total:.1f}% |" for k, v in by_kind.most_common()]
  mm_ns, mm_fl = by_kind["matmul"], sum(site_flops.values())
  out += ["", f"matmul thunks: {mm_fl / 1e9:.1f} GFLOP in {mm_ns / 1e6:.1f} ms -> "
          f"{mm_fl / (mm_ns / 1e9) / 1e9:.0f} GFLOP/s", "",
          "| matmul site | ms | GFLOP | GFLOP/s |", "|---|---|---|---|"]
  for site, ns in by_site.most_common(top):
    out.append(f"| {site} | {ns / 1e6:.1f} | {site_flops[site] / 1e9:.2f} | "
               f"{site_flops[site] / ns:.0f} |")
  other = collections.Counter()
  for ns, name, kind, flops, site, shape in rows:
    if kind != "matmul":
      other[f"{kind}: {site}"] += ns
  out += ["", "| non-matmul site | ms |", "|---|---|"]
  out += [f"| {k} | {v / 1e6:.1f} |" for k, v in other.most_common(top)]
  out += ["", "| top thunks | kind | ms | shape | GFLOP/s | site |", "|---|---|---|---|---|---|"]
  for ns, name, kind, flops, site, shape in sorted(rows, reverse=True)[:top]:
    rate = f"{flops / ns:.0f}" if flops else ""
    out.append(f"| {name} | {kind} | {ns / 1e6:.1f} | {list(shape)} | {rate} | {site} |")
  return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="t5_1_1_small")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--loss", choices=("lm", "tfew", "rank"), default="tfew")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--input-length", type=int, default=256)
  ap.add_argument("--target-length", type=int, default=16)
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--attention-impl", default="einsum", choices=config_lib.ATTENTION_IMPLS)
  ap.add_argument("--dpa-implementation", default=None, choices=("xla", "cudnn"))
  ap.add_argument("--trace-dir", help="keep the trace here, with the compiled HLO (step.hlo.txt)")
  H.add_host_memory_flag(ap)
  a = ap.parse_args(argv)
  memory_line = H.set_host_memory(a.host_memory)
  w = H.Workload(a.preset, a.batch_size, a.input_length, a.target_length, dtype=a.dtype,
                 attention_impl=a.attention_impl, dpa_implementation=a.dpa_implementation)
  batch, base = H.make_batch(w), H.random_base(w)
  if a.loss == "rank":
    rc = H.JaxRankClassification(H.JaxTraining(w, batch, base=base), batch)
    fn, text = (lambda: jax.block_until_ready(rc())), rc.compiled().as_text()
  else:
    t = H.JaxTraining(w, H.correct_choice_batch(batch) if a.loss == "lm" else batch,
                      loss=H.LM_ONLY if a.loss == "lm" else H.TFEW, base=base)
    fn, text = t.step, t.compiled().as_text()
  H.log(f"{w.describe()}, {a.loss}: compiled; profiling")
  if a.trace_dir:
    os.makedirs(a.trace_dir, exist_ok=True)
    with open(os.path.join(a.trace_dir, "step.hlo.txt"), "w") as f:
      f.write(text)
  print(f"{w.describe()}, {a.loss} on {jax.default_backend()}; load {H.load_average()}; "
        f"{memory_line}")
  print(report(profile(fn, a.steps, text, a.trace_dir), a.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
