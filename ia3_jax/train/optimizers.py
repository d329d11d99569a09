"""Optimizers and learning-rate schedules (the T-Few recipe by default).

T-Few trains with HF `Adafactor(lr, scale_parameter=True, relative_step=False,
warmup_init=False, weight_decay=0)` under `get_linear_schedule_with_warmup`
(warmup over 6% of the steps, then linear decay to 0) and gradient clipping by
global norm 1.0. In optax terms:

  HF Adafactor default            optax.adafactor
  eps=(1e-30, 1e-3)               eps=1e-30; parameter scale floored at 1e-3
  clip_threshold=1.0              clipping_threshold=1.0 (update RMS clipping)
  decay_rate=-0.8                 decay_rate=0.8 (beta2_t = 1 - t^-0.8)
  beta1=None                      momentum=None
  scale_parameter=True            multiply_by_parameter_scale=True
  weight_decay=0                  weight_decay_rate=None

One difference: HF factors the second moment of every >= 2-D tensor, optax
only when the two largest dims are >= `min_dim_size_to_factor` (128, the
T5X/optax default). The (IA)^3 vectors are not factored either way (HF sees
T-Few's `[d, 1]` vectors, whose factored estimate equals the full one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax.numpy as jnp
import optax

from ia3_jax.errors import ConfigError

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def linear_warmup_linear_decay(peak: float, warmup_steps: float, total_steps: int) -> Schedule:
  """HF `get_linear_schedule_with_warmup`: lr(s) = peak * s / w for s < w, then
  peak * (total - s) / (total - w), floored at 0. `s` counts updates already
  applied, so the first update uses lr(0) = 0, as in T-Few."""
  if warmup_steps < 0 or total_steps < 1:
    raise ValueError(f"schedule: warmup_steps={warmup_steps} must be >= 0 and "
                     f"total_steps={total_steps} >= 1")

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    warm = s / max(1, warmup_steps)
    decay = jnp.maximum(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))
    return peak * jnp.where(s < warmup_steps, warm, decay)
  return schedule


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer + schedule. Defaults: the T-Few (IA)^3 recipe (docs/design.md).

  `total_steps` is the step where the learning rate reaches 0 (TRAIN_STEPS);
  `warmup_steps=None` uses `warmup_ratio * total_steps` (T-Few: 0.06 -> 60).
  """

  name: str = "adafactor"           # adafactor | adamw | adam | sgd
  learning_rate: float = 3e-3
  total_steps: Optional[int] = None   # None: the run's TRAIN_STEPS (T-Few: 1000)
  warmup_steps: Optional[int] = None
  warmup_ratio: float = 0.06
  schedule: str = "linear"          # linear (warmup + linear decay) | constant
  grad_clip_norm: Optional[float] = 1.0
  weight_decay: float = 0.0
  # Adafactor
  multiply_by_parameter_scale: bool = True
  clipping_threshold: Optional[float] = 1.0
  decay_rate: float = 0.8
  min_dim_size_to_factor: int = 128
  eps: float = 1e-30
  # Adam(W)
  b1: float = 0.9
  b2: float = 0.999
  adam_eps: float = 1e-8

  def __post_init__(self):
    if self.name not in ("adafactor", "adamw", "adam", "sgd"):
      raise ConfigError(f"OptimizerConfig.name {self.name!r}: use adafactor, adamw, adam or sgd")
    if self.schedule not in ("linear", "constant"):
      raise ConfigError(f"OptimizerConfig.schedule {self.schedule!r}: use linear or constant")
    if not (isinstance(self.learning_rate, (int, float)) and not isinstance(self.learning_rate, bool)
            and math.isfinite(self.learning_rate) and self.learning_rate >= 0):
      raise ConfigError(f"LEARNING_RATE={self.learning_rate!r}: must be a finite number >= 0 "
                        "(OptimizerConfig.learning_rate)")
    if self.grad_clip_norm is not None and not (
        isinstance(self.grad_clip_norm, (int, float)) and self.grad_clip_norm > 0):
      raise ConfigError(f"OptimizerConfig.grad_clip_norm must be > 0 or None, "
                        f"got {self.grad_clip_norm!r}")

  @property
  def num_warmup_steps(self) -> float:
    """Warmup length; kept fractional like HF (`num_steps * warmup_ratio`)."""
    if self.warmup_steps is not None:
      return float(self.warmup_steps)
    return self.warmup_ratio * (self.total_steps or 0)

  def learning_rate_fn(self) -> Schedule:
    if self.schedule == "constant":
      return lambda count: jnp.full((), self.learning_rate, jnp.float32)
    if self.total_steps is None:
      raise ValueError("OptimizerConfig.total_steps is None: set it (TRAIN_STEPS), or let "
                       "loop.train fill it in")
    return linear_warmup_linear_decay(self.learning_rate, self.num_warmup_steps, self.total_steps)

  def build(self) -> optax.GradientTransformation:
    """clip_by_global_norm (if set), then the optimizer with the schedule."""
    lr = self.learning_rate_fn()
    if self.name == "adafactor":
      opt = optax.adafactor(
          learning_rate=lr, min_dim_size_to_factor=self.min_dim_size_to_factor,
          decay_rate=self.decay_rate, multiply_by_parameter_scale=self.multiply_by_parameter_scale,
          clipping_threshold=self.clipping_threshold, momentum=None,
          weight_decay_rate=self.weight_decay or None, eps=self.eps)
    elif self.name == "adamw":
      opt = optax.adamw(lr, b1=self.b1, b2=self.b2, eps=self.adam_eps,
                        weight_decay=self.weight_decay)
    elif self.name == "adam":
      opt = optax.adam(lr, b1=self.b1, b2=self.b2, eps=self.adam_eps)
    else:
      opt = optax.sgd(lr)
    if self.grad_clip_norm is None:
      return opt
    return optax.chain(optax.clip_by_global_norm(self.grad_clip_norm), opt)
