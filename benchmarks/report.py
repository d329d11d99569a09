"""Markdown report of a `bench_cpu.py` / `bench_gpu.py` results dict, with the step-efficiency
targets (training and rank classification vs PyTorch like for like; FLOP/s vs the matmul peak)."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

# The targets (step efficiency), each dtype against PyTorch in the same precision.
TRAIN_SPEEDUP = 1.3        # (IA)^3 steps/s vs the PyTorch reference, both losses
PEAK_FRACTION = 0.75       # achieved matmul FLOP/s / measured fp32 matmul peak
RANK_VS_PER_CHOICE = 2.0   # examples/s vs the per-choice PyTorch scorer
RANK_VS_REUSE = 1.5        # ... and vs the encoder-reusing one (the T-Few repo's)
MEMORY_RATIO = 0.60        # (IA)^3 peak / full fine-tuning peak on t5_1_1_base
BF16_LOSS_RTOL = 0.01      # bf16 accepted when its losses are within 1% of float32's ...
# ... and its rank-classification predictions equal float32's.

LOSS_NAMES = {"lm": "L_LM only (correct choice decoded)", "tfew": "T-Few L_LM + L_UL + L_LN (all choices)"}


def _med(xs) -> float:
  return float(np.median(xs)) if len(xs) else math.nan


def _g(x: float) -> str:
  if not math.isfinite(x):
    return "n/a"
  return f"{x / 1e9:.0f}" if x >= 1e10 else f"{x / 1e9:.3g}"


def _pct(x: float) -> str:
  return f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"


def _mib(x: float) -> str:
  return f"{x / 2 ** 20:,.0f} MiB"


SHORT = {"float32": "fp32", "bfloat16": "bf16"}
PRECISION = {"float32": "fp32 / fp32",
             "bfloat16": "bf16 activations / torch.autocast(bf16)"}  # ia3-jax / PyTorch


def _machine_line(m: dict[str, Any]) -> str:
  """The CPU with the flags that decide its matmul kernels (older results: avx512_bf16 only)."""
  cpu = m.get("cpu_summary") or f"{m['cpu']} (avx512_bf16: {m['avx512_bf16']})"
  native = m.get("native_bf16")
  bf16 = ("" if native is None else
          f"; native bf16: {'yes (' + ', '.join(native) + ')' if native else 'no'}")
  return f"{cpu}, {m['cores']} cores{bf16}"


def _verdict(ok: bool, value: float, target: float, kind: str = "ratio") -> str:
  if ok:
    return "met"
  if kind == "ratio":
    return f"missed by {100 * (1 - value / target):.0f}% ({value:.2f}x of {target:.2f}x)"
  return f"missed by {100 * (value / target - 1):.0f}% ({value:.2f} vs <= {target:.2f})"


def bf16_accepted(res: dict[str, Any]) -> tuple[Optional[bool], list[str]]:
  """Whether bf16 stays within tolerance of float32 (losses and predictions), with reasons."""
  notes, ok = [], True
  for loss, r in res.get("train", {}).items():
    a, t = r["losses"].get("jax_float32"), r["losses"].get("torch_float32")
    if a and t:
      rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, t))
      notes.append(f"{loss}: ia3-jax fp32 vs PyTorch from the same weights: max relative loss "
                   f"difference {rel:.1e} over {min(len(a), len(t))} steps")
  if "bfloat16" not in res.get("dtypes", []) or "float32" not in res.get("dtypes", []):
    return None, notes
  for loss, r in res.get("train", {}).items():
    a, b = r["losses"].get("jax_float32"), r["losses"].get("jax_bfloat16")
    if not a or not b:
      continue
    rel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
    notes.append(f"{loss}: max relative loss difference bf16 vs fp32 over {len(a)} steps "
                 f"{rel:.2e} (tolerance {BF16_LOSS_RTOL:g})")
    ok &= rel <= BF16_LOSS_RTOL
  rank = res.get("rank")
  if rank and "jax_bfloat16" in rank["predictions"] and "jax_float32" in rank["predictions"]:
    same = rank["predictions"]["jax_bfloat16"] == rank["predictions"]["jax_float32"]
    notes.append(f"rank classification: bf16 predictions {'equal' if same else 'DIFFER from'} "
                 f"fp32's; max |score difference| {rank.get('bf16_max_score_diff', math.nan):.3g} "
                 "nats/token")
    ok &= same
  return ok, notes


def render(res: dict[str, Any]) -> str:
  m = res["machine"]
  peaks = res["peaks"]
  lines = [
      f"### ia3-jax vs PyTorch reference ({res['date']})", "",
      f"- Machine: {_machine_line(m)}; "
      f"JAX {m['jax']} ({m['jax_backend']}), PyTorch {res['torch']} with "
      f"{res['torch_threads']} threads on {res.get('torch_device', 'cpu')}; "
      f"XLA_FLAGS={m['xla_flags'] or '(none)'}; devices: {', '.join(m['devices'][:2])}"
      + (f"; {m['host_memory']}" if m.get("host_memory") else ""),
      "- Precision, like for like: " + "; ".join(
          f"ia3-jax {SHORT.get(d, d)} vs PyTorch {'fp32' if d == 'float32' else 'autocast(' + d + ')'}"
          for d in res.get("dtypes", [])) + "".join(f"; {n}" for n in res.get("dtype_notes", [])),
      f"- Workload: {res['workload']}; {res['warmup']} warm-up + {res['iters']} timed "
      "iterations per case, frameworks alternating in one process; medians (also each side's "
      "fastest iteration against the other's, the least disturbed on a shared machine).",
      f"- Load average (1/5/15 min) before: {_load(res['load_before'])}, after the speed runs: "
      f"{_load(res.get('load_after_speed'))}, at the end: {_load(res.get('load_after'))}. "
      "Other processes may have been running (below when busy).",
      f"- Measured matmul peak ({peaks.get('size', 2048)}^3, best of several): XLA fp32 {_g(peaks['xla_fp32'])} "
      f"GFLOP/s, XLA bf16 {_g(peaks['xla_bf16'])} GFLOP/s; PyTorch fp32 "
      f"{_g(peaks['torch_fp32'])}, bf16 {_g(peaks['torch_bf16'])} GFLOP/s.",
  ]
  busy = res.get("busy_before", []) + res.get("busy_after", [])
  if busy:
    lines.append("- Busy processes seen (%CPU pid command): " + "; ".join(sorted(set(busy))[:6]))
  lines.append("")
  bf16_ok, bf16_notes = bf16_accepted(res)
  if bf16_ok is None:  # no bf16 run, or no fp32 run to compare it with
    bf16_ok = "float32" not in res.get("dtypes", [])
  ref_key = res.get("peak_reference", "xla_fp32")
  ref_peak, ref_name = peaks[ref_key], ref_key.replace("xla_", "XLA ")
  targets: list[tuple[str, str]] = []

  if "train" in res:
    lines += ["#### (IA)^3 training", "",
              "| loss | precision (ia3-jax / PyTorch) | PyTorch steps/s | ia3-jax steps/s | "
              "speedup | fastest vs fastest | first-step loss (PyTorch / ia3-jax) |",
              "|---|---|---|---|---|---|---|"]
    for loss, r in res["train"].items():
      s = {k: _med(v) for k, v in r["seconds"].items()}
      fastest = {k: min(v, default=math.nan) for k, v in r["seconds"].items()}
      for d in _dtypes(res, s):
        jk, tk = f"jax_{d}", f"torch_{d}"
        first = " / ".join(f"{r['losses'][k][0]:.4f}" for k in (tk, jk) if r["losses"].get(k))
        lines.append(f"| {LOSS_NAMES[loss]} | {PRECISION.get(d, d)} | {_rate(s, tk)} | "
                     f"{_rate(s, jk)} | {_x(_div(s.get(tk, math.nan), s.get(jk, math.nan)))} | "
                     f"{_x(_div(fastest.get(tk, math.nan), fastest.get(jk, math.nan)))} | "
                     f"{first} |")
      d = _best_dtype(res, s, bf16_ok)
      if d:
        best = s[f"torch_{d}"] / s[f"jax_{d}"]
        t = f"(IA)^3 training, {loss}: >= {TRAIN_SPEEDUP}x PyTorch ({SHORT.get(d, d)} vs same)"
        targets.append((t, f"{best:.2f}x: " + _verdict(best >= TRAIN_SPEEDUP, best, TRAIN_SPEEDUP)))
    lines += ["", "Achieved FLOP/s (ia3-jax's matmul FLOPs per step counted from the step's "
              "jaxpr on the float32 model; XLA's cost analysis of the compiled step, which also "
              "counts elementwise ops, in brackets), and as a fraction of the measured "
              f"{ref_name} matmul peak. PyTorch is credited with the same FLOPs: for the T-Few "
              "loss it also projects the repeated encoder output to cross-attention keys and "
              "values once per choice (ia3-jax: once per example), extra work not counted:", "",
              "| loss | precision | matmul GFLOP/step [XLA] | PyTorch GFLOP/s | "
              "ia3-jax GFLOP/s |", "|---|---|---|---|---|"]
    for loss, r in res["train"].items():
      s = {k: _med(v) for k, v in r["seconds"].items()}
      f = r["matmul_flops"]
      for d in _dtypes(res, s):
        cells = [f"{_g(f / s[k])} ({_pct(f / s[k] / ref_peak)})" if k in s else "n/a"
                 for k in (f"torch_{d}", f"jax_{d}")]
        xf = r["xla_flops"].get(f"jax_{d}", math.nan)
        lines.append(f"| {loss} | {SHORT.get(d, d)} | {f / 1e9:.1f} [{xf / 1e9:.1f}] | "
                     + " | ".join(cells) + " |")
        k = f"jax_{d}"
        if k in s and (d == "float32" or bf16_ok):
          frac = f / s[k] / ref_peak
          targets.append((f"achieved FLOP/s, {loss}, {SHORT.get(d, d)}: >= "
                          f"{_pct(PEAK_FRACTION)} of {ref_name} peak",
                          f"{_pct(frac)}: " + _verdict(frac >= PEAK_FRACTION, frac, PEAK_FRACTION)))
    lines.append("")

  if "rank" in res:
    r = res["rank"]
    s = {k: _med(v) for k, v in r["seconds"].items()}
    fastest = {k: min(v, default=math.nan) for k, v in r["seconds"].items()}
    b = _batch_size(res)
    lines += ["#### Rank classification (length-normalised scores, argmax)", "",
              "| scorer | examples/s | vs PyTorch per choice | vs PyTorch encoder reused | "
              "encoder reused, fastest vs fastest | achieved FLOP/s |", "|---|---|---|---|---|---|"]
    for k in s:
      row = f"| {_rank_label(k)} | {b / s[k]:.2f} |"
      if k.startswith("torch"):
        row += " | | | |"
      else:
        d, f = k[len("jax_"):], r["matmul_flops"]
        reuse = f"torch_reuse_encoder_{d}"
        row += (f" {_x(s.get(f'torch_per_choice_{d}', math.nan) / s[k])} |"
                f" {_x(s.get(reuse, math.nan) / s[k])} |"
                f" {_x(fastest.get(reuse, math.nan) / fastest[k])} |"
                f" {_g(f / s[k])} GFLOP/s ({_pct(f / s[k] / ref_peak)} of {ref_name} peak) |")
      lines.append(row)
    preds = r["predictions"]
    ref_key = next((k for k in ("torch_reuse_encoder_float32", "torch_reuse_encoder_bfloat16")
                    if k in preds), None)
    ref = preds.get(ref_key)
    lines += ["", f"Predictions equal to {_rank_label(ref_key or '?')}'s: " + ", ".join(
        f"{_rank_label(k)}: {'yes' if v == ref else 'NO'}" for k, v in preds.items()
        if k != ref_key), ""]
    d = _best_dtype(res, s, bf16_ok)
    for kind, target in (("per_choice", RANK_VS_PER_CHOICE), ("reuse_encoder", RANK_VS_REUSE)):
      ref_k = f"torch_{kind}_{d}"
      if d and ref_k in s:
        x = s[ref_k] / s[f"jax_{d}"]
        ok = x >= target
        targets.append((f"rank classification vs {_rank_label(ref_k)}: >= {target:g}x",
                        f"{x:.2f}x: " + _verdict(ok, x, target)))

  if "memory" in res:
    mem = res["memory"]
    lines += [f"#### Peak memory, (IA)^3 vs full fine-tuning ({res['memory_workload']}, "
              "T-Few loss)", "",
              "XLA buffer assignment of the compiled train step (`compiled.memory_analysis()`): "
              "peak = argument + output - alias (donated) + temp bytes. Peak RSS: VmHWM of a "
              "fresh process per row after its steps, and in brackets the RSS before any model "
              "was built (imports only). Configurations: default = the library as is; remat = "
              "`network.Blocks(remat=\"full\")` (every layer recomputed in the backward pass) and "
              "XLA's memory-optimised scheduler (`--xla_cpu_scheduler_type="
              "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`).", "",
              "| mode | config | trainable params | XLA argument | XLA output | XLA alias | XLA temp | "
              "XLA peak | peak RSS [baseline] | device peak in use |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    configs = []
    for key, e in mem.items():
      side, mode = key.split("@")[0].split("_")
      config = e.get("config", "default")
      if side == "jax" and config not in configs:
        configs.append(config)
      x = e.get("xla")
      xcells = (" | ".join(_mib(x[k]) for k in ("argument", "output", "alias", "temp"))
                + f" | {_mib(x['peak_bytes'])}") if x else "- | - | - | - | -"
      lines.append(f"| {'ia3-jax' if side == 'jax' else 'PyTorch'} "
                   f"{'(IA)^3' if mode == 'ia3' else 'full fine-tuning'} | {config}"
                   f" | {e['num_trainable']:,} | {xcells} | {_mib(e['peak_rss'])} "
                   f"[{_mib(e['baseline_rss'])}] | "
                   f"{_mib(e['device_peak']) if e.get('device_peak') else '-'} |")
    lines.append("")
    for config in configs:
      sfx = "" if config == "default" else f"@{config}"
      ia3_e, full_e = mem.get(f"jax_ia3{sfx}"), mem.get(f"jax_full{sfx}")
      if not ia3_e or not full_e:
        continue
      ratio = _div(ia3_e["xla"]["peak_bytes"], full_e["xla"]["peak_bytes"])
      rss = _div(ia3_e["peak_rss"] - ia3_e["baseline_rss"], full_e["peak_rss"] - full_e["baseline_rss"])
      lines.append(f"- {config}: (IA)^3 / full fine-tuning, XLA peak {ratio:.2f}, peak RSS above "
                   f"baseline {rss:.2f}")
      targets.append((f"(IA)^3 peak memory <= {_pct(MEMORY_RATIO)} of full fine-tuning "
                      f"(XLA peak, {config})",
                      f"{ratio:.2f}: " + _verdict(ratio <= MEMORY_RATIO, ratio, MEMORY_RATIO, "max")))
    if "torch_ia3" in mem and "torch_full" in mem:
      lines.append(f"- PyTorch: (IA)^3 / full fine-tuning, peak RSS above baseline "
                   f"{_rss_ratio(mem, 'torch'):.2f}")
    lines.append("")

  if bf16_notes:
    lines += ["#### Numerics (same initial weights and batch; bf16 = bf16 activations and "
              "matmul inputs with float32 sums, float32 params, norms, softmax and losses)", ""]
    lines += [f"- {n}" for n in bf16_notes]
    if "bfloat16" in res.get("dtypes", []):
      lines += [f"- bf16 {'accepted' if bf16_ok else 'NOT accepted'} for the targets "
                "(otherwise fp32 numbers are used)."]
    lines.append("")
  if targets:
    lines += ["#### Targets (step efficiency; defined for the CPU run)", "", "| target | result |",
              "|---|---|"]
    lines += [f"| {t} | {v} |" for t, v in targets]
    lines.append("")
  return "\n".join(lines)


def _div(a: float, b: float) -> float:
  return a / b if b else math.nan


def _rss_ratio(mem: dict, side: str) -> float:
  above = [mem[f"{side}_{m}"]["peak_rss"] - mem[f"{side}_{m}"]["baseline_rss"] for m in ("ia3", "full")]
  return _div(*above)


def _load(x) -> str:
  return "n/a" if not x else "/".join(f"{v:.2f}" for v in x)


def _rate(s: dict, k: str) -> str:
  return f"{1 / s[k]:.3f}" if k in s else "n/a"


def _x(v: Optional[float]) -> str:
  return f"{v:.2f}x" if v is not None and math.isfinite(v) else "n/a"


def _rank_label(k: str) -> str:
  for kind, label in (("torch_per_choice_", "PyTorch, full forward per choice"),
                      ("torch_reuse_encoder_", "PyTorch, encoder reused (T-Few repo)"),
                      ("jax_", "ia3-jax (`scoring.rank_classify`)")):
    if k.startswith(kind):
      d = k[len(kind):]
      return f"{label}, {SHORT.get(d, d)}"
  return k


def _dtypes(res: dict, seconds: dict) -> list[str]:
  """The dtypes timed on both sides (older results: the dtypes alone)."""
  return [d for d in res.get("dtypes", []) if f"jax_{d}" in seconds]


def _best_dtype(res: dict, seconds: dict, bf16_ok: bool) -> Optional[str]:
  """The dtype the targets use: bf16 when accepted (and timed), else fp32."""
  for d in (("bfloat16",) if bf16_ok else ()) + ("float32",):
    if f"jax_{d}" in seconds and any(k.startswith("torch") and k.endswith(d) for k in seconds):
      return d
  return None


def _batch_size(res: dict) -> int:
  return int(res["workload"].split("batch ")[1].split(",")[0])
