"""Few-shot sampling: deterministic across processes and runs, seed-dependent, no repeats."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ia3_jax.data import fewshot
from ia3_jax.data.templates import DataError

CASES = [(277, 32), (1000, 50), (70, 70), (39905, 20), (5, 3)]

_CHILD = """
import json, sys
from ia3_jax.data import fewshot
cases = json.loads(sys.argv[1])
print(json.dumps([[fewshot.sample_indices(n, k, s).tolist() for n, k in cases] for s in fewshot.TFEW_SEEDS]))
"""


def _in_child() -> list:
  out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(CASES)], check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out)


def test_identical_across_processes_and_runs():
  here = [[fewshot.sample_indices(n, k, s).tolist() for n, k in CASES] for s in fewshot.TFEW_SEEDS]
  first, second = _in_child(), _in_child()  # two processes, i.e. two runs
  assert first == here and second == here


def test_differs_across_seeds_and_never_repeats():
  for n, k in CASES:
    samples = [tuple(fewshot.sample_indices(n, k, s)) for s in fewshot.TFEW_SEEDS]
    if k < n:
      assert len(set(samples)) == len(samples), (n, k)
    for sample in samples:
      assert len(sample) == k and len(set(sample)) == k and all(0 <= i < n for i in sample)
  assert sorted(fewshot.sample_indices(70, None, 1)) == list(range(70))  # all, permuted


def test_matches_t_few_style_reference():
  # T-Few: np.random.seed(seed); np.random.shuffle(examples); examples[:k]
  for seed in fewshot.TFEW_SEEDS:
    examples = [f"ex{i}" for i in range(300)]
    np.random.seed(seed)
    reference = list(examples)
    np.random.shuffle(reference)
    assert fewshot.sample(examples, 32, seed) == reference[:32]


def test_too_few_examples_is_an_error():
  with pytest.raises(DataError, match="my.jsonl: asked for 32 few-shot examples but it has only 10"):
    fewshot.sample(list(range(10)), 32, 0, what="my.jsonl")
  with pytest.raises(ValueError, match="seed"):
    fewshot.sample_indices(10, 2, -1)


def test_t_few_sizes_and_splits():
  sizes = {k: v.num_shots for k, v in fewshot.TFEW_SETUPS.items()}
  assert sizes == {"rte": 32, "cb": 32, "anli_r1": 50, "anli_r2": 50, "anli_r3": 50, "copa": 32,
                   "hellaswag": 20, "story_cloze": 70, "winogrande": 50, "wsc": 32, "wic": 32}
  assert fewshot.TFEW_SEEDS == (0, 1, 32, 42, 1024)
  assert fewshot.TFEW_SETUPS["story_cloze"].train_split == "validation"
  assert fewshot.TFEW_SETUPS["story_cloze"].eval_split == "test"
  assert {fewshot.TFEW_SETUPS[f"anli_r{i}"].eval_split for i in (1, 2, 3)} == {"test"}
  assert fewshot.TFEW_SETUPS["winogrande"].train_split == "train_xl"
  assert fewshot.TFEW_SETUPS["rte"].eval_split == "validation"
