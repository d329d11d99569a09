"""Helpers shared by the PEFT baselines: projection names and target groups."""

from __future__ import annotations

from typing import Iterable, Sequence

from ia3_jax.errors import ConfigError

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
    raise ConfigError(f"{what}: this model's MLP has no {', '.join(missing)} (its projections: "
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
      raise ConfigError(f"{what}: unknown target {t!r}; use projection names "
                       f"{', '.join(PROJECTIONS)}, HF names q, k, v, o, or groups "
                       f"{', '.join(TARGET_GROUPS)}")
    out.extend(n for n in names if n not in out)
  if not out:
    raise ConfigError(f"{what}: no targets given")
  return tuple(out)


def split_targets(targets: Iterable[str] | str, what: str) -> tuple[tuple, tuple, tuple]:
  """(attention projections, MLP projections, MLP ones named explicitly) of `targets`."""
  names = normalize_targets(targets, what=what)
  return (tuple(n for n in names if n in ATTENTION_PROJECTIONS),
          tuple(n for n in names if n in MLP_PROJECTIONS), explicit_mlp_targets(targets))
