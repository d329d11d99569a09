"""Full fine-tuning: the base network, every parameter trainable.

Shared by all examples: no mixed-task batches. The T-Few recipe's full
fine-tuning baseline uses lr 3e-4 for 300 steps (gin/peft/full_finetune.gin).
"""

from __future__ import annotations

import dataclasses

from ia3_jax.peft import registry

TRAINABLE_PATTERNS = (r".*",)


@registry.register
@dataclasses.dataclass(frozen=True)
class FullConfig(registry.PeftMethod):
  """Full fine-tuning: the base blocks, every parameter trained."""

  name = "full"
  trainable_patterns = TRAINABLE_PATTERNS
  description = "Full fine-tuning: every parameter"
