"""The batch layout (ia3_jax.data.features): what the converter and get_batches produce, choice checks."""

import numpy as np

from ia3_jax import data
from ia3_jax.data import features
from ia3_jax.data.feature_converters import RankClassificationFeatureConverter
from tests.data_fixtures import vocabulary

TEMPLATES = """\
dataset: layout_probe
templates:
  - name: plain
    jinja: "{{text}} ||| {{answer_choices[label]}}"
    answer_choices: "no ||| yes ||| maybe"
"""


def test_get_batches_yields_exactly_the_declared_features_with_their_shapes(tmp_path):
  (tmp_path / "t.yaml").write_text(TEMPLATES)
  rows = [{"text": f"example number {i}", "label": i % 3} for i in range(5)]
  data.register_task("layout_probe", {"train": rows, "validation": rows}, tmp_path / "t.yaml",
                     vocabulary=vocabulary(), replace=True)
  lengths = {"inputs": 12, "targets": 4, "num_choices": 3}
  batch = next(iter(data.get_batches("layout_probe_eval", "validation", 4, lengths)))
  assert set(batch) == set(features.BATCH_FEATURES)
  dims = {"L": 12, "T": 4, "C": 3}
  for name, spec in features.BATCH_FEATURES.items():
    assert batch[name].shape == (4, *(dims[d] for d in spec.dims)), name
    assert batch[name].dtype == np.int32, name
  converter = RankClassificationFeatureConverter()
  assert tuple(converter.MODEL_FEATURES) == features.CONVERTED_FEATURES
  empty = features.empty_batch(dims)
  assert {k: v.shape[1:] for k, v in empty.items()} == {
      k: batch[k].shape[1:] for k in features.CONVERTED_FEATURES}
  assert set(features.MODEL_FEATURES) | set(features.TRAIN_FEATURES) <= set(batch)


def test_identical_choices_against_a_pairwise_loop():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 3, size=(64, 4, 2))
  mask = rng.integers(0, 2, size=(64, 4))
  expected = [any(mask[b, i] and mask[b, j] and (tokens[b, i] == tokens[b, j]).all()
                  for i in range(4) for j in range(4) if i != j) for b in range(64)]
  got = features.identical_choices(tokens, mask)
  assert got.tolist() == expected and 0 < sum(expected) < 64
