"""Per-task parameter banks: each example of a batch picks its row by `task_id`.

Every PEFT method with mixed-task batches ((IA)^3, prompt and prefix tuning)
stores its params as a bank `[num_tasks, ...]` and gathers rows here.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

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
