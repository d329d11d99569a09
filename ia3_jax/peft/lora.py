"""LoRA (Hu et al. 2021): a trainable low-rank update on chosen projections.

For a projection `y = x @ W` (W `[in, out]`, T5X layout) LoRA adds
`scaling * dropout(x) @ A @ B` with `A [in, r]`, `B [r, out]` and
`scaling = alpha / r` (or `alpha / sqrt(r)` with rank-stabilised LoRA).
`B` starts at zero, so the model starts as the base model. The params sit next
to the projection they change: `<block>/<proj>_lora_a`, `<block>/<proj>_lora_b`
(e.g. `encoder/layers_0/attention/query_lora_a`). Targets are projection names
(`query key value out wi wi_0 wi_1 wo`, HF names `q k v o`, or the groups
`all attention mlp`) and apply in every attention (encoder self, decoder self,
cross) / MLP, as peft's `target_modules` do.

Dropout on the LoRA input is active when a "dropout" RNG stream is supplied to
`apply` (the `project` hook has no `deterministic` flag); pass no dropout RNG
for evaluation.

`merge_lora` folds the updates into the kernels (a plain T5X tree, usable with
the base network and `checkpoints.export_hf_checkpoint`); keep the unmerged
tree for exact unmerging. Parameters are shared by all examples: no mixed-task
batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ia3_jax.model import layers, network
from ia3_jax.peft import projection_targets, registry

Array = jax.Array
Params = Any

SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
TRAINABLE_PATTERNS = (r".*_lora_[ab]",)
DEFAULT_TARGETS = ("all",)  # T-Few's LoRA baseline: q, k, v, o and the MLP kernels, rank 4


def scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
  """peft's LoRA scaling: alpha / r, or alpha / sqrt(r) when rank-stabilised."""
  return alpha / (math.sqrt(rank) if use_rslora else rank)


# peft's default A init (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _lora_delta(module: nn.Module, x: Array, name: str, features: int,
                kernel_axes: tuple[str, str]) -> Array:
  """`scaling * dropout(x) @ A @ B` for one projection (params in `module`'s scope)."""
  a = module.param(name + SUFFIX_A, layers.logical(_A_INIT, (kernel_axes[0], None)),
                   (x.shape[-1], module.rank), jnp.float32)
  b = module.param(name + SUFFIX_B, layers.logical(nn.initializers.zeros, (None, kernel_axes[1])),
                   (module.rank, features), jnp.float32)
  if module.dropout_rate > 0 and module.has_rng("dropout"):
    x = nn.Dropout(module.dropout_rate, name=name + "_lora_dropout")(x, deterministic=False)
  dtype = module.config.activation_dtype  # products in `dtype`, float32 sums (as `layers.Dense`)
  h = layers.matmul(x, a, dtype, dtype)
  return layers.matmul(h, b, dtype, dtype) * jnp.asarray(
      scaling(module.rank, module.alpha, module.use_rslora), dtype)


class Lora(layers.Projecting):
  """Mixin: LoRA updates on the projections named in `targets` (put in front of an attention
  or MLP block's class by `Blocks.override`)."""

  rank: int = 4
  alpha: float = 4.0
  dropout_rate: float = 0.0
  use_rslora: bool = False
  targets: tuple[str, ...] = projection_targets.PROJECTIONS
  required: tuple[str, ...] = ()  # MLP projections named explicitly: must exist in this model

  def project(self, x, name, features, kernel_axes, task_id, kernel_init=None):
    projection_targets.check_mlp_targets(self.config, self.required, "lora.LoraConfig.targets")
    y = super().project(x, name, features, kernel_axes, task_id, kernel_init)
    if name not in self.targets:
      return y
    return y + _lora_delta(self, x, name, features, kernel_axes).astype(y.dtype)


LoraAttention = network.extend(Lora, layers.MultiHeadDotProductAttention)  # the T5 blocks
LoraMlp = network.extend(Lora, layers.MlpBlock)


@registry.register
@dataclasses.dataclass(frozen=True)
class LoraConfig(registry.PeftMethod):
  """LoRA hyper-parameters (T-Few's configs/lora.json: rank 4 on every projection).

  rank: r of A [in, r] and B [r, out]; alpha: scaling alpha / r (alpha / sqrt(r) with
  use_rslora); dropout: on the LoRA input, in training only; targets: projection names
  (T5X or HF: q k v o), or the groups all / attention / mlp.
  """

  name = "lora"
  trainable_patterns = TRAINABLE_PATTERNS
  description = "LoRA: low-rank updates of the projection kernels"

  rank: int = 4
  alpha: float = 4.0
  dropout: float = 0.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  use_rslora: bool = False

  def validate(self) -> None:
    self.require_positive_int("rank")
    if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
      raise self.invalid("dropout", "must be in [0, 1)")
    if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
      raise self.invalid("alpha", "must be a number")
    projection_targets.split_targets(self.targets, "lora.LoraConfig.targets")

  def blocks(self, config: Optional[Any], base: network.Blocks,
             num_tasks: int = 1) -> network.Blocks:
    """`base` with LoRA on the targets; explicitly named MLP targets are checked against
    `config` now (else at model init): e.g. `wi` does not exist in a gated (T5 1.1) MLP."""
    self.check_num_tasks(num_tasks)
    attn, mlp, required = projection_targets.split_targets(self.targets, "lora.LoraConfig.targets")
    if config is not None:
      projection_targets.check_mlp_targets(config, required, "lora.LoraConfig.targets")
    kw = dict(rank=self.rank, alpha=float(self.alpha), dropout_rate=float(self.dropout),
              use_rslora=self.use_rslora)
    if attn:
      base = base.override("attention", Lora, targets=attn, **kw)
    if mlp:
      base = base.override("mlp", Lora, targets=mlp, required=required, **kw)
    return base


def lora_blocks(config: Optional[Any] = None, *, num_tasks: int = 1,
                base: Optional[network.Blocks] = None, **hyperparameters: Any) -> network.Blocks:
  """`base` (default: the blocks of `config`'s family, else T5's) with
  LoRA (`LoraConfig` fields as keywords)."""
  return LoraConfig(**hyperparameters).blocks(
      config, registry.base_blocks(config, base), num_tasks)


# --------------------------------------------------------------------------- tree utilities


def _lora_sites(tree: dict) -> list[str]:
  return sorted(k[:-len(SUFFIX_A)] for k in tree if k.endswith(SUFFIX_A))


def merge_lora(params: Params, *, alpha: float, use_rslora: bool = False) -> Params:
  """Folds every LoRA update into its kernel: `W + scaling * A @ B`; drops the LoRA params.

  The result is a plain T5X tree for the base network. Merging is done in
  float32 (or the params' dtype if wider); keep the unmerged tree to undo it.
  """
  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: walk(v) for k, v in tree.items()
           if not (k.endswith(SUFFIX_A) or k.endswith(SUFFIX_B))}
    for site in _lora_sites(tree):
      if site + SUFFIX_B not in tree or "kernel" not in tree.get(site, {}):
        raise ValueError(f"merge_lora: {site}{SUFFIX_A} has no matching kernel or {SUFFIX_B}")
      a, b = tree[site + SUFFIX_A], tree[site + SUFFIX_B]
      kernel = tree[site]["kernel"]
      delta = jnp.dot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
      delta = delta * scaling(a.shape[1], alpha, use_rslora)
      out[site] = dict(out[site], kernel=(jnp.asarray(kernel, jnp.float32) + delta).astype(
          jnp.asarray(kernel).dtype))
    return out
  return walk(params)


def lora_targets_in(params: Params) -> tuple[str, ...]:
  """The projection names that carry LoRA params somewhere in `params`."""
  found: set[str] = set()

  def walk(tree):
    if isinstance(tree, dict):
      found.update(_lora_sites(tree))
      for v in tree.values():
        walk(v)
  walk(params)
  return tuple(n for n in projection_targets.PROJECTIONS if n in found)
