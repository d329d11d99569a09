"""Trainable-parameter counts per method, computed with `jax.eval_shape` (no memory).

    python -m ia3_jax.peft.counts --model t0_3b
    python -m ia3_jax.peft.counts --model llama_3_2_3b   # a decoder-only preset

prints a markdown table: each method with its default hyper-parameters
(the fields of its registered config class), its trainable params, their share of the
base model, and their fp32 size.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Optional, Sequence

from ia3_jax.errors import ConfigError
from ia3_jax.model import config as config_lib
from ia3_jax.model import decoder_config, families, network
from ia3_jax.model import params as params_lib
from ia3_jax.peft import registry

@dataclasses.dataclass(frozen=True)
class Count:
  method: str
  hparams: str
  trainable: int
  total: int   # all params of the model with the method's blocks (base + new)
  base: int    # params of the base model


def _abstract(config: Any, blocks: network.Blocks, with_task_id: bool, cache: dict):
  family = families.of(config)
  key = (blocks, with_task_id)
  if key not in cache:
    cache[key] = family.abstract_params(family.build(config, blocks), with_task_id=with_task_id)
  return cache[key]


def count_method(config: Any, name: str, *, _cache: Optional[dict] = None,
                 num_tasks: int = 1, **overrides) -> Count:
  """Trainable and total params of `name` (defaults updated by `overrides`) on `config`."""
  cache = {} if _cache is None else _cache
  method = registry.make(name, **overrides)
  plain = families.of(config).blocks_cls()
  abstract = _abstract(config, method.blocks(config, plain, num_tasks), num_tasks > 1, cache)
  trainable = params_lib.count(abstract, params_lib.trainable_mask(abstract, method.trainable_patterns))
  base = params_lib.count(_abstract(config, plain, False, cache))
  kw = method.hyperparameters() | ({"num_tasks": num_tasks} if num_tasks != 1 else {})
  return Count(name, _describe(kw), trainable, params_lib.count(abstract), base)


def _describe(kw: dict) -> str:
  def fmt(v):
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
  return " ".join(f"{k}={fmt(v)}" for k, v in kw.items()) or "-"


def count_all(config: Any, methods: Optional[Sequence[str]] = None) -> list[Count]:
  """Counts for `methods` (default: every registered method) with their default
  hyper-parameters; every method applies to both model families."""
  cache: dict = {}  # methods without module overrides share the base model's shapes
  return [count_method(config, name, _cache=cache) for name in (methods or registry.method_names())]


def markdown_table(counts: Sequence[Count], model_name: str) -> str:
  lines = [f"Trainable parameters on {model_name} "
           f"(base model: {counts[0].base:,} params)" if counts else model_name, "",
           "| method | hyper-parameters | trainable params | % of base | fp32 size |",
           "| --- | --- | ---: | ---: | ---: |"]
  for c in counts:
    lines.append(f"| {c.method} | {c.hparams} | {c.trainable:,} | "
                 f"{100.0 * c.trainable / c.base:.4f}% | {_size(4 * c.trainable)} |")
  return "\n".join(lines)


def _size(nbytes: int) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if nbytes >= scale:
      return f"{nbytes / scale:.1f} {unit}"
  return f"{nbytes} B"


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="t0_3b", help="model preset (T5: "
                      f"{', '.join(sorted(config_lib.PRESETS))}; decoder-only: "
                      f"{', '.join(sorted(decoder_config.PRESETS))})")
  parser.add_argument("--methods", default=None,
                      help="comma-separated methods (default: all)")
  args = parser.parse_args(argv)
  try:
    config = families.preset(args.model)
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else list(registry.method_names()))
    for m in methods:
      registry.get_method(m)
  except (KeyError, ConfigError) as e:
    parser.error(str(e.args[0]))
  print(markdown_table(count_all(config, methods), args.model))
  return 0


if __name__ == "__main__":
  sys.exit(main())
