"""Deterministic few-shot sampling with the T-Few sizes, seeds and splits.

The k examples for a seed are the first k of a permutation of the split's
indices drawn by NumPy's legacy `RandomState(seed)` (MT19937). That stream is
frozen by NumPy's compatibility policy, does not depend on the host, process or
run, and is what T-Few gets from `np.random.seed(seed)` followed by a shuffle.
Sampling is without replacement, so no example appears twice. The sample is
defined over the split in its source order (TFDS: `shuffle_files=False`;
files: line order).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

import numpy as np

from ia3_jax.data.templates import DataError

T = TypeVar("T")

# The T-Few recipe (docs/design.md): few-shot seeds and per-dataset sizes.
TFEW_SEEDS: tuple[int, ...] = (0, 1, 32, 42, 1024)


@dataclasses.dataclass(frozen=True)
class FewShotSetup:
  """Where a dataset's few-shot examples come from and where it is evaluated."""
  num_shots: int | None  # None: the whole split
  train_split: str       # the split few-shot examples are drawn from
  eval_split: str        # the split accuracy is reported on


# Split names are the TFDS ones (WinoGrande's sizes are splits: train_xl).
TFEW_SETUPS: dict[str, FewShotSetup] = {
    "rte": FewShotSetup(32, "train", "validation"),
    "cb": FewShotSetup(32, "train", "validation"),
    "anli_r1": FewShotSetup(50, "train", "test"),
    "anli_r2": FewShotSetup(50, "train", "test"),
    "anli_r3": FewShotSetup(50, "train", "test"),
    "copa": FewShotSetup(32, "train", "validation"),
    "hellaswag": FewShotSetup(20, "train", "validation"),
    "story_cloze": FewShotSetup(70, "validation", "test"),
    "winogrande": FewShotSetup(50, "train_xl", "validation"),
    "wsc": FewShotSetup(32, "train", "validation"),
    "wic": FewShotSetup(32, "train", "validation"),
}
RAFT_NUM_SHOTS = 50  # RAFT ships exactly 50 labelled examples per task


def sample_indices(num_examples: int, k: int | None, seed: int, *, what: str = "split") -> np.ndarray:
  """Indices of the k examples for `seed` (all of them, permuted, when k is None)."""
  if num_examples < 0 or (k is not None and k < 0):
    raise ValueError(f"{what}: negative size (num_examples={num_examples}, k={k})")
  if not 0 <= seed < 2**32:
    raise ValueError(f"{what}: few-shot seed must be in [0, 2**32), got {seed}")
  if k is not None and k > num_examples:
    raise DataError(f"{what}: asked for {k} few-shot examples but it has only {num_examples}")
  perm = np.random.RandomState(seed).permutation(num_examples)
  return perm if k is None else perm[:k]


def sample(examples: Sequence[T], k: int | None, seed: int, *, what: str = "split") -> list[T]:
  """The k examples of `examples` for `seed`, in sampled order."""
  return [examples[i] for i in sample_indices(len(examples), k, seed, what=what)]
