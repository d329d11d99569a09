"""Trainable-parameter counts per method, computed with `jax.eval_shape` (no memory).

    python -m ia3_jax.peft.counts --model t0_3b

prints a markdown table: each method with its default hyper-parameters
(`registry.METHODS[name].defaults`), its trainable params, their share of the
base model, and their fp32 size.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from ia3_jax.model import config as config_lib
from ia3_jax.model import network
from ia3_jax.model import params as params_lib
from ia3_jax.model.config import T5Config
from ia3_jax.peft import registry


@dataclasses.dataclass(frozen=True)
class Count:
  method: str
  hparams: str
  trainable: int
  total: int   # all params of the model with the method's blocks (base + new)
  base: int    # params of the base model


def _abstract(config: T5Config, blocks: network.Blocks, with_task_id: bool, cache: dict):
  key = (blocks, with_task_id)
  if key not in cache:
    cache[key] = network.abstract_params(network.Transformer(config, blocks=blocks),
                                         with_task_id=with_task_id)
  return cache[key]


def count_method(config: T5Config, name: str, *, _cache: Optional[dict] = None,
                 **overrides) -> Count:
  """Trainable and total params of `name` (defaults updated by `overrides`) on `config`."""
  cache = {} if _cache is None else _cache
  method = registry.get_method(name)
  kw = {**method.defaults, **overrides}
  blocks = method.blocks(config, **kw)
  abstract = _abstract(config, blocks, kw.get("num_tasks", 1) > 1, cache)
  trainable = params_lib.count(abstract, params_lib.trainable_mask(abstract, method.trainable_patterns))
  base = params_lib.count(_abstract(config, network.Blocks(), False, cache))
  return Count(name, _describe(kw), trainable, params_lib.count(abstract), base)


def _describe(kw: dict) -> str:
  def fmt(v):
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
  return " ".join(f"{k}={fmt(v)}" for k, v in kw.items()) or "-"


def count_all(config: T5Config, methods: Optional[Sequence[str]] = None) -> list[Count]:
  """Counts for `methods` (default: all) with their default hyper-parameters."""
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
  parser.add_argument("--model", default="t0_3b",
                      help=f"model preset ({', '.join(sorted(config_lib.PRESETS))})")
  parser.add_argument("--methods", default=",".join(registry.method_names()),
                      help="comma-separated methods (default: all)")
  args = parser.parse_args(argv)
  try:
    config = config_lib.get_config(args.model)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
      registry.get_method(m)
  except KeyError as e:
    parser.error(str(e.args[0]))
  print(markdown_table(count_all(config, methods), args.model))
  return 0


if __name__ == "__main__":
  sys.exit(main())
