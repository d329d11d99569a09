"""Stop requests (SIGINT, SIGTERM) turned into a flag the training loop checks between steps.

`StopOnSignal` installs handlers that only record the signal, so the loop can
finish its step, save a checkpoint and raise `TrainingInterrupted`; a second
signal of the same kind raises `KeyboardInterrupt` at once (the user insists).
The previous handlers come back on exit. Outside the main thread (where Python
cannot install handlers) it does nothing.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
  """Context manager: `.requested` is the first stop signal received (None before)."""

  def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
    self.signals = tuple(signals)
    self.requested: Optional[int] = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
    if self.requested is not None:
      raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
    self.requested = signum

  @property
  def signal_name(self) -> Optional[str]:
    return None if self.requested is None else signal.Signals(self.requested).name

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
