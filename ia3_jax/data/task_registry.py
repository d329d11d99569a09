"""Task ids: every dataset key has a stable integer id, carried by all its examples.

The built-in datasets have fixed ids (`ia3_jax.tasks.BUILTIN_TASK_IDS`); user datasets take
the id they pass, or the next free one from `FIRST_USER_TASK_ID` on, in registration order.
`get_batches(task_id_map=)` renumbers them into the rows of a task bank.
"""

from __future__ import annotations

from ia3_jax.errors import DataError

FIRST_USER_TASK_ID = 100


_TASK_IDS: dict[str, int] = {}


def register_task_id(key: str, task_id: int | None = None) -> int:
  """Gives dataset `key` a stable task id (the given one, or the next free one >= 100)."""
  if key in _TASK_IDS and (task_id is None or _TASK_IDS[key] == task_id):
    return _TASK_IDS[key]
  if task_id is None:
    task_id = max([FIRST_USER_TASK_ID - 1, *_TASK_IDS.values()]) + 1
  owner = next((k for k, v in _TASK_IDS.items() if v == task_id and k != key), None)
  if owner is not None:
    raise ValueError(f"task id {task_id} of {key!r} is already used by {owner!r}")
  if not isinstance(task_id, int) or task_id < 0:
    raise ValueError(f"task id of {key!r} must be a non-negative int, got {task_id!r}")
  _TASK_IDS[key] = task_id
  return task_id


def task_id(key: str) -> int:
  """The task id of a dataset key."""
  if key not in _TASK_IDS:
    raise DataError(f"no task id for dataset {key!r}; known: {sorted(_TASK_IDS)}")
  return _TASK_IDS[key]


def task_ids() -> dict[str, int]:
  """All dataset keys and their task ids."""
  return dict(_TASK_IDS)
