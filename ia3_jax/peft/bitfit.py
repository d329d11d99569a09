"""BitFit (Ben Zaken et al. 2021) for T5: zero-initialised biases, trained alone.

T5 has no biases, so, as the T-Few repo does, a bias is added after the
projections named in `targets` (default: every projection, q k v o and the MLP
kernels) and only those biases are trained. Each is `<block>/<proj>_bias`
`[out]` (e.g. `encoder/layers_0/mlp/wi_0_bias`), zero at the start, so the
model starts as the base model. (The T-Few config's layer regex `w_o` never
matches T5's `wo`, and it also trains the layer norms; here every projection
gets a bias and only biases train -- add `layernorm.TRAINABLE_PATTERNS` to
reproduce "BitFit + LayerNorm".) Shared by all examples: no mixed-task batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax

from ia3_jax.model import layers, network
from ia3_jax.peft import projection_targets, registry

Array = jax.Array

SUFFIX = "_bias"
TRAINABLE_PATTERNS = (r".*/(query|key|value|out|wi|wi_0|wi_1|wo)_bias",)


def _add_bias(module: nn.Module, y: Array, name: str, features: int,
              kernel_axes: tuple[str, str]) -> Array:
  if name not in module.targets:
    return y
  bias = module.param(name + SUFFIX, layers.logical(nn.initializers.zeros, (kernel_axes[1],)),
                      (features,), jax.numpy.float32)
  return y + bias.astype(y.dtype)


class BitFit(layers.Projecting):
  """Mixin: a trainable bias after each projection in `targets` (put in front of an attention
  or MLP block's class by `Blocks.override`)."""

  targets: tuple[str, ...] = projection_targets.PROJECTIONS
  required: tuple[str, ...] = ()  # MLP projections named explicitly: must exist in this model

  def project(self, x, name, features, kernel_axes, task_id, kernel_init=None):
    projection_targets.check_mlp_targets(self.config, self.required, "bitfit.BitFitConfig.targets")
    y = super().project(x, name, features, kernel_axes, task_id, kernel_init)
    return _add_bias(self, y, name, features, kernel_axes)


BitFitAttention = network.extend(BitFit, layers.MultiHeadDotProductAttention)  # the T5 blocks
BitFitMlp = network.extend(BitFit, layers.MlpBlock)


@registry.register
@dataclasses.dataclass(frozen=True)
class BitFitConfig(registry.PeftMethod):
  """BitFit: `targets` are projection names (T5X or HF: q k v o) or the groups all /
  attention / mlp; each gets a zero-initialised bias."""

  name = "bitfit"
  trainable_patterns = TRAINABLE_PATTERNS
  description = "BitFit: zero-initialised biases after every projection"

  targets: tuple[str, ...] = ("all",)

  def validate(self) -> None:
    projection_targets.normalize_targets(self.targets, what="bitfit.BitFitConfig.targets")

  def blocks(self, config: Optional[Any], base: network.Blocks,
             num_tasks: int = 1) -> network.Blocks:
    self.check_num_tasks(num_tasks)
    what = "bitfit.BitFitConfig.targets"
    attn, mlp, required = projection_targets.split_targets(self.targets, what)
    if config is not None:
      projection_targets.check_mlp_targets(config, required, what)
    if attn:
      base = base.override("attention", BitFit, targets=attn)
    if mlp:
      base = base.override("mlp", BitFit, targets=mlp, required=required)
    return base


def bitfit_blocks(config: Optional[Any] = None, *, num_tasks: int = 1,
                  base: Optional[network.Blocks] = None, **hyperparameters: Any) -> network.Blocks:
  """`base` (default: the blocks of `config`'s family, else T5's) with
  BitFit (`BitFitConfig` fields as keywords)."""
  return BitFitConfig(**hyperparameters).blocks(
      config, registry.base_blocks(config, base), num_tasks)
