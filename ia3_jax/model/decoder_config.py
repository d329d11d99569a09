"""Configuration of Llama-family decoder-only language models (Llama, Mistral, Qwen2).

`DecoderConfig` holds the shape and numerics of `decoder.DecoderOnly`; presets hold the
shapes of released models (numbers from their HF `config.json` files).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from ia3_jax.model import precision

# rope_scaling["rope_type"] -> the keys it needs besides "rope_type".
ROPE_SCALING_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "linear": ("factor",),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and numerics of a Llama-family decoder (HF field in brackets).

  `num_kv_heads` < `num_heads` is grouped-query attention (`num_key_value_heads`);
  `rope_scaling` is None or `{"rope_type": "llama3" | "linear", ...}` as HF writes it;
  `attention_bias` puts biases on the query/key/value projections (Qwen2) and
  `attention_out_bias` on the output projection (Llama with `attention_bias=true`);
  `sliding_window` (Mistral) limits each query to that many keys back. Params are
  always float32; `dtype` is the activations' dtype ("auto" as in `T5Config`).
  """

  vocab_size: int = 32000
  emb_dim: int = 4096  # hidden_size
  num_heads: int = 32  # num_attention_heads
  num_kv_heads: int = 32  # num_key_value_heads
  head_dim: int = 128
  mlp_dim: int = 11008  # intermediate_size
  num_layers: int = 32  # num_hidden_layers
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[Mapping[str, Any]] = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  attention_out_bias: bool = False
  sliding_window: Optional[int] = None
  max_position_embeddings: int = 4096
  dtype: Any = "float32"

  def __post_init__(self):
    for field in ("vocab_size", "emb_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                  "num_layers", "max_position_embeddings"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"DecoderConfig.{field} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DecoderConfig.num_kv_heads={self.num_kv_heads} must divide "
                       f"num_heads={self.num_heads}")
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig.head_dim={self.head_dim} must be even (rotary pairs)")
    for field in ("rms_norm_eps", "rope_theta"):
      value = getattr(self, field)
      if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"DecoderConfig.{field} must be a positive number, got {value!r}")
    if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                            or self.sliding_window <= 0):
      raise ValueError(f"DecoderConfig.sliding_window must be None or a positive int, "
                       f"got {self.sliding_window!r}")
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", _check_rope_scaling(self.rope_scaling))
    if self.dtype != precision.AUTO:
      jnp.dtype(self.dtype)  # raises TypeError on an unknown dtype name

  # --- what the shared blocks (`layers.Projecting`, PEFT mixins) read from a config

  @property
  def activation_dtype(self) -> jnp.dtype:
    """The dtype activations run in ("auto" resolved for this process)."""
    return precision.activation_dtype(self.dtype)

  @property
  def joined_kv(self) -> int:
    """Width of the query (and attention output) projection: heads * head_dim."""
    return self.num_heads * self.head_dim

  @property
  def joined_kv_heads(self) -> int:
    """Width of the key and value projections: kv heads * head_dim."""
    return self.num_kv_heads * self.head_dim

  @property
  def mlp_activations(self) -> tuple[str, ...]:
    """SwiGLU in T5X terms: `wi_0` (gate) through SiLU times the linear `wi_1` (up)."""
    return ("silu", "linear")

  @property
  def dropout_rate(self) -> float:
    return 0.0

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
    d["dtype"] = self.dtype if self.dtype == precision.AUTO else str(jnp.dtype(self.dtype))
    return d

  def __hash__(self) -> int:  # rope_scaling is a dict: hash its items
    d = self.to_dict()
    d["rope_scaling"] = tuple(sorted((d["rope_scaling"] or {}).items()))
    return hash(tuple(sorted(d.items())))


def _check_rope_scaling(scaling: Mapping[str, Any]) -> dict:
  if not isinstance(scaling, Mapping):
    raise ValueError(f"DecoderConfig.rope_scaling must be None or a dict, got {scaling!r}")
  scaling = dict(scaling)
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind not in ROPE_SCALING_KEYS:
    raise ValueError(f"DecoderConfig.rope_scaling: rope_type {kind!r} is not supported; "
                     f"supported: {', '.join(ROPE_SCALING_KEYS)}")
  missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
  if missing:
    raise ValueError(f"DecoderConfig.rope_scaling ({kind}): missing {', '.join(missing)}")
  out = {"rope_type": kind, **{k: scaling[k] for k in ROPE_SCALING_KEYS[kind]}}
  if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
    raise ValueError("DecoderConfig.rope_scaling: high_freq_factor must exceed low_freq_factor")
  return out


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, DecoderConfig] = {
    # Test shape: GQA (4 query heads over 2 kv heads), odd-sized vocabulary.
    "tiny_llama": DecoderConfig(vocab_size=97, emb_dim=32, num_heads=4, num_kv_heads=2,
                                head_dim=8, mlp_dim=48, num_layers=2, rms_norm_eps=1e-5,
                                max_position_embeddings=128),
    # meta-llama/Llama-3.2-1B
    "llama_3_2_1b": DecoderConfig(vocab_size=128256, emb_dim=2048, num_heads=32, num_kv_heads=8,
                                  head_dim=64, mlp_dim=8192, num_layers=16, rms_norm_eps=1e-5,
                                  rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                                  tie_word_embeddings=True, max_position_embeddings=131072),
    # meta-llama/Llama-3.2-3B
    "llama_3_2_3b": DecoderConfig(vocab_size=128256, emb_dim=3072, num_heads=24, num_kv_heads=8,
                                  head_dim=128, mlp_dim=8192, num_layers=28, rms_norm_eps=1e-5,
                                  rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                                  tie_word_embeddings=True, max_position_embeddings=131072),
    # Qwen/Qwen2-0.5B (q/k/v biases; use_sliding_window false)
    "qwen2_0_5b": DecoderConfig(vocab_size=151936, emb_dim=896, num_heads=14, num_kv_heads=2,
                                head_dim=64, mlp_dim=4864, num_layers=24, rms_norm_eps=1e-6,
                                rope_theta=1000000.0, tie_word_embeddings=True,
                                attention_bias=True, max_position_embeddings=131072),
    # mistralai/Mistral-7B-v0.1
    "mistral_7b": DecoderConfig(vocab_size=32000, emb_dim=4096, num_heads=32, num_kv_heads=8,
                                head_dim=128, mlp_dim=14336, num_layers=32, rms_norm_eps=1e-5,
                                rope_theta=10000.0, sliding_window=4096,
                                max_position_embeddings=32768),
}


def get_decoder_config(name: str, **overrides: Any) -> DecoderConfig:
  """The named preset, optionally with some fields replaced."""
  if name not in PRESETS:
    raise KeyError(f"Unknown decoder preset {name!r}; known presets: "
                   f"{', '.join(sorted(PRESETS))}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
