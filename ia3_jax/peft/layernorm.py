"""LayerNorm tuning: train only the RMS layer-norm scales of the base network.

No new parameters: the base network with a trainable pattern matching every
`*_layer_norm/scale`, `encoder/encoder_norm/scale` and
`decoder/decoder_norm/scale` (for T0-3B: (2*24 + 3*24 + 2) * 2048 = 249,856).
Shared by all examples: no mixed-task batches.
"""

from __future__ import annotations

from typing import Optional

from ia3_jax.model import network
from ia3_jax.model.config import T5Config
from ia3_jax.peft import projection_targets

TRAINABLE_PATTERNS = (r".*(layer_norm|encoder_norm|decoder_norm)/scale",)


def layernorm_blocks(config: Optional[T5Config] = None, *, num_tasks: int = 1,
                     base: Optional[network.Blocks] = None) -> network.Blocks:
  """The base blocks (LayerNorm tuning only changes what is trained)."""
  del config
  projection_targets.require_single_task("layernorm", num_tasks)
  return base or network.Blocks()
