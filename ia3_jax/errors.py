"""The exceptions ia3-jax raises for expected failures, under one base class.

Entry points (`python -m ia3_jax.main`, `ia3-jax ...`) turn any `Ia3JaxError`
into a one-line message naming the file, flag or field concerned and exit
status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class Ia3JaxError(Exception):
  """Base class: an expected failure with a message that says what to fix."""


class ConfigError(Ia3JaxError, ValueError):
  """A configuration problem (gin file, flag, option); names the file or flag."""


class DataError(Ia3JaxError, ValueError):
  """Bad data or template; the message names file, line, template and field."""


class EmptyRenderError(DataError):
  """A template renders an empty input or target for an example (e.g. a question-specific one)."""


class CheckpointError(Ia3JaxError, ValueError):
  """A checkpoint that cannot be read as the requested model."""


class AdapterError(Ia3JaxError, ValueError):
  """An adapter file that cannot be read as (or written for) this model."""


class FileSystemError(Ia3JaxError, OSError):
  """The environment refused a write or read (full disk, read-only, permissions); names the
  path, and what was left (nothing half-written)."""


class TrainingDivergedError(Ia3JaxError, RuntimeError):
  """The loss became NaN or infinite; names the step and the last good checkpoint."""


class TrainingInterrupted(Ia3JaxError):
  """Training stopped on SIGINT/SIGTERM (or a multi-host preemption) after saving a
  checkpoint at `step`.

  Entry points print one line and exit 130 for SIGINT ("interrupted at step N; the same
  command resumes"), 0 for a preemption, SIGTERM (`preempted`: the run did what a
  preemptible job should, and a scheduler must not count it as failed).
  """

  def __init__(self, step: int, model_dir: str | None = None, message: str | None = None,
               signal_name: str | None = None):
    self.step = int(step)
    self.model_dir = model_dir
    self.signal_name = signal_name
    super().__init__(message or f"interrupted at step {self.step}; the same command resumes")

  @property
  def preempted(self) -> bool:
    return self.signal_name in ("SIGTERM", "preemption")
