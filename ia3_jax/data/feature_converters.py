"""Rank-classification feature converter with static shapes and counted truncation.

Task features (from the seqio tasks of `ia3_jax.data`): `inputs` [n] and
`targets` [m] token ids ending in EOS, `choices` [c, None] (every answer choice,
EOS appended), `label` (index of the correct choice, -1 when unlabelled),
`task_id`, and optionally `template_id`, `example_id`.

Model features (one example; batching adds the leading B):

  encoder_input_tokens [L]     inputs cut or 0-padded to L
  choice_tokens        [C, T]  every choice cut or 0-padded to T, padding choices all 0
                               (decoder TARGETS: the model shifts them right itself)
  choice_mask          [C]     1 for a real choice
  label, task_id, template_id, example_id   scalars
  inputs_length, num_choices   untrimmed token count of the inputs, untrimmed choice count
  choice_lengths       [C]     untrimmed token count of each kept choice

A sequence longer than its slot keeps its first L-1 (T-1) tokens followed by
EOS (when it ended in EOS), as seqio's `append_eos_after_trim` and HF
tokenizers do. Choices beyond C are dropped. Nothing is cut silently: the
untrimmed lengths travel with the batch and `TruncationStats` counts every cut;
an example whose correct choice would be dropped is an error.

LM mode (`lm_only=True`; multitask pre-training, L_LM only): the single choice
is `targets`, C = 1, label 0.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
from ia3_jax import runtime

tf = runtime.import_tf()  # quietly, before seqio imports it
import seqio  # pylint: disable=g-import-not-at-top

from ia3_jax.data import features


PAD_ID = 0
EOS_ID = 1

_FS = seqio.FeatureConverter.FeatureSpec
_OPTIONAL_SCALARS = features.ROW_IDS


def _fit_1d(tokens, length: int):
  """Cuts (keeping a final EOS) or 0-pads a 1-D token tensor to `length`."""
  n = tf.size(tokens)
  ends_eos = tf.logical_and(n > 0, tf.equal(tokens[tf.maximum(n - 1, 0)], EOS_ID))
  cut = tokens[:length]
  cut = tf.cond(tf.logical_and(n > length, ends_eos),
                lambda: tf.concat([cut[:length - 1], [EOS_ID]], axis=0), lambda: cut)
  cut = tf.pad(cut, [[0, length - tf.size(cut)]])
  cut.set_shape([length])
  return cut


def _fit_2d(rows: "tf.RaggedTensor", num_rows: int, length: int):
  """Fits the first `num_rows` rows of a ragged [n, None] tensor into [num_rows, length]."""
  kept = rows[:num_rows]
  lengths = tf.cast(kept.row_lengths(), tf.int32)
  last = tf.gather(kept.values, tf.maximum(tf.cast(kept.row_limits(), tf.int32) - 1, 0))
  ends_eos = tf.logical_and(lengths > 0, tf.equal(last, EOS_ID))
  dense = kept.to_tensor(default_value=PAD_ID)
  k, width = tf.shape(dense)[0], tf.shape(dense)[1]
  dense = tf.pad(dense, [[0, num_rows - k], [0, tf.maximum(length - width, 0)]])[:, :length]
  over = tf.pad(tf.logical_and(lengths > length, ends_eos), [[0, num_rows - k]])
  final = tf.where(over, tf.constant(EOS_ID, dense.dtype), dense[:, length - 1])
  dense = tf.concat([dense[:, :length - 1], final[:, None]], axis=1)
  dense.set_shape([num_rows, length])
  lengths = tf.pad(lengths, [[0, num_rows - k]])
  lengths.set_shape([num_rows])
  return dense, lengths


class RankClassificationFeatureConverter(seqio.FeatureConverter):
  """Task features -> the rank-classification batch layout (see module doc).

  `task_feature_lengths` is `{"inputs": L, "targets": T, "num_choices": C}`
  ("num_choices" may instead be given to the constructor). `__call__` is
  overridden because seqio's base class requires task features to already fit
  their lengths, which would turn counted truncation into an error.
  """

  TASK_FEATURES = {"inputs": _FS(tf.int32, 1), "targets": _FS(tf.int32, 1),
                   "choices": _FS(tf.int32, 2), "label": _FS(tf.int32, 0)}
  MODEL_FEATURES = {k: _FS(tf.int32, features.rank(k)) for k in features.CONVERTED_FEATURES}
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, num_choices: int | None = None, lm_only: bool = False):
    super().__init__(pack=False, apply_length_check=False)
    self._num_choices = num_choices
    self._lm_only = lm_only

  def _lengths(self, task_feature_lengths: Mapping[str, int]) -> tuple[int, int, int]:
    unknown = set(task_feature_lengths) - {"inputs", "targets", "num_choices"}
    if unknown:
      raise ValueError(f"feature_lengths: unknown keys {sorted(unknown)}; expected inputs, "
                       "targets, num_choices")
    c = 1 if self._lm_only else task_feature_lengths.get("num_choices", self._num_choices)
    lengths = {"inputs": task_feature_lengths.get("inputs"),
               "targets": task_feature_lengths.get("targets"), "num_choices": c}
    for key, value in lengths.items():
      if not isinstance(value, (int, np.integer)) or value < (2 if key != "num_choices" else 1):
        raise ValueError(f"feature_lengths[{key!r}] must be an int >= "
                         f"{2 if key != 'num_choices' else 1}, got {value!r}")
    return int(lengths["inputs"]), int(lengths["targets"]), int(c)

  def get_model_feature_lengths(self, task_feature_lengths):
    length, target_length, c = self._lengths(task_feature_lengths)
    return {"encoder_input_tokens": length, "choice_tokens": target_length, "choice_mask": c,
            "choice_lengths": c}

  def __call__(self, ds, task_feature_lengths):
    length, target_length, c = self._lengths(task_feature_lengths)
    required = ({"inputs", "targets"} if self._lm_only else {"inputs", "choices", "label"})
    ds = self._validate_dataset(ds, {k: v for k, v in self.TASK_FEATURES.items() if k in required},
                                {}, strict=False, error_label="input_validation")
    fn = tf.autograph.experimental.do_not_convert(
        lambda ex: self._convert_example(ex, length, target_length, c))
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)

  def _convert_features(self, ds, task_feature_lengths):
    return self(ds, task_feature_lengths)

  def _convert_example(self, ex, length: int, target_length: int, c: int):
    if self._lm_only:
      choices = tf.RaggedTensor.from_tensor(ex["targets"][None, :])
      label = tf.constant(0, tf.int32)
    else:
      choices = ex["choices"]
      if not isinstance(choices, tf.RaggedTensor):
        choices = tf.RaggedTensor.from_tensor(choices)
      label = tf.cast(ex["label"], tf.int32)
    n = tf.cast(choices.nrows(), tf.int32)
    example_id = tf.cast(ex.get("example_id", -1), tf.int32)
    check = tf.debugging.Assert(
        tf.logical_and(label >= -1, label < tf.minimum(n, c)),
        ["Correct choice (label) outside the kept choices: the example has", n,
         "choices, feature_lengths['num_choices'] is", c, "label", label,
         "example_id", example_id, "task_id", tf.cast(ex.get("task_id", 0), tf.int32),
         "template_id", tf.cast(ex.get("template_id", -1), tf.int32)])
    with tf.control_dependencies([check]):
      label = tf.identity(label)
    choice_tokens, choice_lengths = _fit_2d(choices, c, target_length)
    out = {
        "encoder_input_tokens": _fit_1d(ex["inputs"], length),
        "choice_tokens": choice_tokens,
        "choice_mask": tf.cast(tf.range(c) < n, tf.int32),  # static [C]
        "label": label,
        "inputs_length": tf.size(ex["inputs"], out_type=tf.int32),
        "num_choices": n,
        "choice_lengths": choice_lengths,
    }
    for key in _OPTIONAL_SCALARS:
      default = 0 if key == "task_id" else -1
      out[key] = tf.cast(ex.get(key, default), tf.int32)
    return out


@dataclasses.dataclass
class TruncationStats:
  """Counts of everything cut to fit the static batch shapes."""

  inputs_length: int
  targets_length: int
  num_choices: int
  examples: int = 0
  inputs_truncated: int = 0
  choices_truncated: int = 0
  examples_with_choices_truncated: int = 0
  choices_dropped: int = 0
  examples_with_choices_dropped: int = 0
  max_inputs_length: int = 0
  max_choice_length: int = 0
  max_num_choices: int = 0
  examples_with_identical_choices: int = 0

  def update(self, batch: Mapping[str, np.ndarray]) -> None:
    """Adds the real (unpadded) rows of a converted batch."""
    rows = np.ones(batch["label"].shape, bool)
    if "example_mask" in batch:
      rows = batch["example_mask"].astype(bool)
    if not rows.any():
      return
    inputs_len = batch["inputs_length"][rows]
    n = batch["num_choices"][rows]
    lengths = batch["choice_lengths"][rows] * batch["choice_mask"][rows]
    cut = lengths > self.targets_length
    self.examples += int(rows.sum())
    self.inputs_truncated += int((inputs_len > self.inputs_length).sum())
    self.choices_truncated += int(cut.sum())
    self.examples_with_choices_truncated += int(cut.any(axis=1).sum())
    self.choices_dropped += int(np.maximum(n - self.num_choices, 0).sum())
    self.examples_with_choices_dropped += int((n > self.num_choices).sum())
    self.max_inputs_length = max(self.max_inputs_length, int(inputs_len.max()))
    self.max_choice_length = max(self.max_choice_length, int(lengths.max()))
    self.max_num_choices = max(self.max_num_choices, int(n.max()))
    self.examples_with_identical_choices += int(
        features.identical_choices(batch["choice_tokens"][rows], batch["choice_mask"][rows]).sum())

  def add(self, other: Mapping[str, int]) -> None:
    """Adds the counts of another pass (`as_dict()` of it, e.g. from a checkpoint's meta)."""
    for field in dataclasses.fields(self):
      if field.name in other and field.name not in ("inputs_length", "targets_length",
                                                     "num_choices"):
        mine, theirs = getattr(self, field.name), int(other[field.name])
        setattr(self, field.name, max(mine, theirs) if field.name.startswith("max_")
                else mine + theirs)

  @property
  def any_truncated(self) -> bool:
    return bool(self.inputs_truncated or self.choices_truncated or self.choices_dropped)

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  def report(self, name: str = "data") -> str:
    """One line a human can act on."""
    head = (f"{name}: {self.examples} examples; inputs cut to {self.inputs_length} tokens in "
            f"{self.inputs_truncated} (longest {self.max_inputs_length}); choices cut to "
            f"{self.targets_length} tokens: {self.choices_truncated} choices in "
            f"{self.examples_with_choices_truncated} examples (longest {self.max_choice_length}); "
            f"choices dropped beyond {self.num_choices}: {self.choices_dropped} in "
            f"{self.examples_with_choices_dropped} examples (most {self.max_num_choices})")
    if self.examples_with_identical_choices:
      head += (f"; {self.examples_with_identical_choices} examples have identical answer "
               "choices (rank classification cannot tell them apart)")
    return head

