"""Third-party runtimes started quietly: TensorFlow (the data pipeline's, GPUs hidden from it).

TensorFlow only feeds the data pipeline; JAX owns the accelerators. Imported bare, it prints
absl's "log messages before InitializeLog", "Could not find cuda drivers" and "failed call
to cuInit" on stderr from C++, which no Python logging setting reaches, so `import_tf`
imports it once with file descriptor 2 sent to /dev/null (unless $IA3_JAX_VERBOSE is set).
Every ia3-jax module that needs TensorFlow or seqio (which imports it) calls `import_tf`
first, so the command line and the Python API start without that noise.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator, Optional

VERBOSE_ENV = "IA3_JAX_VERBOSE"


def verbose_from_env() -> bool:
  """Whether $IA3_JAX_VERBOSE asks for tracebacks and library start-up logs."""
  return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def stderr_silenced(enabled: bool = True) -> Iterator[None]:
  """Sends file descriptor 2 to /dev/null (C++ libraries print there during start-up)."""
  if not enabled:
    yield
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tf(quiet: Optional[bool] = None) -> Any:
  """TensorFlow, imported once with GPUs hidden from it and (`quiet`, default: unless
  $IA3_JAX_VERBOSE) without its start-up chatter on stderr."""
  quiet = not verbose_from_env() if quiet is None else quiet
  first = "tensorflow" not in sys.modules
  if first and quiet:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  with stderr_silenced(first and quiet):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialised: the setting was made before
      pass
  return tf


def quiet_exit(status: int, verbose: bool = False) -> int:
  """Returns `status`; after a failure (non-zero) in a whole process, first sends file
  descriptor 2 to /dev/null, so that what libraries' background threads print while the
  process shuts down (orbax / tensorstore after a failed read: "Event loop is closed")
  does not follow the one-line error. `verbose` keeps it."""
  if status and not verbose:
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
  return status
