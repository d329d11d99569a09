"""Rank-classification converter: static shapes, EOS-keeping cuts, padding, and counted truncation."""

import numpy as np
import pytest
import tensorflow as tf

from ia3_jax.data.feature_converters import (EOS_ID, RankClassificationFeatureConverter,
                                             TruncationStats)

# (inputs, choices, label); every sequence ends in EOS like the tasks' tokens.
EXAMPLES = [
    ([5, 6, 7, 1], [[8, 1], [9, 9, 1]], 1),
    ([5] * 11 + [1], [[8] * 7 + [1], [9, 1], [4, 4, 1]], 2),        # long input, long choice
    ([3, 1], [[8, 1], [9, 1], [4, 1], [6, 1], [7, 1]], 0),          # 5 choices, C = 4
]
L, T, C = 8, 5, 4


def _dataset(examples):
  def gen():
    for i, (inp, choices, label) in enumerate(examples):
      yield {"inputs": np.array(inp, np.int32), "targets": np.array(choices[label], np.int32),
             "choices": tf.ragged.constant(choices, dtype=tf.int32), "label": np.int32(label),
             "task_id": np.int32(7), "example_id": np.int32(i)}
  sig = {"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32),
         "choices": tf.RaggedTensorSpec([None, None], tf.int32, ragged_rank=1),
         "label": tf.TensorSpec([], tf.int32), "task_id": tf.TensorSpec([], tf.int32),
         "example_id": tf.TensorSpec([], tf.int32)}
  return tf.data.Dataset.from_generator(gen, output_signature=sig)


def _fit(seq, n):
  """Reference: keep the first n-1 tokens and EOS when too long, else pad with 0."""
  seq = list(seq)
  if len(seq) > n:
    seq = seq[:n - 1] + [EOS_ID]
  return seq + [0] * (n - len(seq))


def test_layout_matches_numpy_reference():
  ds = RankClassificationFeatureConverter()(_dataset(EXAMPLES), {"inputs": L, "targets": T, "num_choices": C})
  for spec in ds.element_spec.values():
    assert spec.shape.is_fully_defined()
  got = list(ds.as_numpy_iterator())
  for out, (inp, choices, label) in zip(got, EXAMPLES):
    np.testing.assert_array_equal(out["encoder_input_tokens"], _fit(inp, L))
    kept = choices[:C]
    want = [_fit(c, T) for c in kept] + [[0] * T] * (C - len(kept))
    np.testing.assert_array_equal(out["choice_tokens"], want)
    np.testing.assert_array_equal(out["choice_mask"], [1] * len(kept) + [0] * (C - len(kept)))
    assert out["label"] == label and out["task_id"] == 7
    assert out["inputs_length"] == len(inp) and out["num_choices"] == len(choices)
    np.testing.assert_array_equal(out["choice_lengths"], [len(c) for c in kept] + [0] * (C - len(kept)))
    for key in out:
      assert out[key].dtype == np.int32, key


def test_truncation_is_counted():
  ds = RankClassificationFeatureConverter()(_dataset(EXAMPLES), {"inputs": L, "targets": T, "num_choices": C})
  stats = TruncationStats(L, T, C)
  batch = next(ds.batch(3).as_numpy_iterator())
  stats.update(batch)
  assert stats.examples == 3 and stats.inputs_truncated == 1 and stats.max_inputs_length == 12
  assert stats.choices_truncated == 1 and stats.examples_with_choices_truncated == 1
  assert stats.choices_dropped == 1 and stats.examples_with_choices_dropped == 1
  assert stats.max_num_choices == 5 and stats.any_truncated
  assert "inputs cut to 8 tokens in 1 (longest 12)" in stats.report("x")
  # Padding rows (example_mask 0) are not counted.
  masked = dict(batch, example_mask=np.array([1, 0, 0], np.int32))
  only_first = TruncationStats(L, T, C)
  only_first.update(masked)
  assert only_first.examples == 1 and not only_first.any_truncated


def test_dropping_the_correct_choice_is_an_error():
  bad = [([3, 1], [[8, 1], [9, 1], [4, 1]], 2)]
  ds = RankClassificationFeatureConverter()(_dataset(bad), {"inputs": L, "targets": T, "num_choices": 2})
  with pytest.raises(tf.errors.InvalidArgumentError, match="Correct choice .label. outside the kept choices"):
    list(ds.as_numpy_iterator())


def test_lm_only_layout():
  ds = RankClassificationFeatureConverter(lm_only=True)(_dataset(EXAMPLES[:2]), {"inputs": L, "targets": T})
  out = list(ds.as_numpy_iterator())
  for o, (_, choices, label) in zip(out, EXAMPLES):
    assert o["choice_tokens"].shape == (1, T) and o["label"] == 0
    np.testing.assert_array_equal(o["choice_tokens"][0], _fit(choices[label], T))
    np.testing.assert_array_equal(o["choice_mask"], [1])


def test_bad_feature_lengths():
  conv = RankClassificationFeatureConverter()
  with pytest.raises(ValueError, match="unknown keys"):
    conv(_dataset(EXAMPLES), {"inputs": 8, "targets": 4, "num_choices": 2, "choices": 3})
  with pytest.raises(ValueError, match="num_choices"):
    conv(_dataset(EXAMPLES), {"inputs": 8, "targets": 4})
