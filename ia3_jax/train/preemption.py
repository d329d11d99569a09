"""Stop requests (SIGINT, SIGTERM, a multi-host preemption) that the train loop checks per step.

`StopOnSignal` installs handlers that only record the signal, so the loop can
finish its step, save a checkpoint and raise `TrainingInterrupted`; a second
signal of the same kind raises `KeyboardInterrupt` at once (the user insists).
The previous handlers come back on exit. Outside the main thread (where Python
cannot install handlers) it does nothing.

Several processes (Cloud TPU pods, multi-host GPU jobs) must stop at the same
step: there SIGTERM, the preemption notice, is left to JAX's coordination
service, which tells every host; `should_stop(step)` asks it through
`jax.experimental.multihost_utils.reached_preemption_sync_point`, true on every
host at the same step (T5X's scheme). Send SIGTERM, not SIGINT, to stop such a
run.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional, Sequence

import jax
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
  """Context manager: `.requested` is the first stop signal received (None before).

  `preemption_sync` (default: more than one process) polls the coordination
  service's preemption sync point in `should_stop` and leaves SIGTERM to it.
  """

  def __init__(self, signals: Sequence[int] = STOP_SIGNALS, *,
               preemption_sync: Optional[bool] = None):
    self.preemption_sync = (jax.process_count() > 1 if preemption_sync is None
                            else preemption_sync)
    self.signals = tuple(s for s in signals
                         if not (self.preemption_sync and s == signal.SIGTERM))
    self.requested: Optional[int] = None
    self.preempted = False
    self._previous: dict[int, Any] = {}

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step` (call it after every step, on every host)."""
    if self.preemption_sync and multihost_utils.reached_preemption_sync_point(step):
      self.preempted = True
    return self.preempted or self.requested is not None

  def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
    if self.requested is not None:
      raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
    self.requested = signum

  @property
  def signal_name(self) -> Optional[str]:
    if self.requested is None:
      return "preemption" if self.preempted else None
    return signal.Signals(self.requested).name

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
