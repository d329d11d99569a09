"""Per-task parameter banks: each example of a batch picks its row by `task_id`.

Every PEFT method with mixed-task batches ((IA)^3, prompt and prefix tuning)
stores its params as a bank `[num_tasks, ...]` and gathers rows here.
`AdapterBank` names the rows: a fixed number of rows allocated up front, so
adapters can be added and removed without changing a shape (no recompilation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax.errors import AdapterError
from ia3_jax.model import params as params_lib

TASKS_AXIS = "tasks"  # logical axis of a bank's first dimension (unsharded by default)


def task_rows(bank: jax.Array, task_id: Optional[jax.Array], batch: int, what: str) -> jax.Array:
  """Rows `[batch, ...]` of `bank [num_tasks, ...]`, one per example.

  `task_id=None` is allowed only for a one-task bank. Ids are not range-checked
  inside jit: out-of-range rows read as NaN (never a silently wrong row); check
  them on the host with `registry.Method.check_task_ids`.
  """
  if task_id is None:
    if bank.shape[0] != 1:
      raise ValueError(f"{what}: a bank of {bank.shape[0]} tasks needs task_id [batch] (the "
                       f"bank has {bank.shape[0]} tasks: pass task_id to pick each example's row)")
    return jnp.broadcast_to(bank[0], (batch,) + bank.shape[1:])
  task_id = jnp.asarray(task_id)
  if task_id.shape != (batch,):
    raise ValueError(f"{what}: task_id must have shape [batch={batch}], got {task_id.shape}")
  return jnp.take(bank, task_id, axis=0, mode="fill", fill_value=jnp.nan)


# --------------------------------------------------------------------------- adapter banks


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
  """One adapter of an `AdapterBank`: its row and what the loader recorded about it."""

  name: str
  row: int
  metadata: Mapping[str, Any]

  @property
  def source(self) -> Optional[str]:
    return self.metadata.get("source")

  @property
  def sites(self) -> Optional[tuple[str, ...]]:
    sites = self.metadata.get("sites")
    return None if sites is None else tuple(sites)


class AdapterBank:
  """Named adapters in the rows of one fixed-size bank `[capacity, ...]` per param.

  All `capacity` rows exist from the start; a row without an adapter holds
  `identity` (ones for (IA)^3: the base model). `add`, `remove` and `replace`
  change only row values, never shapes, so a jitted step that takes
  `params()` as an argument is not traced or compiled again when adapters
  come and go (under capacity). Values are host NumPy arrays, replaced (not
  written in place) on every change, so arrays handed out earlier stay valid.

  Args:
    like: a param tree with a leading task axis (any size, e.g. a one-task
      `ia3.init_ia3(config, sites)`): the bank's params and their row shapes.
    capacity: rows allocated.
    identity: the value of an unused row.
  """

  def __init__(self, like: Mapping[str, Any], capacity: int, *, identity: float = 1.0):
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
      raise AdapterError(f"adapter bank capacity must be a positive int, got {capacity!r}")
    flat = params_lib.flatten(like)
    if not flat:
      raise AdapterError("adapter bank: `like` holds no params")
    self.capacity = int(capacity)
    self.identity = float(identity)
    self.row_shapes = {p: tuple(np.shape(v))[1:] for p, v in sorted(flat.items())}
    self._values = {p: np.full((self.capacity,) + s, self.identity, np.float32)
                    for p, s in self.row_shapes.items()}
    self._adapters: dict[str, AdapterInfo] = {}

  # ---- lookup
  @property
  def names(self) -> tuple[str, ...]:
    """Adapter names in row order."""
    return tuple(sorted(self._adapters, key=lambda n: self._adapters[n].row))

  def __len__(self) -> int:
    return len(self._adapters)

  def __contains__(self, name: object) -> bool:
    return name in self._adapters

  def info(self, name: str) -> AdapterInfo:
    self._require(name)
    return self._adapters[name]

  def row(self, name: str) -> int:
    return self.info(name).row

  def task_id_map(self) -> dict[str, int]:
    """{adapter name: row}: the `task_id` of each adapter's examples."""
    return {n: self._adapters[n].row for n in self.names}

  def name_of_row(self, row: int) -> Optional[str]:
    return next((n for n, a in self._adapters.items() if a.row == row), None)

  def params(self) -> dict[str, Any]:
    """The bank as a param tree `{..: [capacity, ...]}` (float32 NumPy arrays)."""
    return params_lib.unflatten(dict(self._values))

  def select(self, name: str) -> dict[str, Any]:
    """A one-task tree `[1, ...]` of adapter `name`'s values."""
    row = self.row(name)
    return params_lib.unflatten({p: v[row:row + 1] for p, v in self._values.items()})

  # ---- changes (values only)
  def add(self, name: str, vectors: Mapping[str, Any],
          metadata: Optional[Mapping[str, Any]] = None) -> int:
    """Puts adapter `name` into the first free row and returns the row."""
    if not isinstance(name, str) or not name:
      raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
    if name in self._adapters:
      raise AdapterError(f"adapter {name!r} is already in the bank (row "
                         f"{self._adapters[name].row}); use replace() to change it")
    used = {a.row for a in self._adapters.values()}
    free = [r for r in range(self.capacity) if r not in used]
    if not free:
      raise AdapterError(f"adapter {name!r}: the bank is full ({self.capacity} of "
                         f"{self.capacity} rows hold {', '.join(self.names)}); make a bank with "
                         "a larger capacity or remove an adapter first")
    self._write(free[0], self._rows_of(name, vectors))
    self._adapters[name] = AdapterInfo(name, free[0], dict(metadata or {}))
    return free[0]

  def replace(self, name: str, vectors: Mapping[str, Any],
              metadata: Optional[Mapping[str, Any]] = None) -> int:
    """New values (and metadata, if given) for adapter `name`, in its row."""
    info = self.info(name)
    self._write(info.row, self._rows_of(name, vectors))
    if metadata is not None:
      self._adapters[name] = AdapterInfo(name, info.row, dict(metadata))
    return info.row

  def remove(self, name: str) -> int:
    """Frees adapter `name`'s row (back to identity) and returns it."""
    row = self.info(name).row
    self._write(row, {p: np.full(s, self.identity, np.float32)
                      for p, s in self.row_shapes.items()})
    del self._adapters[name]
    return row

  # ---- helpers
  def _require(self, name: str) -> None:
    if name not in self._adapters:
      raise AdapterError(f"no adapter {name!r} in the bank (adapters: "
                         f"{', '.join(self.names) or 'none'})")

  def _rows_of(self, name: str, vectors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`vectors` (rows `[...]` or one-task banks `[1, ...]`) checked against the bank."""
    flat = params_lib.flatten(vectors)
    extra = sorted(set(flat) - set(self.row_shapes))
    missing = sorted(set(self.row_shapes) - set(flat))
    if extra or missing:
      raise AdapterError(
          f"adapter {name!r} has other params than the bank (other sites or layers?): "
          f"{_describe(extra, 'not in the bank')}{'; ' if extra and missing else ''}"
          f"{_describe(missing, 'missing')}")
    rows = {}
    for path, value in flat.items():
      value, want = np.asarray(value, np.float32), self.row_shapes[path]
      if value.shape == (1,) + want:
        value = value[0]
      if value.shape != want:
        raise AdapterError(f"adapter {name!r}: {path} has shape {value.shape}, the bank's rows "
                           f"are {want} (an adapter for another base model shape?)")
      rows[path] = value
    return rows

  def _write(self, row: int, rows: Mapping[str, np.ndarray]) -> None:
    for path, value in rows.items():
      new = self._values[path].copy()
      new[row] = value
      self._values[path] = new

  def __repr__(self) -> str:
    return (f"AdapterBank({len(self)}/{self.capacity} rows: "
            f"{', '.join(f'{n}={r}' for n, r in self.task_id_map().items()) or 'empty'})")


def _describe(paths: list[str], what: str) -> str:
  if not paths:
    return ""
  leaves = sorted({p.rsplit("/", 1)[-1] for p in paths})
  return f"{len(paths)} {what} ({', '.join(leaves)}; e.g. {paths[0]})"
