"""Adapters (Houlsby et al. 2019), as the T-Few paper's baseline ("normal" adapters).

A bottleneck on a sub-layer's output `y` (the MLP's, after `wo`, or an attention's, after
`out`), before the residual connection: `y + W_up relu(W_down y + b_down) + b_up`, with
`W_down [d, d / reduction_factor]`, `W_up [d / reduction_factor, d]` drawn from N(0, 0.02)
and zero biases, so the model starts close to (not exactly at) the base model. The params
sit in the block they change: `<block>/adapter_down [d, r]`, `adapter_down_bias [r]`,
`adapter_up [r, d]`, `adapter_up_bias [d]` (e.g. `encoder/layers_0/mlp/adapter_up`).

Sites: "mlp" (every layer's feed-forward sub-layer), "self_attention" (encoder and decoder
self-attention) and "cross_attention" (encoder-decoder attention). T-Few's
`configs/adapter.json` places them after the feed-forward sub-layer only (its
`compacter_add_compacter_in_self_attention` stays False), with reduction factor 32, lr 3e-3
for 500 steps, and trains the layer norms too; Houlsby et al. also adapt the
self-attention: `sites=("self_attention", "mlp")`. One set of params for every example: no
mixed-task batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ia3_jax.model import layers, network
from ia3_jax.peft import registry

Array = jax.Array

# Attention module names (T5 and decoder-only) of each site.
SITES = {"self_attention": ("attention", "self_attention"),
         "cross_attention": ("encoder_decoder_attention",), "mlp": ("mlp",)}
PROJECTION = {"attention": "out", "mlp": "wo"}  # the block's output projection
ADAPTER_PATTERN = r"(.*/)?adapter_[a-z_]+"
LAYER_NORM_PATTERN = r".*(layer_norm|encoder_norm|decoder_norm)/scale"
INIT_STD = 0.02


class Adapter(layers.Projecting):
  """Mixin: an adapter on the block's output projection (`out` of an attention, `wo` of an
  MLP) in the blocks named in `scopes` (put in front of a block's class by `Blocks.override`).
  Subclasses change how the two projection matrices are made (`kernel`: Compacter)."""

  scopes: tuple[str, ...] = ("mlp",)
  reduction_factor: int = 32
  output_projection: str = "wo"

  def project(self, x, name, features, kernel_axes, task_id, kernel_init=None):
    y = super().project(x, name, features, kernel_axes, task_id, kernel_init)
    if name != self.output_projection or self.name not in self.scopes:
      return y
    return y + self.bottleneck(y).astype(y.dtype)

  def bottleneck(self, y: Array) -> Array:
    """`W_up relu(W_down y + b_down) + b_up` (float32 params, products in the activation
    dtype with float32 sums, as `layers.Dense`)."""
    d = y.shape[-1]
    r = self.width(d)
    dtype = self.config.activation_dtype
    zeros = layers.logical(nn.initializers.zeros, (None,))
    down = self.kernel("down", (d, r), ("embed", None))
    down_bias = self.param("adapter_down_bias", zeros, (r,), jnp.float32)
    up = self.kernel("up", (r, d), (None, "embed"))
    up_bias = self.param("adapter_up_bias", zeros, (d,), jnp.float32)
    h = jax.nn.relu(layers.matmul(y, down, dtype, dtype) + down_bias.astype(dtype))
    return layers.matmul(h, up, dtype, dtype) + up_bias.astype(dtype)

  def width(self, d: int) -> int:
    """The bottleneck's width for model width `d`: d // reduction_factor (at least 1)."""
    return max(1, d // self.reduction_factor)

  def kernel(self, name: str, shape: tuple[int, int], axes: tuple) -> Array:
    """The `[in, out]` matrix of projection `name` ("down" or "up"): a plain one, N(0, 0.02)."""
    init = layers.logical(nn.initializers.normal(INIT_STD), axes)
    return self.param(f"adapter_{name}", init, shape, jnp.float32)


@registry.register
@dataclasses.dataclass(frozen=True)
class AdapterConfig(registry.PeftMethod):
  """Adapters: a bottleneck of width d / reduction_factor after each sub-layer in `sites`
  ("mlp", "self_attention", "cross_attention"); T-Few's recipe: ("mlp",), factor 32."""

  name = "adapter"
  trainable_patterns = (ADAPTER_PATTERN, LAYER_NORM_PATTERN)  # T-Few trains the norms too
  description = "Adapters: a bottleneck MLP after the feed-forward sub-layers"
  mixin: ClassVar[type] = Adapter  # the block mixin that holds the params

  reduction_factor: int = 32
  sites: tuple[str, ...] = ("mlp",)

  def validate(self) -> None:
    self.require_positive_int("reduction_factor")
    self.names_from("sites", SITES)

  def blocks(self, config: Optional[Any], base: network.Blocks,
             num_tasks: int = 1) -> network.Blocks:
    del config
    self.check_num_tasks(num_tasks)
    scopes = tuple(s for site in self.names_from("sites", SITES) for s in SITES[site])
    for block in ("attention", "mlp"):
      mine = tuple(s for s in scopes if (s == "mlp") == (block == "mlp"))
      if mine:
        base = base.override(block, self.mixin, scopes=mine, output_projection=PROJECTION[block],
                             **self.mixin_settings())
    return base

  def mixin_settings(self) -> dict[str, Any]:
    """The `mixin`'s fields from this config (Compacter adds its own)."""
    return {"reduction_factor": self.reduction_factor}
