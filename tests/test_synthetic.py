"""The synthetic demo suite: determinism, disjoint splits, correct labels, templates, vocabulary."""

import json
import os

import numpy as np
import pytest

from ia3_jax.data import synthetic
from ia3_jax.data.templates import load_templates

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "ia3_jax", "tasks", "demo",
                            "templates")
SIZES = {"validation": 150, "train": 300}
ANTONYMS_OF = {}
for _a, _b in synthetic.ANTONYMS:
  ANTONYMS_OF.setdefault(_a, set()).add(_b)
  ANTONYMS_OF.setdefault(_b, set()).add(_a)


@pytest.fixture(scope="module")
def splits():
  return {f: synthetic.generate_splits(f, SIZES) for f in synthetic.FAMILIES}


def _key(example):
  return json.dumps(example, sort_keys=True)


def test_families_roles():
  assert len(synthetic.TRAINING_FAMILIES) >= 4
  assert 2 <= len(synthetic.HELD_OUT_FAMILIES) <= 3
  assert not set(synthetic.TRAINING_FAMILIES) & set(synthetic.HELD_OUT_FAMILIES)


def test_deterministic_and_seeded(splits):
  again = synthetic.generate_splits("recommend", SIZES)
  assert again == splits["recommend"]
  other = synthetic.generate_splits("recommend", SIZES, seed=1)
  assert other["train"] != splits["recommend"]["train"]


def test_splits_disjoint_and_eval_unique(splits):
  for family, by_split in splits.items():
    val = [_key(e) for e in by_split["validation"]]
    train = {_key(e) for e in by_split["train"]}
    assert len(set(val)) == len(val), family
    assert not set(val) & train, family
    assert [len(v) for v in by_split.values()] == list(SIZES.values())


def test_too_small_family_raises():
  # compare has 21 * 20 = 420 distinct examples.
  with pytest.raises(ValueError, match="compare"):
    synthetic.generate_splits("compare", {"validation": 500})
  with pytest.raises(KeyError, match="families"):
    synthetic.generate_splits("nope", {"train": 1})


def test_labels_are_right(splits):
  for e in splits["compare"]["train"]:
    a, b = synthetic.NUMBER_WORDS.index(e["first"]), synthetic.NUMBER_WORDS.index(e["second"])
    assert e["label"] == (0 if a > b else 1)
  for e in splits["membership"]["train"]:
    assert e["label"] == (0 if synthetic.category_of(e["word"]) == e["category"] else 1)
  for family, category in (("edible", "food"), ("alive", "animal")):
    for e in splits[family]["train"]:
      assert e["label"] == (0 if synthetic.category_of(e["word"]) == category else 1)
      assert e["name"] in synthetic.NAMES
  for e in splits["topic"]["train"]:
    assert synthetic.CATEGORIES[e["label"]] == synthetic.category_of(e["word"])
    assert e["word"] in e["sentence"]
  for e in splits["antonym"]["train"]:
    assert e["options"][e["label"]] in ANTONYMS_OF[e["word"]]
    others = [w for i, w in enumerate(e["options"]) if i != e["label"]]
    assert not set(others) & ANTONYMS_OF[e["word"]] and len(set(e["options"])) == 3
  for family, positive_label in (("sentiment", 1), ("recommend", 0)):
    for e in splits[family]["train"]:
      words = set(e["review"].replace(".", "").replace(",", "").split())
      positive = bool(words & set(synthetic.POSITIVE_ADJECTIVES))
      negative = bool(words & set(synthetic.NEGATIVE_ADJECTIVES))
      assert positive != negative, e
      assert (e["label"] == positive_label) == positive


def test_labels_roughly_balanced(splits):
  for family, by_split in splits.items():
    counts = np.bincount([e["label"] for e in by_split["train"]],
                         minlength=synthetic.FAMILIES[family].num_choices)
    assert counts.min() > 0.5 * counts.mean(), (family, counts)


def test_every_template_renders(splits):
  for family, f in synthetic.FAMILIES.items():
    templates = load_templates(os.path.join(TEMPLATE_DIR, f"{family}.yaml"))
    assert len(templates) >= 3, family
    for e in splits[family]["validation"][:40]:
      for t in templates:
        r = t.render(e, where=family)
        assert len(r.choices) == f.num_choices, (family, t.name)
        assert r.label == e["label"] and r.target == r.choices[e["label"]]
        assert len(set(r.choices)) == len(r.choices)


def test_sentencepiece_ids(tmp_path):
  lines = synthetic.corpus(TEMPLATE_DIR, num_per_family=60)
  path = synthetic.train_sentencepiece(lines, str(tmp_path / "sp"), vocab_size=200)
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=path)
  assert (sp.get_piece_size(), sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (200, 0, 1, 2, -1)
  assert sp.decode(sp.encode(lines[0])) == lines[0]
  again = synthetic.train_sentencepiece(lines, str(tmp_path / "sp2"), vocab_size=200)
  assert open(path, "rb").read() == open(again, "rb").read()
