"""Shared helpers for the data-layer tests: a small SentencePiece vocabulary and
spec-driven TFDS mock data that respects each dataset's constraints."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np

_WORDS = ("the a an of to in is was that it for on with as by at from this be are or not have "
          "premise hypothesis question answer yes no maybe true false because so sentence story "
          "label choice option movie review news article summary tweet paper title drug effect "
          "what which does mean same blank word refer pronoun continue next ending negative positive neutral "
          "good bad great awful fine plot actor did like reviewer sentiment").split()


@functools.lru_cache(maxsize=None)
def spm_model_path() -> str:
  """Trains a ~300-piece SentencePiece model (T5 ids: pad 0, eos 1, unk 2) once per process."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(_WORDS, size=12)) for _ in range(400)]
  lines += ["abcdefghij " * 3, "Yes No Maybe True False Always Never Sometimes", '"_ ___ ? : . , ( ) -']
  workdir = tempfile.mkdtemp(prefix="ia3_spm_")
  corpus = os.path.join(workdir, "corpus.txt")
  with open(corpus, "w") as f:
    f.write("\n".join(lines))
  prefix = os.path.join(workdir, "spm")
  spm.SentencePieceTrainer.train(
      input=corpus, model_prefix=prefix, vocab_size=300, model_type="unigram",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      hard_vocab_limit=False, minloglevel=2)
  return prefix + ".model"


@functools.lru_cache(maxsize=None)
def vocabulary():
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.SentencePieceVocabulary(spm_model_path())


# Per-builder constraints the spec alone does not say: sequence lengths and label ranges.
MOCK_CONSTRAINTS = {
    "hellaswag": {"endings": 4, "label": (0, 4)},
    "story_cloze": {"endings": 2, "label": (1, 3)},
}


def _random_text(rng) -> str:
  return " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 12))))


def valid_mock_as_dataset(num_examples):
  """An `as_dataset_fn` for tfds.testing.mock_data: random examples from the builder's
  feature spec, with `MOCK_CONSTRAINTS` applied (e.g. HellaSwag has 4 endings).

  `num_examples` is an int or a function (builder name, split) -> int.
  """
  count = num_examples if callable(num_examples) else (lambda name, split: num_examples)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def as_dataset(self, split, *args, **kwargs):
    del args, kwargs
    rules = MOCK_CONSTRAINTS.get(self.name, {})
    features = self.info.features
    seed = sum(map(ord, f"{self.name}/{split}"))

    def gen():
      rng = np.random.default_rng(seed)
      for _ in range(count(self.name, split)):
        ex = {}
        for key, feature in features.items():
          if isinstance(feature, tfds.features.ClassLabel):
            ex[key] = int(rng.integers(0, feature.num_classes))
          elif isinstance(feature, tfds.features.Text):
            ex[key] = _random_text(rng)
          elif isinstance(feature, tfds.features.Sequence):
            n = rules.get(key, int(rng.integers(1, 5)))
            ex[key] = [_random_text(rng) for _ in range(n)]
          elif key in rules:
            lo, hi = rules[key]
            ex[key] = int(rng.integers(lo, hi))
          else:
            ex[key] = int(rng.integers(0, 20))
        yield ex

    signature = {}
    for key, feature in features.items():
      if isinstance(feature, tfds.features.Text):
        signature[key] = tf.TensorSpec([], tf.string)
      elif isinstance(feature, tfds.features.Sequence):
        signature[key] = tf.TensorSpec([None], tf.string)
      else:
        signature[key] = tf.TensorSpec([], feature.dtype)
    return tf.data.Dataset.from_generator(gen, output_signature=signature)

  return as_dataset
