"""LayerNorm tuning: train only the RMS layer-norm scales of the base network.

No new parameters: the base network with a trainable pattern matching every
`*_layer_norm/scale`, `encoder/encoder_norm/scale` and
`decoder/decoder_norm/scale` (for T0-3B: (2*24 + 3*24 + 2) * 2048 = 249,856).
Shared by all examples: no mixed-task batches.
"""

from __future__ import annotations

import dataclasses

from ia3_jax.peft import registry

TRAINABLE_PATTERNS = (r".*(layer_norm|encoder_norm|decoder_norm)/scale",)


@registry.register
@dataclasses.dataclass(frozen=True)
class LayerNormConfig(registry.PeftMethod):
  """LayerNorm tuning: the base blocks; only the layer-norm scales train."""

  name = "layernorm"
  trainable_patterns = TRAINABLE_PATTERNS
  description = "LayerNorm: the layer-norm scales"
