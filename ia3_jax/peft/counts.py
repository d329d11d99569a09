"""Trainable-parameter counts per method, computed with `jax.eval_shape` (no memory).

    python -m ia3_jax.peft.counts --model t0_3b
    python -m ia3_jax.peft.counts --model llama_3_2_3b   # a decoder-only preset

prints a markdown table: each method with its default hyper-parameters
(`registry.METHODS[name].defaults`), its trainable params, their share of the
base model, and their fp32 size.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Optional, Sequence

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


def _abstract(config: Any, blocks: Optional[network.Blocks], with_task_id: bool, cache: dict):
  family = families.of(config)
  blocks = families.blocks_for(config, blocks)
  key = (blocks, with_task_id)
  if key not in cache:
    cache[key] = family.abstract_params(family.build(config, blocks), with_task_id=with_task_id)
  return cache[key]


def count_method(config: Any, name: str, *, _cache: Optional[dict] = None,
                 **overrides) -> Count:
  """Trainable and total params of `name` (defaults updated by `overrides`) on `config`."""
  cache = {} if _cache is None else _cache
  method = registry.get_method(name)
  kw = {**method.defaults, **overrides}
  blocks = method.blocks(config, **kw)
  abstract = _abstract(config, blocks, kw.get("num_tasks", 1) > 1, cache)
  trainable = params_lib.count(abstract, params_lib.trainable_mask(abstract, method.trainable_patterns))
  base = params_lib.count(_abstract(config, None, False, cache))
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


def get_config(name: str) -> Any:
  """The T5 (`config.PRESETS`) or decoder-only (`decoder_config.PRESETS`) preset `name`."""
  if name in decoder_config.PRESETS:
    return decoder_config.get_decoder_config(name)
  if name in config_lib.PRESETS:
    return config_lib.get_config(name)
  raise KeyError(f"Unknown model preset {name!r}; known: "
                 f"{', '.join(sorted({*config_lib.PRESETS, *decoder_config.PRESETS}))}")


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
    config = get_config(args.model)
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else list(registry.method_names()))
    for m in methods:
      registry.get_method(m)
  except KeyError as e:
    parser.error(str(e.args[0]))
  print(markdown_table(count_all(config, methods), args.model))
  return 0


if __name__ == "__main__":
  sys.exit(main())
