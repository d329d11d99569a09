"""Helpers shared by the PEFT baselines: projection names, target groups, task-count checks."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

# Every projection `layers.Projecting.project` creates, by block.
ATTENTION_PROJECTIONS = ("query", "key", "value", "out")
MLP_PROJECTIONS = ("wi", "wi_0", "wi_1", "wo")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

# HF / peft module names -> T5X projection names (MLP names are shared).
HF_TO_T5X = {"q": "query", "k": "key", "v": "value", "o": "out",
             **{n: n for n in MLP_PROJECTIONS}}
T5X_TO_HF = {v: k for k, v in HF_TO_T5X.items()}

TARGET_GROUPS = {
    "all": PROJECTIONS,
    "attention": ATTENTION_PROJECTIONS,
    "mlp": MLP_PROJECTIONS,
}


def explicit_mlp_targets(targets: Iterable[str] | str) -> tuple[str, ...]:
  """The MLP projections named one by one (not via a group): they must exist in the model."""
  targets = [targets] if isinstance(targets, str) else list(targets)
  return tuple(t for t in targets if t in MLP_PROJECTIONS)


def check_mlp_targets(config, required: Sequence[str], what: str) -> None:
  """Clear error for MLP targets the model lacks (e.g. `wi` in a gated T5 1.1 MLP)."""
  acts = config.mlp_activations
  names = ("wi",) if len(acts) == 1 else tuple(f"wi_{i}" for i in range(len(acts)))
  missing = [t for t in required if t not in names + ("wo",)]
  if missing:
    raise ValueError(f"{what}: this model's MLP has no {', '.join(missing)} (its projections: "
                     f"{', '.join(names + ('wo',))}; activations {list(acts)})")


def normalize_targets(targets: Iterable[str] | str, *, what: str) -> tuple[str, ...]:
  """Projection names from T5X names, HF names (q, k, v, o) or groups (all, attention, mlp)."""
  if isinstance(targets, str):
    targets = [targets]
  out: list[str] = []
  for t in targets:
    names = TARGET_GROUPS.get(t) or ((HF_TO_T5X[t],) if t in HF_TO_T5X else
                                     (t,) if t in PROJECTIONS else None)
    if names is None:
      raise ValueError(f"{what}: unknown target {t!r}; use projection names "
                       f"{', '.join(PROJECTIONS)}, HF names q, k, v, o, or groups "
                       f"{', '.join(TARGET_GROUPS)}")
    out.extend(n for n in names if n not in out)
  if not out:
    raise ValueError(f"{what}: no targets given")
  return tuple(out)


def require_single_task(method: str, num_tasks: int) -> None:
  """Clear error for methods whose parameters cannot differ per example."""
  check_num_tasks(num_tasks, method)
  if num_tasks != 1:
    raise ValueError(
        f"{method} does not support mixed-task batches (num_tasks={num_tasks}): its parameters "
        "are shared by every example in a batch. Train one adapter per task, or use a method "
        "with per-task banks (ia3, prompt_tuning, prefix_tuning).")


def check_num_tasks(num_tasks: int, method: str) -> None:
  if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"{method}: num_tasks must be a positive int, got {num_tasks!r}")
