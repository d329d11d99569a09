"""Model families: encoder-decoder T5 and decoder-only Llama, told apart in one place.

Everything that builds or initialises a model whatever its family (the trainer,
`loop.train` and the runs, the PEFT blocks (`blocks_for`), scoring, `peft-counts`) asks
`of(config or model)` for its `Family` instead of testing types itself.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

from ia3_jax.model import decoder, network
from ia3_jax.model.config import T5Config
from ia3_jax.model.decoder_config import DecoderConfig


@dataclasses.dataclass(frozen=True)
class Family:
  """What differs between the model families.

  name: "t5" or "decoder_only"; config_cls / model_cls / blocks_cls: its types;
  abstract_params(model, with_task_id=) and init_params(model, rng, with_task_id=): the
  module's functions. (Their HF directories: `loop.load_base_params`.)
  """

  name: str
  config_cls: type
  model_cls: type
  blocks_cls: type
  abstract_params: Callable[..., Any]
  init_params: Callable[..., Any]

  def build(self, config: Any, blocks: Optional[network.Blocks] = None) -> Any:
    """The network of `config` with `blocks` (default: this family's plain blocks)."""
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


_REBASED = ("attention", "mlp", "layer_norm")  # the blocks PEFT mixins extend


def _mixins(block: Any, plain: type) -> tuple[list[type], dict]:
  """(mixins from the outermost, keywords) that `Blocks.override` put on `plain`."""
  cls, kw = ((block.func, dict(block.keywords)) if isinstance(block, functools.partial)
             else (block, {}))
  mixins = []
  while cls is not plain:
    if len(cls.__bases__) != 2:
      raise ValueError(f"cannot move {cls.__name__} to another model family's blocks")
    mixin, cls = cls.__bases__
    mixins.append(mixin)
  return mixins, kw


def _check_hooks(mixin: type, source: Any, target: Any, family: Family) -> None:
  """Raises if `mixin` overrides a method of `source` that `target` does not call (has not)."""
  target_cls = target.func if isinstance(target, functools.partial) else target
  for attr, value in vars(mixin).items():
    if (callable(value) and not attr.startswith("_") and hasattr(source, attr)
        and not hasattr(target_cls, attr)):
      raise ValueError(f"PEFT_BLOCKS: {mixin.__name__} hooks {source.__name__}.{attr}, which a "
                       f"{family.name} model does not have (this method supports T5 models only)")


def blocks_for(config: Any, blocks: Optional[network.Blocks]) -> network.Blocks:
  """`blocks` for `config`'s family: the PEFT block functions build on the T5 blocks when
  given no `base=`; for a decoder-only config the same mixins (and keywords) go on the
  decoder-only blocks instead. Blocks of the config's family pass unchanged."""
  family = of(config)
  if blocks is None:
    return family.blocks_cls()
  if of(blocks) is family:
    return blocks
  plain = of(blocks).blocks_cls()
  out = family.blocks_cls(remat=blocks.remat, scan_layers=blocks.scan_layers)
  for field in ("encoder", "decoder", "encoder_layer", "decoder_layer"):
    value = getattr(blocks, field)
    if value == getattr(plain, field):
      continue
    cls, kw = ((value.func, value.keywords) if isinstance(value, functools.partial)
               else (value, {}))
    stack = getattr(cls, "decoder_only_stack", None)  # e.g. prompt tuning's encoder
    if field == "encoder" and stack is not None and family is DECODER_ONLY:
      out = out.replace(decoder=functools.partial(stack, **kw))
      continue
    raise ValueError(f"PEFT_BLOCKS replace Blocks.{field}, which a {family.name} model "
                     f"does not have (this method supports T5 models only)")
  for name in _REBASED:
    mixins, kw = _mixins(getattr(blocks, name), getattr(plain, name))
    for mixin in reversed(mixins):
      _check_hooks(mixin, getattr(plain, name), getattr(out, name), family)
      out = out.override(name, mixin)
    if mixins:
      out = out.override(name, mixins[0], **kw)
  return out
