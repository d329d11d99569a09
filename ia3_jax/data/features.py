"""The batch layout, declared once: every feature of a rank-classification batch.

`feature_converters.RankClassificationFeatureConverter` makes these features
from a seqio task's `inputs` / `choices` / `label` (/ `targets`), and
`batches.get_batches` pads them to full batches, adding `example_mask`. The
train step, the scorer and the checks read the groups below by name. Shapes:
B rows, L input tokens, C answer choices of T tokens each; all int32.
"""

from __future__ import annotations

from typing import Iterator, Mapping, NamedTuple, Protocol

import numpy as np

Batch = Mapping[str, np.ndarray]


class BatchSource(Protocol):
  """Yields this host's numpy batches (`batch_size` rows each, its shard of the data): what the
  train loop and the run kinds take (seqio-free, so training from arrays needs no TensorFlow).

  `start_step` batches are skipped: a deterministic stream resumes exactly.
  """

  def __call__(self, *, batch_size: int, start_step: int, shard_id: int,
               num_shards: int) -> Iterator[Batch]:
    ...


class Feature(NamedTuple):
  dims: tuple[str, ...]  # after the batch dim B
  doc: str


BATCH_FEATURES: dict[str, Feature] = {
    "encoder_input_tokens": Feature(("L",), "input token ids, EOS-terminated, 0-padded"),
    "choice_tokens": Feature(("C", "T"), "answer-choice token ids, EOS-terminated, 0-padded"),
    "choice_mask": Feature(("C",), "1 for a real choice, 0 for padding"),
    "label": Feature((), "index of the correct choice (-1: unlabelled)"),
    "task_id": Feature((), "the dataset's task id (a task-bank row after task_id_map)"),
    "template_id": Feature((), "index of the example's template (-1: padding row)"),
    "example_id": Feature((), "index of the example in its split (-1: padding row)"),
    "inputs_length": Feature((), "input tokens before truncation to L"),
    "num_choices": Feature((), "answer choices before dropping those beyond C"),
    "choice_lengths": Feature(("C",), "tokens of each choice before truncation to T"),
    "example_mask": Feature((), "1 for a real row, 0 for a padding row (added by get_batches)"),
}
CONVERTED_FEATURES = tuple(k for k in BATCH_FEATURES if k != "example_mask")
TOKEN_FEATURES = ("encoder_input_tokens", "choice_tokens")  # token ids: checked against the vocab
MODEL_FEATURES = ("encoder_input_tokens", "choice_tokens", "choice_mask", "task_id")
TRAIN_FEATURES = ("encoder_input_tokens", "choice_tokens", "choice_mask", "label", "example_mask")
ROW_IDS = ("example_id", "template_id", "task_id")  # what identifies a row in output files


def rank(name: str) -> int:
  """Dims of feature `name` after the batch dim."""
  return len(BATCH_FEATURES[name].dims)


def empty_batch(lengths: Mapping[str, int], names=CONVERTED_FEATURES) -> dict[str, np.ndarray]:
  """A batch of zero rows of `names`; lengths: {"L": inputs, "T": targets, "C": choices}."""
  return {k: np.zeros((0, *(lengths[d] for d in BATCH_FEATURES[k].dims)), np.int32)
          for k in names}


def identical_choices(choice_tokens: np.ndarray, choice_mask: np.ndarray) -> np.ndarray:
  """bool [B]: rows where two real choices have the same (possibly cut) tokens."""
  tokens = np.asarray(choice_tokens)
  mask = np.asarray(choice_mask).astype(bool)
  same = np.all(tokens[:, :, None, :] == tokens[:, None, :, :], axis=-1)
  c = tokens.shape[1]
  pairs = same & mask[:, :, None] & mask[:, None, :] & ~np.eye(c, dtype=bool)[None]
  return pairs.any(axis=(1, 2))
