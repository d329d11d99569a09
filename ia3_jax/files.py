"""Files that are either whole or absent: atomic writes (files, safetensors, whole output
directories), JSON that holds NumPy values, one-line reports of file-system failures.

Every results file, prediction file and config ia3-jax writes goes through
here: the content is written to `<name>.tmp` next to the target and renamed
over it, so a crash, a signal or a full disk never leaves a partial file, and
a failed write leaves no `.tmp` behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterable, Iterator, Mapping, TextIO

import numpy as np

from ia3_jax.errors import ConfigError, FileSystemError, Ia3JaxError

PathLike = str | os.PathLike


def jsonable(x: Any) -> Any:
  """`x` with NumPy values as Python ones, keys as strings, NaN/inf as None (JSON has none)."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w") -> Iterator[TextIO]:
  """Opens `<path>.tmp` for writing; on success renames it to `path`, on error removes it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_json(path: PathLike, obj: Any, *, sort_keys: bool = False) -> pathlib.Path:
  """Writes `jsonable(obj)` as indented JSON, atomically. Returns the path."""
  with atomic_open(path) as f:
    f.write(json.dumps(jsonable(obj), indent=2, sort_keys=sort_keys) + "\n")
  return pathlib.Path(path)


def write_text(path: PathLike, text: str) -> pathlib.Path:
  """Writes `text` atomically. Returns the path."""
  with atomic_open(path) as f:
    f.write(text)
  return pathlib.Path(path)


# --------------------------------------------------------------------------- modes, directories


def umask() -> int:
  """The process's umask (read by setting it and back: there is no getter)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def apply_default_modes(root: PathLike) -> None:
  """Gives `root` and everything under it the modes a plain `open`/`mkdir` would (0666 / 0777
  less the umask): safetensors and `tempfile` create theirs 0600 / 0700."""
  mask = umask()
  for dirpath, _, names in os.walk(root):
    os.chmod(dirpath, 0o777 & ~mask)
    for name in names:
      path = os.path.join(dirpath, name)
      if not os.path.islink(path):
        os.chmod(path, 0o666 & ~mask)


def write_safetensors(path: PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes NumPy `tensors` as a safetensors file, atomically and with the default file mode."""
  from safetensors.numpy import save_file
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  try:
    save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def same_path(a: PathLike, b: PathLike) -> bool:
  """Whether `a` and `b` name the same file or directory (links and `..` resolved)."""
  try:
    return os.path.samefile(a, b)
  except OSError:
    return os.path.realpath(a) == os.path.realpath(b)


def is_inside(path: PathLike, directory: PathLike) -> bool:
  """Whether `path` is `directory` or lies under it (after resolving links)."""
  p, d = pathlib.Path(os.path.realpath(path)), pathlib.Path(os.path.realpath(directory))
  return p == d or d in p.parents


def check_output_dir(path: PathLike, *, overwrite: bool = False, flag: str = "--out") -> None:
  """Refuses an output directory that exists with content (unless `overwrite`), is a file, or
  cannot be written (probed by creating a file next to it), with one line naming `flag`."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise ConfigError(f"{flag} {path}: is a file, not a directory")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise ConfigError(f"{flag} {path}: already exists; pass --overwrite to replace it")
  parent = path.absolute().parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=parent):
      pass
  except OSError as e:
    raise ConfigError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e})") from None


@contextlib.contextmanager
def output_dir(path: PathLike, *, overwrite: bool = False, flag: str = "--out"
               ) -> Iterator[pathlib.Path]:
  """A directory that appears whole or not at all.

  Checks `path` first (`check_output_dir`), then yields a fresh sibling path
  (`.<name>.tmp-XXXX`, not yet created: writers create it) to write into; on success
  it gets the default modes and is renamed to `path` (an existing `path` is replaced only
  then, so a failure leaves it as it was); on any error, or a signal, it is removed.
  """
  path = pathlib.Path(path).absolute()
  check_output_dir(path, overwrite=overwrite, flag=flag)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  tmp.rmdir()
  try:
    yield tmp
    apply_default_modes(tmp)
    if path.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
      os.replace(path, old / path.name)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException as e:
    _remove_all(path.parent.glob(glob.escape(tmp.name) + "*"))  # and writers' own temp dirs
    line = None if isinstance(e, Ia3JaxError) else environment_error_line(e, path)
    if line:
      raise FileSystemError(line) from e
    raise


def _remove_all(paths: Iterable[pathlib.Path]) -> None:
  for path in paths:
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path, ignore_errors=True)
    else:
      path.unlink(missing_ok=True)



# --------------------------------------------------------------------------- file system errors

# The OSError kinds that are the user's environment, not a bug: reported as one line.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                      errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EFBIG)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def nearest_existing(path: PathLike) -> pathlib.Path:
  """`path` if it exists, else its nearest existing parent (where it would be created)."""
  p = pathlib.Path(path).absolute()
  while not p.exists() and p != p.parent:
    p = p.parent
  return p


def free_space(path: PathLike) -> str:
  """'X free of Y' for the file system that holds (or would hold) `path`."""
  try:
    usage = shutil.disk_usage(nearest_existing(path))
  except OSError:
    return "free space unknown"
  return f"{_size(usage.free)} free of {_size(usage.total)}"


def check_free_space(path: PathLike, needed_bytes: int, what: str) -> None:
  """Raises `FileSystemError` (one line) when the file system of `path` has less than
  `needed_bytes` free: a write that would fill the disk is refused before it starts, so no
  library's half-written files or background-thread tracebacks are left behind."""
  try:
    free = shutil.disk_usage(nearest_existing(path)).free
  except OSError:
    return
  if free < needed_bytes:
    raise FileSystemError(f"{path}: {what} needs about {_size(needed_bytes)} and only "
                          f"{_size(free)} are free there; free some space and run the same "
                          "command again (nothing was written)")


def _size(nbytes: float) -> str:
  return f"{nbytes / 1e3:,.0f} kB" if nbytes < 1e6 else f"{nbytes / 1e6:,.1f} MB"


def is_no_space(error: BaseException) -> bool:
  """A full disk or quota, raised as an OSError or inside another library's error text."""
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  return any(t in str(error) for t in _NO_SPACE_TEXT)


def environment_error_line(error: BaseException, where: PathLike | None = None) -> str | None:
  """One line for a file-system failure (full disk, read-only, permission, missing path):
  the path and what to do; None for errors that are not such a failure."""
  filename = getattr(error, "filename", None) or where
  if is_no_space(error):
    target = filename or "the output"
    return (f"{target}: no space left on the device ({free_space(target)}); free some space "
            "and run the same command again (nothing half-written was kept)")
  if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
    return f"{filename or 'a file'}: {error.strerror or error}"
  return None
