"""Model families: encoder-decoder T5 and decoder-only Llama, told apart in one place.

Everything that builds or initialises a model whatever its family (the trainer,
the assembly, scoring, `peft-counts`) asks
`of(config or model)` for its `Family` instead of testing types itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

from ia3_jax.errors import ConfigError
from ia3_jax.model import config as config_lib
from ia3_jax.model import decoder, decoder_config, network
from ia3_jax.model.config import T5Config
from ia3_jax.model.decoder_config import DecoderConfig


@dataclasses.dataclass(frozen=True)
class Family:
  """What differs between the model families.

  name: "t5" or "decoder_only"; config_cls / model_cls / blocks_cls: its types;
  abstract_params(model, with_task_id=) and init_params(model, rng, with_task_id=): the
  module's functions. (Their HF directories: `assembly.load_base_params`.)
  """

  name: str
  config_cls: type
  model_cls: type
  blocks_cls: type
  abstract_params: Callable[..., Any]
  init_params: Callable[..., Any]

  def build(self, config: Any, blocks: Optional[network.Blocks] = None) -> Any:
    """The network of `config` with `blocks` (default: this family's plain blocks); blocks
    built on another family's (a PEFT method given no `config` or `base`) are refused."""
    if blocks is not None and of(blocks) is not self:
      raise ConfigError(f"PEFT blocks built on the {of(blocks).name} blocks for a {self.name} "
                        f"model: build them with the model's config (or base="
                        f"{self.blocks_cls.__name__}())")
    return self.model_cls(config, blocks=blocks or self.blocks_cls())


T5 = Family("t5", T5Config, network.Transformer, network.Blocks, network.abstract_params,
            network.init_params)
DECODER_ONLY = Family("decoder_only", DecoderConfig, decoder.DecoderOnly, decoder.DecoderBlocks,
                      decoder.abstract_params, decoder.init_params)
FAMILIES = (T5, DECODER_ONLY)


def of(obj: Any) -> Family:
  """The family of a config, a model, or blocks."""
  for family in FAMILIES[::-1]:  # DecoderBlocks subclasses network.Blocks: check it first
    if isinstance(obj, (family.config_cls, family.model_cls, family.blocks_cls)):
      return family
  raise TypeError(f"not a model, config or blocks of a known family (T5Config, "
                  f"DecoderConfig): {type(obj).__name__}")


def config_from_dict(fields: Mapping[str, Any]) -> Any:
  """The config that `config.to_dict()` wrote (a checkpoint's `model_config`), of its family."""
  for family in FAMILIES[::-1]:  # a decoder dict has num_kv_heads, which T5Config lacks
    names = {f.name for f in dataclasses.fields(family.config_cls)}
    if set(fields) <= names:
      return family.config_cls(**fields)
  raise TypeError(f"model_config fields {sorted(fields)} are not those of a known family's "
                  "config (T5Config, DecoderConfig)")


def preset(name: str) -> Any:
  """The T5 (`config.PRESETS`) or decoder-only (`decoder_config.PRESETS`) config preset `name`."""
  if name in decoder_config.PRESETS:
    return decoder_config.get_decoder_config(name)
  if name in config_lib.PRESETS:
    return config_lib.get_config(name)
  raise KeyError(f"Unknown model preset {name!r}; known: "
                 f"{', '.join(sorted({*config_lib.PRESETS, *decoder_config.PRESETS}))}")
