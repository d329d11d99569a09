"""Files that are either whole or absent: atomic writes, JSON that holds NumPy values.

Every results file, prediction file and config ia3-jax writes goes through
here: the content is written to `<name>.tmp` next to the target and renamed
over it, so a crash, a signal or a full disk never leaves a partial file, and
a failed write leaves no `.tmp` behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
from typing import Any, Iterator, Mapping, TextIO

import numpy as np

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
