"""Full fine-tuning: the base network, every parameter trainable.

Shared by all examples: no mixed-task batches. The T-Few recipe's full
fine-tuning baseline uses lr 3e-4 for 300 steps (gin/peft/full_finetune.gin).
"""

from __future__ import annotations

from typing import Optional

from ia3_jax.model import network
from ia3_jax.model.config import T5Config
from ia3_jax.peft import projection_targets

TRAINABLE_PATTERNS = (r".*",)


def full_blocks(config: Optional[T5Config] = None, *, num_tasks: int = 1,
                base: Optional[network.Blocks] = None) -> network.Blocks:
  """The base blocks (full fine-tuning trains everything)."""
  del config
  projection_targets.require_single_task("full", num_tasks)
  return base or network.Blocks()
