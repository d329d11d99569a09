"""Compacter and Compacter++ (Karimi Mahabadi et al. 2021), as the T-Few paper's baselines.

An adapter (`peft.adapter`: `y + W_up relu(W_down y + b_down) + b_up` on a sub-layer's
output) whose two matrices are parameterised hypercomplex multiplications (PHM): with
n = `phm_dim`, a `[a, b]` matrix is `sum_i A_i (x) (W_left[i] @ W_right[i])` (Kronecker
products), `A_i [n, n]` the "rule" (N(0, 0.02)), `W_left [n, a/n, rank]` and
`W_right [n, rank, b/n]` glorot-uniform with gain sqrt(2). As in T-Few's
`configs/compacter.json` (the Compacter repository's `PHMLinear` with
`factorized_phm=True`, `shared_phm_rule=False`): n = 4, rank 1, each layer's down and
up projections learn their own rules; reduction factor 32; after the self-attention and
feed-forward sub-layers (Compacter) or the feed-forward ones only (Compacter++,
`configs/compacter_pp.json`); the layer norms train too; lr 3e-3 for 500 steps. Params:
`<block>/adapter_{down,up}_{phm_rule,w_left,w_right}` and `adapter_{down,up}_bias`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ia3_jax.model import layers
from ia3_jax.peft import adapter, registry

Array = jax.Array
GAIN = math.sqrt(2.0)  # T-Few's glorot_uniform: xavier_uniform_(w, gain=sqrt(2))


def phm_matrix(rule: Array, left: Array, right: Array) -> Array:
  """`sum_i kron(rule[i], left[i] @ right[i])`: `[n*a', n*b']` from `rule [n, n, n]`,
  `left [n, a', r]`, `right [n, r, b']`."""
  n, a, _ = left.shape
  w = jnp.einsum("iar,irb->iab", left, right)
  return jnp.einsum("ixy,iab->xayb", rule, w).reshape(n * a, n * w.shape[-1])


class PhmAdapter(adapter.Adapter):
  """Mixin: an adapter whose down and up matrices are PHM products (`phm_matrix`)."""

  phm_dim: int = 4
  phm_rank: int = 1

  def width(self, d: int) -> int:
    """d // reduction_factor, rounded up to a multiple of n (T-Few's configs need no rounding:
    T0's 2048 // 32 = 64; a tiny model's 32 // 32 = 1 becomes 4)."""
    return self.phm_dim * math.ceil(super().width(d) / self.phm_dim)

  def kernel(self, name: str, shape: tuple[int, int], axes: tuple) -> Array:
    n, r = self.phm_dim, self.phm_rank
    a, b = shape
    rule_init = layers.logical(nn.initializers.normal(adapter.INIT_STD), (None, None, None))
    glorot = layers.logical(nn.initializers.variance_scaling(
        GAIN ** 2, "fan_avg", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,)),
        (None, None, None))
    rule = self.param(f"adapter_{name}_phm_rule", rule_init, (n, n, n), jnp.float32)
    left = self.param(f"adapter_{name}_w_left", glorot, (n, a // n, r), jnp.float32)
    right = self.param(f"adapter_{name}_w_right", glorot, (n, r, b // n), jnp.float32)
    return phm_matrix(rule, left, right)


@registry.register
@dataclasses.dataclass(frozen=True)
class CompacterConfig(adapter.AdapterConfig):
  """Compacter: PHM adapters (n = phm_dim, rank phm_rank) after the self-attention and
  feed-forward sub-layers; n must divide the model width d."""

  name = "compacter"
  description = "Compacter: PHM adapters after self-attention and feed-forward sub-layers"
  mixin = PhmAdapter

  sites: tuple[str, ...] = ("self_attention", "mlp")
  phm_dim: int = 4
  phm_rank: int = 1

  def validate(self) -> None:
    super().validate()
    self.require_positive_int("phm_dim")
    self.require_positive_int("phm_rank")

  def blocks(self, config: Any, base: Any, num_tasks: int = 1) -> Any:
    if config is not None and config.emb_dim % self.phm_dim:
      raise self.invalid("phm_dim", f"must divide the model width ({config.emb_dim})")
    return super().blocks(config, base, num_tasks)

  def mixin_settings(self) -> dict[str, Any]:
    return {**super().mixin_settings(), "phm_dim": self.phm_dim, "phm_rank": self.phm_rank}


@registry.register
@dataclasses.dataclass(frozen=True)
class CompacterPlusPlusConfig(CompacterConfig):
  """Compacter++: Compacter after the feed-forward sub-layers only."""

  name = "compacter_pp"
  description = "Compacter++: PHM adapters after the feed-forward sub-layers"

  sites: tuple[str, ...] = ("mlp",)
