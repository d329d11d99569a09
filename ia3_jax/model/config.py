"""Model configuration: the T5X `T5Config` fields plus named presets."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax.numpy as jnp

from ia3_jax.model import precision


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shape and numerics of a T5-family encoder-decoder (T5X field names)."""

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  mlp_activations: Sequence[str] = ("gelu", "linear")
  dropout_rate: float = 0.0
  logits_via_embedding: bool = False
  # Activation dtype; params are always float32. "auto": bfloat16 where the backend runs
  # it natively, else float32 (`precision.resolve_dtype`).
  dtype: Any = "float32"
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # The attention core: "einsum" (softmax(q k^T + bias) v in explicit products) or
  # "dot_product_attention" (`jax.nn.dot_product_attention`, same numerics; attention-weight
  # dropout, which it lacks, runs the einsum core). `dpa_implementation`: its
  # `implementation=`, None (XLA's choice), "xla" or "cudnn" (GPU only).
  attention_impl: str = "einsum"
  dpa_implementation: Optional[str] = None

  def __post_init__(self):
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    for field in ("vocab_size", "emb_dim", "num_heads", "num_encoder_layers",
                  "num_decoder_layers", "head_dim", "mlp_dim",
                  "relative_attention_num_buckets",
                  "relative_attention_max_distance"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"T5Config.{field} must be a positive int, got {value!r}")
    for act in self.mlp_activations:
      if act not in ACTIVATIONS:
        raise ValueError(f"T5Config.mlp_activations: unknown activation {act!r}; "
                         f"known: {sorted(ACTIVATIONS)}")
    if self.dtype != precision.AUTO:
      jnp.dtype(self.dtype)  # raises TypeError on an unknown dtype name
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"T5Config.attention_impl: unknown {self.attention_impl!r}; "
                       f"known: {', '.join(ATTENTION_IMPLS)}")
    if self.dpa_implementation not in DPA_IMPLEMENTATIONS:
      raise ValueError(f"T5Config.dpa_implementation: unknown {self.dpa_implementation!r}; "
                       f"known: {', '.join(map(str, DPA_IMPLEMENTATIONS))}")

  @property
  def activation_dtype(self) -> jnp.dtype:
    """The dtype activations run in ("auto" resolved for this process)."""
    return precision.activation_dtype(self.dtype)

  @property
  def joined_kv(self) -> int:
    return self.num_heads * self.head_dim

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["mlp_activations"] = list(self.mlp_activations)
    d["dtype"] = self.dtype if self.dtype == precision.AUTO else str(jnp.dtype(self.dtype))
    return d


ACTIVATIONS = ("relu", "gelu", "gelu_exact", "silu", "linear")
ATTENTION_IMPLS = ("einsum", "dot_product_attention")
DPA_IMPLEMENTATIONS = (None, "xla", "cudnn")

_T5_1_1 = dict(mlp_activations=("gelu", "linear"), logits_via_embedding=False)
_T5_1_0 = dict(mlp_activations=("relu",), logits_via_embedding=True)


def _shape(emb, heads, layers, mlp, **extra) -> dict:
  return dict(emb_dim=emb, num_heads=heads, num_encoder_layers=layers,
              num_decoder_layers=layers, mlp_dim=mlp, head_dim=64, **extra)


PRESETS: dict[str, T5Config] = {
    "tiny": T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8,
                     num_encoder_layers=2, num_decoder_layers=2, mlp_dim=64,
                     relative_attention_num_buckets=8,
                     relative_attention_max_distance=20, **_T5_1_1),
    "t5_1_0_small": T5Config(**_shape(512, 8, 6, 2048, **_T5_1_0)),
    "t5_1_0_base": T5Config(**_shape(768, 12, 12, 3072, **_T5_1_0)),
    "t5_1_1_small": T5Config(**_shape(512, 6, 8, 1024, **_T5_1_1)),
    "t5_1_1_base": T5Config(**_shape(768, 12, 12, 2048, **_T5_1_1)),
    "t5_1_1_large": T5Config(**_shape(1024, 16, 24, 2816, **_T5_1_1)),
    "t5_1_1_xl": T5Config(**_shape(2048, 32, 24, 5120, **_T5_1_1)),
    "t5_1_1_xxl": T5Config(**_shape(4096, 64, 24, 10240, **_T5_1_1)),
    "mt5_small": T5Config(vocab_size=250112, **_shape(512, 6, 8, 1024, **_T5_1_1)),
    "mt5_base": T5Config(vocab_size=250112, **_shape(768, 12, 12, 2048, **_T5_1_1)),
}
PRESETS["t0_3b"] = PRESETS["t5_1_1_xl"]
PRESETS["t0_11b"] = PRESETS["t5_1_1_xxl"]


def get_config(name: str, **overrides) -> T5Config:
  """Returns the named preset, optionally with some fields replaced."""
  if name not in PRESETS:
    raise KeyError(f"Unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
