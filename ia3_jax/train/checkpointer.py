"""Training checkpoints with orbax: trainable params, optimizer state, step and data position.

Layout: `<dir>/<step>/{trainable, opt_state, [frozen], meta}`. By default the
frozen params are not written (they come from the initial checkpoint), so an
(IA)^3 checkpoint of T0-3B holds 540,672 floats (2.2 MB) plus its optimizer
state. Writes are atomic (orbax writes a temporary directory and renames it
when complete), so a run killed mid-write leaves the previous checkpoint as
the latest; the last `keep` checkpoints are kept. `meta` (JSON) records the
step, the data position (batches consumed) and what is needed to check that a
resumed run is the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import time
from typing import Any, Iterator, Mapping, Optional

import jax

from ia3_jax import files, runtime
from ia3_jax.interop.hf_checkpoints import CheckpointError
from ia3_jax.model import params as params_lib

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When and what to save.

  period: save every `period` steps (0: only at the end of training).
  keep: how many of the newest checkpoints to keep (None: all).
  save_frozen: also write the frozen params (a self-contained checkpoint).
  async_save: write in a background thread while training continues.
  """

  period: int = 100
  keep: Optional[int] = 3
  save_frozen: bool = False
  async_save: bool = True

  def __post_init__(self):
    if self.period < 0:
      raise ValueError(f"CheckpointConfig.period must be >= 0, got {self.period}")
    if self.keep is not None and self.keep < 1:
      raise ValueError(f"CheckpointConfig.keep must be >= 1 or None, got {self.keep}")


def _shape_of(leaf: Any) -> Optional[tuple[int, ...]]:
  shape = getattr(leaf, "shape", None)
  return None if shape is None else tuple(shape)


def check_tree_matches(saved: Mapping[str, Any], expected: Mapping[str, Any], *,
                       where: str) -> None:
  """Raises `CheckpointError` naming the first param whose presence or shape differs."""
  flat_saved = params_lib.flatten(saved)
  flat_expected = params_lib.flatten(expected)
  for name in sorted(set(flat_saved) | set(flat_expected)):
    if name not in flat_expected:
      raise CheckpointError(f"{where}: param {name} (shape {_shape_of(flat_saved[name])}) is "
                            "not part of this model's trainable params (a checkpoint of "
                            "another model or PEFT method?)")
    if name not in flat_saved:
      raise CheckpointError(f"{where}: missing param {name} (shape "
                            f"{_shape_of(flat_expected[name])}) that this model trains")
    got, want = _shape_of(flat_saved[name]), _shape_of(flat_expected[name])
    if got != want:
      raise CheckpointError(f"{where}: param {name} has shape {got} in the checkpoint; "
                            f"this model expects {want} (a checkpoint of another model shape?)")


@contextlib.contextmanager
def _orbax_quietly() -> Iterator[None]:
  """stderr off while orbax reads (unless $IA3_JAX_VERBOSE): after a failed read its
  tensorstore threads print tracebacks ("Event loop is closed") for a moment; on a failure
  that moment passes before stderr is back, and the error is raised as one exception."""
  with runtime.stderr_silenced(not runtime.verbose_from_env()):
    try:
      yield
    except Exception:
      time.sleep(0.5)
      raise


def _nbytes(tree: Any) -> int:
  return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


class Checkpointer:
  """An orbax `CheckpointManager` for train states."""

  def __init__(self, directory: PathLike, config: CheckpointConfig = CheckpointConfig()):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = pathlib.Path(directory).absolute()
    self.config = config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep, create=True, enable_async_checkpointing=config.async_save)
    handlers = {name: ocp.StandardCheckpointHandler()
                for name in ("trainable", "opt_state", "frozen")}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def path(self, step: int) -> str:
    return str(self.directory / str(step))

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Starts writing `state` (a TrainState) at `step`; returns before it is done when async."""
    ocp = self._ocp
    trees = [state.trainable, state.opt_state] + ([state.frozen] if self.config.save_frozen else [])
    files.check_free_space(self.path(step), int(1.1 * _nbytes(trees)) + (256 << 10),
                           f"checkpoint {step}")
    items = dict(trainable=ocp.args.StandardSave(state.trainable),
                 opt_state=ocp.args.StandardSave(state.opt_state),
                 meta=ocp.args.JsonSave({**meta, "step": int(step),
                                         "format_version": FORMAT_VERSION}))
    if self.config.save_frozen and params_lib.flatten(state.frozen):
      items["frozen"] = ocp.args.StandardSave(state.frozen)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=self._ocp.args.Composite(
        meta=self._ocp.args.JsonRestore())).meta

  def _saved_tree(self, step: int, item: str) -> Any:
    metadata = self.manager.item_metadata(step)
    tree = metadata.get(item) if hasattr(metadata, "get") else None
    if tree is None:
      raise CheckpointError(f"{self.path(step)}: no {item!r} item")
    return tree.tree

  def has_frozen(self, step: int) -> bool:
    return (pathlib.Path(self.path(step)) / "frozen").exists()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, Optional[Any], dict]:
    """(trainable, opt_state, frozen or None, meta) at `step`, placed like `abstract_state`.

    `abstract_state` is a TrainState of `jax.ShapeDtypeStruct`s with shardings.
    The trainable tree is checked first: a checkpoint of another model shape
    or PEFT method names the mismatched param.
    """
    try:
      with _orbax_quietly():
        return self._restore(step, abstract_state)
    except (ValueError, KeyError, TypeError, OSError) as e:
      if isinstance(e, CheckpointError) or not is_unreadable(e):
        raise
      older = max((s for s in self.all_steps() if s < step), default=None)
      raise unreadable_error(pathlib.Path(self.path(step)), e,
                             older and f"run the same command again to resume from step {older}"
                             ) from e

  def _restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, Optional[Any], dict]:
    ocp = self._ocp
    where = f"{self.path(step)}/trainable"
    check_tree_matches(self._saved_tree(step, "trainable"), abstract_state.trainable, where=where)
    items = dict(trainable=ocp.args.StandardRestore(abstract_state.trainable),
                 opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                 meta=ocp.args.JsonRestore())
    restore_frozen = self.has_frozen(step) and params_lib.flatten(abstract_state.frozen)
    if restore_frozen:
      check_tree_matches(self._saved_tree(step, "frozen"), abstract_state.frozen,
                         where=f"{self.path(step)}/frozen")
      items["frozen"] = ocp.args.StandardRestore(abstract_state.frozen)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      if is_unreadable(e):
        raise
      raise CheckpointError(f"{self.path(step)}: cannot restore the optimizer state or params "
                            f"into this run's structure ({type(e).__name__}: {e})") from e
    frozen = restored.frozen if restore_frozen else None
    return restored.trainable, restored.opt_state, frozen, restored.meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# What tensorstore / orbax say about a damaged file (rather than a tree that does not fit).
_UNREADABLE = re.compile(r"DATA_LOSS|OUT_OF_RANGE|Error (reading|opening|decoding)|Unexpected end|"
                         r"not a valid|Expecting value|corrupt", re.IGNORECASE)


def is_unreadable(error: BaseException) -> bool:
  """Whether `error` (from restoring a checkpoint) says its files are damaged or cut."""
  return isinstance(error, (OSError, json.JSONDecodeError)) or bool(_UNREADABLE.search(str(error)))


def unreadable_error(step_dir: pathlib.Path, error: BaseException, then: Optional[str]
                     ) -> CheckpointError:
  """One line: which step is damaged, that it was left in place, and how to go on (`then`,
  after moving it away; None: no older step is left)."""
  detail = str(error).split(" [tensorstore_spec")[0].splitlines()[0][:200]
  fix = (f"move it away (mv {step_dir} {step_dir}.broken), then {then}" if then
         else "remove it (no older checkpoint is left) and start again")
  return CheckpointError(f"{step_dir}: checkpoint step {step_dir.name} is unreadable "
                         f"({detail}); it was left as it is: {fix}")


def resolve_step_dir(path: PathLike) -> pathlib.Path:
  """A checkpoint step directory from a step directory, a directory of steps
  (`MODEL_DIR/checkpoints`: the newest complete step) or a MODEL_DIR."""
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise CheckpointError(f"{path}: no such checkpoint")
  if (path / "trainable").exists():
    return path
  for root in (path, path / "checkpoints"):
    if root.is_dir():
      steps = sorted(int(p.name) for p in root.iterdir()
                     if p.name.isdigit() and (p / "trainable").exists())
      if steps:
        return root / str(steps[-1])
  raise CheckpointError(f"{path}: not a training checkpoint (a step directory with "
                        "trainable/, a directory of them, or a MODEL_DIR with checkpoints/)")


def is_training_checkpoint(path: PathLike) -> bool:
  """Whether `path` looks like a training checkpoint: a step directory (with trainable/), a
  directory of them, or a MODEL_DIR with checkpoints/ (`resolve_step_dir` then finds the
  step, or says why none is complete)."""
  p = pathlib.Path(path)
  return p.is_dir() and ((p / "trainable").exists() or (p / "checkpoints").exists() or any(
      (c / "trainable").exists() for c in p.iterdir() if c.is_dir()))


def trainable_dir(path: PathLike) -> pathlib.Path:
  """The `<step>/trainable` orbax params of a training checkpoint (what `ia3-jax merge`,
  `export-peft` and adapter banks read)."""
  return resolve_step_dir(path) / "trainable"


def read_checkpoint_meta(path: PathLike) -> tuple[pathlib.Path, dict]:
  """(step directory, its meta dict) for any path `resolve_step_dir` accepts."""
  step_dir = resolve_step_dir(path)
  meta_file = step_dir / "meta" / "metadata"
  try:
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{meta_file}: not valid JSON ({e}); the checkpoint's meta is "
                          "damaged") from None
  return step_dir, meta


def restore_trainable(path: PathLike, abstract_trainable: Optional[Any] = None) -> tuple[Any, dict]:
  """The trainable params (and meta) of a training checkpoint (see `resolve_step_dir`).

  With `abstract_trainable` (ShapeDtypeStructs, optionally with shardings) the
  tree is checked first (a mismatch names the param) and restored onto those
  shardings. Used by eval, score, infer, merge and export-peft.
  """
  import orbax.checkpoint as ocp
  step_dir, meta = read_checkpoint_meta(path)
  try:
    with _orbax_quietly():
      return _restore_trainable(ocp, step_dir, abstract_trainable), meta
  except (ValueError, KeyError, TypeError, OSError) as e:
    if not is_unreadable(e) or isinstance(e, CheckpointError):
      raise
    older = max((int(p.name) for p in step_dir.parent.iterdir() if p.name.isdigit()
                 and int(p.name) < int(step_dir.name) and (p / "trainable").exists()), default=None)
    raise unreadable_error(step_dir, e, older and "run the same command again (it reads step "
                           f"{older}), or name that step: {step_dir.parent / str(older)}") from e


def _restore_trainable(ocp: Any, step_dir: pathlib.Path, abstract_trainable: Optional[Any]) -> Any:
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(step_dir / "trainable")
    saved = getattr(saved, "item_metadata", saved)
    saved = getattr(saved, "tree", saved)
    if abstract_trainable is None:  # onto this process's first device, whatever wrote it
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract_trainable = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    else:
      check_tree_matches(saved, abstract_trainable, where=f"{step_dir}/trainable")
    return ckptr.restore(step_dir / "trainable", abstract_trainable)
