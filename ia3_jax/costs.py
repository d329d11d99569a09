"""The T-Few paper's cost model: FLOPs and storage of T-Few vs few-shot ICL.

Liu et al. 2022 (arXiv 2205.05638), section 4.2 / Table 1, estimate costs
with the standard "2 FLOPs per parameter per token" rule:

* A decoder-only model with N parameters spends about 2 N FLOPs per token.
* An encoder-decoder sends input tokens through the encoder and target
  tokens through the decoder, each holding about N / 2 parameters, so a token
  costs about 2 (N / 2) = N FLOPs.
* Training costs about 3x inference (forward + a backward pass of ~2x the
  forward). The paper keeps the 3x for (IA)^3 although frozen weights need
  no weight gradients; so do we.
* Storage per task: T-Few keeps its (IA)^3 vectors (the backbone is shared);
  ICL keeps its in-context examples as token ids (4 bytes, i.e. int32, per
  token: 41 x 98 x 4 B = 16,072 B, the paper's "16 kB").

Paper figures for T0-11B: inference 11e9 x 103 = 1.1e12 FLOPs per example;
GPT-3 175B with 41 in-context examples of 98 tokens: 2 x 175e9 x 41 x 98 =
1.4e15; training 3 x 11e9 x 1000 steps x 8 examples x 103 tokens = 2.7e16;
(IA)^3 storage 1,081,344 params x 4 B = 4,325,376 B (4.33 MB, 4.125 MiB; the
paper prints "4.2 MB"), ICL storage 16 kB.

N comes from the model config: `count_params(config, include_lm_head=False)`
is the parameter count Hugging Face reports for T5/T0 (one vocabulary matrix:
11,003,736,064 for T0-11B), the convention the paper's "11B" follows;
`include_lm_head=True` counts our T5X tree, which keeps T0's untied
`decoder/logits_dense` (+ vocab x emb_dim).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, Optional, Sequence

import jax
import numpy as np

from ia3_jax.model.config import PRESETS, T5Config, get_config

ENCODER_DECODER = "encoder_decoder"
DECODER_ONLY = "decoder_only"

# The paper's setting (Table 1 / section 4.2).
PAPER_MODEL = "t0_11b"
PAPER_TOKENS_PER_EXAMPLE = 103       # average T0 example length
PAPER_TRAIN_STEPS = 1000
PAPER_BATCH_SIZE = 8
PAPER_ICL_PARAMS = 175e9             # GPT-3 175B
PAPER_ICL_SHOTS = 41                 # average number of in-context examples
PAPER_ICL_TOKENS_PER_EXAMPLE = 98    # average GPT-3 example length
BYTES_PER_PARAM = 4                  # float32
BYTES_PER_TOKEN = 4                  # int32 token ids
# The figures as printed in the paper, shown next to ours for its setting.
PAPER_FIGURES = {"tfew_inference_flops": "1.1e12", "tfew_training_flops": "2.7e16",
                 "tfew_storage": "4.2 MB", "icl_inference_flops": "1.4e15",
                 "icl_storage": "16 kB"}


# ---------------------------------------------------------------------------
# Parameter counts.
# ---------------------------------------------------------------------------


def _attention_params(config: T5Config) -> int:
  return 4 * config.emb_dim * config.joined_kv          # query, key, value, out


def _mlp_params(config: T5Config) -> int:
  return (len(config.mlp_activations) + 1) * config.emb_dim * config.mlp_dim  # wi_*, wo


def param_breakdown(config: T5Config) -> dict[str, int]:
  """Parameters of each top-level part of the T5X tree (docs/design.md names)."""
  relpos = config.num_heads * config.relative_attention_num_buckets
  encoder_layer = _attention_params(config) + _mlp_params(config) + 2 * config.emb_dim
  decoder_layer = 2 * _attention_params(config) + _mlp_params(config) + 3 * config.emb_dim
  parts = {
      "token_embedder": config.vocab_size * config.emb_dim,
      "encoder": config.num_encoder_layers * encoder_layer + relpos + config.emb_dim,
      "decoder": config.num_decoder_layers * decoder_layer + relpos + config.emb_dim,
  }
  if not config.logits_via_embedding:
    parts["decoder/logits_dense"] = config.emb_dim * config.vocab_size
  return parts


def count_params(config: T5Config, *, include_lm_head: bool = True) -> int:
  """Total parameters of the model, computed from its config.

  include_lm_head=True: our T5X tree (untied models keep `logits_dense`, so
  T0-3B has 2,849,757,184). include_lm_head=False: one vocabulary matrix, as
  Hugging Face counts T5/T0 (T0-3B 2,783,959,040, T0-11B 11,003,736,064).
  Models with tied embeddings (`logits_via_embedding`) count the same either way.
  """
  parts = param_breakdown(config)
  if not include_lm_head:
    parts.pop("decoder/logits_dense", None)
  return sum(parts.values())


def count_ia3_params(config: T5Config) -> int:
  """(IA)^3 vectors: d_k + d_v + d_ff per encoder layer, 2 d_k + 2 d_v + d_ff per decoder layer."""
  kv, ff = config.joined_kv, config.mlp_dim
  return config.num_encoder_layers * (2 * kv + ff) + config.num_decoder_layers * (4 * kv + ff)


def count_tree_params(tree: Any) -> int:
  """Number of scalars in a params pytree (arrays, ShapeDtypeStructs, boxed flax params)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return int(sum(math.prod(getattr(leaf, "shape", np.shape(leaf))) for leaf in leaves))


# ---------------------------------------------------------------------------
# FLOPs and storage.
# ---------------------------------------------------------------------------


def flops_per_token(num_params: float, architecture: str = ENCODER_DECODER) -> float:
  """Forward FLOPs per token: N for an encoder-decoder, 2 N for a decoder-only model."""
  if architecture == ENCODER_DECODER:
    return float(num_params)
  if architecture == DECODER_ONLY:
    return 2.0 * num_params
  raise ValueError(f"architecture must be {ENCODER_DECODER!r} or {DECODER_ONLY!r}, "
                   f"got {architecture!r}")


def inference_flops(num_params: float, tokens_per_example: float,
                    architecture: str = ENCODER_DECODER) -> float:
  """Forward FLOPs to process one example of `tokens_per_example` tokens."""
  return flops_per_token(num_params, architecture) * tokens_per_example


def training_flops(num_params: float, train_steps: int, batch_size: int,
                   tokens_per_example: float, architecture: str = ENCODER_DECODER) -> float:
  """3 x forward FLOPs over steps x batch examples (forward + backward)."""
  return 3.0 * inference_flops(num_params, tokens_per_example, architecture) * (
      train_steps * batch_size)


def icl_inference_flops(num_params: float, shots: int, tokens_per_example: float) -> float:
  """Few-shot ICL with a decoder-only model: 2 N FLOPs for each of shots x tokens context tokens.

  As in the paper, the context is the `shots` in-context examples (the
  query's own tokens are not added).
  """
  return inference_flops(num_params, shots * tokens_per_example, DECODER_ONLY)


def ia3_storage_bytes(config: T5Config, bytes_per_param: int = BYTES_PER_PARAM) -> int:
  """Bytes to store one task's (IA)^3 vectors."""
  return count_ia3_params(config) * bytes_per_param


def icl_storage_bytes(shots: int, tokens_per_example: int,
                      bytes_per_token: int = BYTES_PER_TOKEN) -> int:
  """Bytes to store one task's in-context examples as token ids."""
  return shots * tokens_per_example * bytes_per_token


# ---------------------------------------------------------------------------
# T-Few vs ICL summary.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CostComparison:
  """T-Few with a preset vs few-shot ICL with decoder-only models."""

  model: str
  num_params: int
  include_lm_head: bool
  ia3_params: int
  tokens_per_example: float
  train_steps: int
  batch_size: int
  tfew_inference_flops: float
  tfew_training_flops: float
  tfew_storage_bytes: int
  icl_shots: int
  icl_tokens_per_example: int
  icl_params: tuple[float, ...]
  icl_inference_flops: tuple[float, ...]
  icl_storage_bytes: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def compare(model: str = PAPER_MODEL, *, tokens_per_example: float = PAPER_TOKENS_PER_EXAMPLE,
            train_steps: int = PAPER_TRAIN_STEPS, batch_size: int = PAPER_BATCH_SIZE,
            icl_params: Sequence[float] = (PAPER_ICL_PARAMS,), icl_shots: int = PAPER_ICL_SHOTS,
            icl_tokens_per_example: int = PAPER_ICL_TOKENS_PER_EXAMPLE,
            include_lm_head: bool = False, bytes_per_param: int = BYTES_PER_PARAM,
            bytes_per_token: int = BYTES_PER_TOKEN) -> CostComparison:
  """Costs of T-Few with preset `model` and of ICL with each of `icl_params`."""
  config = get_config(model)
  n = count_params(config, include_lm_head=include_lm_head)
  return CostComparison(
      model=model, num_params=n, include_lm_head=include_lm_head,
      ia3_params=count_ia3_params(config), tokens_per_example=tokens_per_example,
      train_steps=train_steps, batch_size=batch_size,
      tfew_inference_flops=inference_flops(n, tokens_per_example),
      tfew_training_flops=training_flops(n, train_steps, batch_size, tokens_per_example),
      tfew_storage_bytes=ia3_storage_bytes(config, bytes_per_param),
      icl_shots=icl_shots, icl_tokens_per_example=icl_tokens_per_example,
      icl_params=tuple(float(p) for p in icl_params),
      icl_inference_flops=tuple(icl_inference_flops(p, icl_shots, icl_tokens_per_example)
                                for p in icl_params),
      icl_storage_bytes=icl_storage_bytes(icl_shots, icl_tokens_per_example, bytes_per_token))


def is_paper_setting(c: CostComparison) -> bool:
  """True when `c` uses the paper's model, recipe and ICL setting (its figures apply)."""
  return (c.model == PAPER_MODEL and not c.include_lm_head
          and c.tokens_per_example == PAPER_TOKENS_PER_EXAMPLE
          and c.train_steps == PAPER_TRAIN_STEPS and c.batch_size == PAPER_BATCH_SIZE
          and c.icl_shots == PAPER_ICL_SHOTS
          and c.icl_tokens_per_example == PAPER_ICL_TOKENS_PER_EXAMPLE
          and PAPER_ICL_PARAMS in c.icl_params
          and c.tfew_storage_bytes == c.ia3_params * BYTES_PER_PARAM
          and c.icl_storage_bytes == PAPER_ICL_SHOTS * PAPER_ICL_TOKENS_PER_EXAMPLE * BYTES_PER_TOKEN)


# ---------------------------------------------------------------------------
# Formatting.
# ---------------------------------------------------------------------------


def format_sci(x: float, digits: int = 2) -> str:
  """1.1334e12 -> '1.1e12' (`digits` significant digits, no '+')."""
  if x == 0:
    return "0"
  mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def format_bytes(n: int) -> str:
  """Decimal and binary units plus the exact count: '4.33 MB (4.125 MiB, 4,325,376 B)'."""
  for power, dec, binary in ((2, "MB", "MiB"), (1, "kB", "KiB")):
    if n >= 1000 ** power:
      in_binary = f"{n / 1024 ** power:.3f}".rstrip("0").rstrip(".")
      return f"{n / 1000 ** power:.2f} {dec} ({in_binary} {binary}, {n:,} B)"
  return f"{n:,} B"


def format_params(n: float) -> str:
  for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if n >= div:
      return f"{n / div:.3g}{unit}"
  return f"{n:g}"


def markdown_table(c: CostComparison) -> str:
  """The comparison as a markdown table, the arithmetic behind it, and the paper's figures."""
  lines = [
      "| Method | Parameters | Inference FLOPs / example | Training FLOPs | Storage per task |",
      "|---|---|---|---|---|",
      (f"| T-Few ({c.model} + (IA)^3) | {format_params(c.num_params)} + {c.ia3_params:,} (IA)^3 "
       f"| {format_sci(c.tfew_inference_flops)} | {format_sci(c.tfew_training_flops)} "
       f"| {format_bytes(c.tfew_storage_bytes)} |"),
  ]
  for params, flops in zip(c.icl_params, c.icl_inference_flops):
    lines.append(f"| Few-shot ICL (decoder-only {format_params(params)}, {c.icl_shots} shots) "
                 f"| {format_params(params)} | {format_sci(flops)} | 0 "
                 f"| {format_bytes(c.icl_storage_bytes)} |")
  paper = is_paper_setting(c)
  if paper:
    f = PAPER_FIGURES
    lines += [f"| Paper, Table 1: T-Few | 11B | {f['tfew_inference_flops']} "
              f"| {f['tfew_training_flops']} | {f['tfew_storage']} |",
              f"| Paper, Table 1: GPT-3 175B ICL | 175B | {f['icl_inference_flops']} | 0 "
              f"| {f['icl_storage']} |"]
  n_label = "with lm_head" if c.include_lm_head else "one vocab matrix, as HF counts"
  lines += [
      "",
      f"- N = {c.num_params:,} parameters ({c.model}, {n_label}).",
      (f"- T-Few inference: N x {c.tokens_per_example:g} tokens = "
       f"{format_sci(c.tfew_inference_flops, 5)} FLOPs (encoder-decoder: ~N/2 params per token "
       "on each side, 2 FLOPs per param)."),
      (f"- T-Few training: 3 x N x {c.train_steps} steps x {c.batch_size} examples x "
       f"{c.tokens_per_example:g} tokens = {format_sci(c.tfew_training_flops, 5)} FLOPs."),
      (f"- T-Few storage: {c.ia3_params:,} (IA)^3 params x {c.tfew_storage_bytes // c.ia3_params}"
       f" B = {c.tfew_storage_bytes:,} B."),
  ]
  for params, flops in zip(c.icl_params, c.icl_inference_flops):
    lines.append(f"- ICL inference ({format_params(params)}): 2 x {format_params(params)} x "
                 f"{c.icl_shots} "
                 f"shots x {c.icl_tokens_per_example} tokens = {format_sci(flops, 5)} FLOPs "
                 f"({flops / c.tfew_inference_flops:,.0f}x T-Few; T-Few training = "
                 f"{c.tfew_training_flops / flops:.1f} ICL inferences).")
  lines.append(f"- ICL storage: {c.icl_shots} x {c.icl_tokens_per_example} tokens x "
               f"{c.icl_storage_bytes // (c.icl_shots * c.icl_tokens_per_example)} B "
               f"= {c.icl_storage_bytes:,} B.")
  if paper:
    lines.append(f"- The paper prints \"4.2 MB\" for these {c.tfew_storage_bytes:,} B, which are "
                 "4.33 MB in decimal and 4.125 MiB in binary units (neither rounds to 4.2); "
                 f"its \"16 kB\" is {c.icl_storage_bytes:,} B in decimal kB.")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# `ia3-jax costs`.
# ---------------------------------------------------------------------------


def _positive(kind):
  """argparse type: a positive float, or a positive whole number for int (accepts 1e3)."""
  def parse(text: str):
    try:
      value = float(text)
    except ValueError:
      value = float("nan")
    if kind is int and value.is_integer():
      value = int(value)
    if not (value > 0 and math.isfinite(value)) or (kind is int and not isinstance(value, int)):
      raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
    return value
  return parse


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="ia3-jax costs",
      description="FLOPs and storage of T-Few vs few-shot in-context learning "
                  "(Liu et al. 2022, section 4.2 / Table 1). Defaults reproduce the paper.")
  p.add_argument("--model", default=PAPER_MODEL, choices=sorted(PRESETS),
                 help="T-Few backbone preset (default %(default)s)")
  p.add_argument("--tokens_per_example", type=_positive(float), default=PAPER_TOKENS_PER_EXAMPLE,
                 help="average T-Few example length in tokens (default %(default)s)")
  p.add_argument("--train_steps", type=_positive(int), default=PAPER_TRAIN_STEPS,
                 help="T-Few training steps (default %(default)s)")
  p.add_argument("--batch_size", type=_positive(int), default=PAPER_BATCH_SIZE,
                 help="T-Few batch size (default %(default)s)")
  p.add_argument("--shots", type=_positive(int), default=PAPER_ICL_SHOTS,
                 help="in-context examples per ICL prediction (default %(default)s)")
  p.add_argument("--icl_tokens_per_example", type=_positive(int),
                 default=PAPER_ICL_TOKENS_PER_EXAMPLE,
                 help="average ICL example length in tokens (default %(default)s)")
  p.add_argument("--icl_params", type=_positive(float), nargs="+", default=[PAPER_ICL_PARAMS],
                 help="decoder-only ICL model size(s) in parameters (default 175e9)")
  p.add_argument("--include_lm_head", action="store_true",
                 help="count T0's untied lm_head in N (the paper does not)")
  p.add_argument("--bytes_per_param", type=_positive(int), default=BYTES_PER_PARAM,
                 help="bytes per stored (IA)^3 value (default %(default)s, float32)")
  p.add_argument("--bytes_per_token", type=_positive(int), default=BYTES_PER_TOKEN,
                 help="bytes per stored ICL token id (default %(default)s, int32)")
  p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
  return p


def main(argv: Optional[list[str]] = None) -> int:
  """`ia3-jax costs`: prints the T-Few vs ICL cost table; returns the exit status."""
  args = build_parser().parse_args(argv)
  comparison = compare(
      args.model, tokens_per_example=args.tokens_per_example, train_steps=args.train_steps,
      batch_size=args.batch_size, icl_params=args.icl_params, icl_shots=args.shots,
      icl_tokens_per_example=args.icl_tokens_per_example,
      include_lm_head=args.include_lm_head, bytes_per_param=args.bytes_per_param,
      bytes_per_token=args.bytes_per_token)
  if args.json:
    print(json.dumps(comparison.to_dict(), indent=2))
  else:
    sys.stdout.write(markdown_table(comparison))
  return 0


if __name__ == "__main__":
  sys.exit(main())
