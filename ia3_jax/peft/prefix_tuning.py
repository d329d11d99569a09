"""Prefix tuning (Li & Liang 2021): learned key/value prefixes in every attention layer.

Each attention in `sites` holds `prefix_key` and `prefix_value`
`[num_tasks, P, heads, head_dim]`; the P prefix keys/values are placed before
the layer's own keys/values (`extend_kv`), per example by `task_id`, so one
batch may mix tasks. Sites: "encoder" (encoder self-attention),
"decoder" (decoder self-attention), "cross" (encoder-decoder attention);
default all three, as Li & Liang do for encoder-decoders.

Relative position bias: prefix keys get a zero additive bias from every query
(no position, never masked). They are "memory slots" rather than virtual
tokens at positions before the input; this keeps them independent of the
sequence length and works unchanged with the autoregressive cache. (The
T-Few repo instead places prefix keys at positions 0..P-1 and shifts the real
tokens; results differ only in this bias.) Note T5 cross-attention has no
position bias anyway.

Decoder-only models (`model.decoder`): the prefixes sit in every layer's
self-attention ("decoder" site), one per key/value head (grouped-query
attention), after the rotary embedding, so they are memory slots there too and
serve the cached prompt of rank classification and generation. peft's
`PrefixTuningConfig` instead hands them to the model as P cached positions (its
real tokens start at position P); rotary embeddings being relative, a peft
prefix key k equals our key rotated back by P positions (tested: same logits).

Direct parameterisation (no MLP reparameterisation), initialised
N(0, init_scale^2): a prefix cannot start as the identity (attention mass moves
to it), so its first output is checked against an explicit reference instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ia3_jax.model import layers, network
from ia3_jax.peft import banks, registry

Array = jax.Array

SITES = {"encoder": "attention", "decoder": "self_attention", "cross": "encoder_decoder_attention"}
KEY, VALUE = "prefix_key", "prefix_value"
TRAINABLE_PATTERNS = (r".*/prefix_(key|value)",)


class Prefix(layers.Projecting):
  """Mixin: learned per-task keys/values prepended in an attention whose name is in `scopes`
  (put in front of the attention class by `Blocks.override`; it uses the `extend_kv` hook)."""

  length: int = 10
  num_tasks: int = 1
  init_scale: float = 1.0
  scopes: tuple[str, ...] = tuple(SITES.values())

  def extend_kv(self, k: Array, v: Array, bias: Array,
                task_id: Optional[Array]) -> tuple[Array, Array, Array]:
    k, v, bias = super().extend_kv(k, v, bias, task_id)
    if self.name not in self.scopes:
      return k, v, bias
    cfg = self.config
    heads = getattr(cfg, "num_kv_heads", cfg.num_heads)  # decoder-only: one per kv head
    shape = (self.num_tasks, self.length, heads, cfg.head_dim)
    init = layers.logical(nn.initializers.normal(self.init_scale), (banks.TASKS_AXIS, None, "heads", "kv"))
    batch = k.shape[0]
    pk = banks.task_rows(self.param(KEY, init, shape, jnp.float32), task_id, batch,
                           "prefix_tuning")
    pv = banks.task_rows(self.param(VALUE, init, shape, jnp.float32), task_id, batch,
                           "prefix_tuning")
    k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
    v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
    if bias.shape[-1] != k.shape[1] - self.length:
      raise ValueError(f"prefix_tuning: attention bias has {bias.shape[-1]} keys; expected "
                       f"{k.shape[1] - self.length}")
    bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 1) + [(self.length, 0)])
    return k, v, bias


@registry.register
@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(registry.PeftMethod):
  """Prefix tuning: `length` key/value prefixes per task in each attention of `sites`
  (encoder, decoder, cross), initialised N(0, init_scale^2)."""

  name = "prefix_tuning"
  trainable_patterns = TRAINABLE_PATTERNS
  supports_mixed_tasks = True
  description = "Prefix tuning: learned key/value prefixes in every attention"

  length: int = 10
  sites: tuple[str, ...] = tuple(SITES)
  init_scale: float = 1.0

  def validate(self) -> None:
    self.require_positive_int("length")
    self.names_from("sites", SITES)

  def blocks(self, config: Optional[Any], base: network.Blocks,
             num_tasks: int = 1) -> network.Blocks:
    del config
    self.check_num_tasks(num_tasks)
    return base.override("attention", Prefix, length=self.length, num_tasks=int(num_tasks),
                         init_scale=float(self.init_scale),
                         scopes=tuple(SITES[s] for s in self.names_from("sites", SITES)))


def prefix_tuning_blocks(config: Optional[Any] = None, *, num_tasks: int = 1,
                         base: Optional[network.Blocks] = None,
                         **hyperparameters: Any) -> network.Blocks:
  """`base` (default: the blocks of `config`'s family, else T5's) with
  prefix tuning (`PrefixTuningConfig` fields)."""
  return PrefixTuningConfig(**hyperparameters).blocks(
      config, registry.base_blocks(config, base), num_tasks)


PrefixAttention = network.extend(Prefix, layers.MultiHeadDotProductAttention)  # the T5 block
