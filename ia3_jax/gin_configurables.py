"""The gin edge: the few glue functions that exist only for gin files.

The gin files use T5X's dynamic registration (`from __gin__ import
dynamic_registration`, then `from ia3_jax import loop` and bindings such as
`loop.TrainConfig.train_steps = %TRAIN_STEPS`), so the library's plain
functions and dataclasses are configured by their module paths and need no
registration; every module except this one and the entry points stays free of
gin. (Registering them here under short names as well would create a second,
unrelated configurable for the same function.)

What lives here:
  * `run(action)`: the entry point `ia3_jax.main` calls; `runs/*.gin` bind
    `gin_configurables.run.action` to `loop.train`, `runs.evaluate`, ...
  * `optional_batches(name, ...)`: a `SeqioBatches`, or None when `name` is
    None (e.g. EVAL_MIXTURE_OR_TASK_NAME = None: no evaluation).
  * `feature_lengths(...)`: TASK_FEATURE_LENGTHS with a clear error.
  * `gin_dir()` / `default_search_paths()`: where the shipped gin files live
    (inside the package after a non-editable install, the repo's gin/ otherwise).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

if TYPE_CHECKING:  # imported when called: --help reads this module without seqio/TensorFlow
  from ia3_jax.data import batches


def gin_dir() -> str:
  """Directory of the shipped gin files.

  Installed wheels carry them as `ia3_jax/gin/`; a source checkout (or an
  editable install) has them at the repo's top-level `gin/`. The folder has no
  `__init__.py` on purpose: as a package it would shadow gin-config's `gin`.
  """
  package = os.path.dirname(os.path.abspath(__file__))
  for candidate in (os.path.join(package, "gin"), os.path.join(os.path.dirname(package), "gin")):
    if os.path.isdir(os.path.join(candidate, "runs")):
      return candidate
  raise FileNotFoundError(f"ia3-jax's gin files are missing (looked in {package}/gin and "
                          f"{os.path.dirname(package)}/gin); reinstall the package")


def default_search_paths() -> list[str]:
  """The current directory, then the shipped gin files."""
  return [os.getcwd(), gin_dir()]


def run(action: Callable[[], Any]) -> Any:
  """Calls the configured action (bound by a `runs/*.gin` file)."""
  if not callable(action):
    raise TypeError(f"gin_configurables.run.action must be a callable such as @loop.train, "
                    f"got {action!r}")
  return action()


def feature_lengths(lengths: Mapping[str, int]) -> dict[str, int]:
  if not isinstance(lengths, Mapping) or not {"inputs", "targets"} <= set(lengths):
    raise ValueError(f"TASK_FEATURE_LENGTHS must be a dict with 'inputs', 'targets' (and "
                     f"'num_choices'), got {lengths!r}")
  return {str(k): int(v) for k, v in lengths.items()}


def optional_batches(name: Optional[str], feature_lengths: Mapping[str, int], *,
                     split: Optional[str] = None, seed: int = 0,
                     task_modules: Sequence[str] = (),
                     task_id_map: Optional[Mapping[str, int]] = None
                     ) -> Optional[batches.SeqioBatches]:
  """`batches.SeqioBatches` for `name`, or None when `name` is None or empty."""
  if not name:
    return None
  from ia3_jax.data import batches  # pylint: disable=g-import-not-at-top,redefined-outer-name
  return batches.SeqioBatches(name=name, feature_lengths=dict(feature_lengths), split=split,
                              seed=seed, task_modules=tuple(task_modules or ()),
                              task_id_map=task_id_map)
