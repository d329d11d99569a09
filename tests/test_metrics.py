"""Accuracy, median / IQR over templates x seeds, JSON and markdown output."""

import json
import math

import numpy as np
import pytest

from ia3_jax.objectives import metrics


def test_accuracy_counts_only_masked_in_rows():
  preds = np.array([0, 1, 2, 1, 0])
  labels = np.array([0, 1, 0, 0, -1])
  assert metrics.accuracy(preds, labels, [1, 1, 1, 1, 0]) == 0.5
  assert metrics.accuracy_counts(preds, labels, [1, 0, 1, 0, 0]) == (1, 2)
  assert math.isnan(metrics.accuracy(preds, labels, np.zeros(5)))
  with pytest.raises(ValueError, match="negative"):
    metrics.accuracy(preds, labels)  # the unlabelled row is counted
  with pytest.raises(ValueError, match="example_mask"):
    metrics.accuracy(preds, labels, [1, 1])
  with pytest.raises(ValueError, match="predictions"):
    metrics.accuracy(preds[:3], labels)


def test_median_and_iqr_follow_linear_interpolation():
  # 8 runs (4 templates x 2 seeds) with accuracies 0.1 .. 0.8.
  results = {f"t{i}": {0: (2 * i + 1) / 10, 42: (2 * i + 2) / 10} for i in range(4)}
  s = metrics.summarize(results)
  # Sorted values v_0..v_7 = 0.1..0.8; quantile q sits at position q * 7.
  # median: position 3.5 -> (0.4 + 0.5) / 2; q25: 1.75 -> 0.2 + 0.75 * 0.1;
  # q75: 5.25 -> 0.6 + 0.25 * 0.1.
  assert s["median"] == pytest.approx(0.45)
  assert s["q25"] == pytest.approx(0.275) and s["q75"] == pytest.approx(0.625)
  assert s["iqr"] == pytest.approx(0.35)
  assert s["mean"] == pytest.approx(0.45) and s["num_runs"] == 8 and s["num_templates"] == 4
  assert s["min"] == pytest.approx(0.1) and s["max"] == pytest.approx(0.8)
  assert s["seeds"] == [0, 42]
  t1 = s["per_template"]["t1"]
  assert t1["median"] == pytest.approx(0.35) and t1["accuracies"] == {0: 0.3, 42: 0.4}
  # per seed: seed 0 has 0.1, 0.3, 0.5, 0.7 -> median 0.4, q25 at 0.75 -> 0.25.
  assert s["per_seed"][0]["median"] == pytest.approx(0.4)
  assert s["per_seed"][0]["q25"] == pytest.approx(0.25)


def test_summarize_odd_counts_and_uneven_seeds():
  s = metrics.summarize({"a": {1: 0.5}, "b": {1: 0.9, 2: 0.7}})
  assert s["median"] == pytest.approx(0.7) and s["num_runs"] == 3
  assert s["q25"] == pytest.approx(0.6) and s["q75"] == pytest.approx(0.8)
  assert s["per_seed"][2]["num_runs"] == 1


def test_summarize_rejects_bad_input():
  with pytest.raises(ValueError, match="empty"):
    metrics.summarize({})
  with pytest.raises(ValueError, match="'b'"):
    metrics.summarize({"a": {0: 0.5}, "b": {}})
  with pytest.raises(ValueError, match="seed 3"):
    metrics.summarize({"a": {3: float("nan")}})


def test_json_round_trip(tmp_path):
  s = metrics.summarize({"t0": {np.int64(0): np.float32(0.25), 1: 0.75}})
  path = metrics.write_results_json(tmp_path / "sub" / "results.json", {"rte": s},
                                    metadata={"model": "tiny", "nan": float("nan")})
  doc = json.loads(path.read_text())
  rte = doc["results"]["rte"]
  assert rte["median"] == pytest.approx(0.5) and rte["iqr"] == pytest.approx(0.25)
  assert rte["per_template"]["t0"]["accuracies"] == {"0": 0.25, "1": 0.75}
  assert rte["seeds"] == [0, 1]
  assert doc["metadata"] == {"model": "tiny", "nan": None}
  assert "linear" in doc["quantile_method"]


def test_markdown_tables():
  rte = metrics.summarize({"t0": {0: 0.5, 1: 0.75}, "t1": {0: 0.25, 1: 1.0}})
  cb = metrics.summarize({"t0": {0: 0.875}})
  table = metrics.markdown_table({"rte": rte, "cb": cb})
  lines = table.strip().split("\n")
  assert lines[0].startswith("| Dataset | Median") and len(lines) == 4
  cells = [c.strip() for c in lines[2].strip("|").split("|")]
  # rte: values 0.25, 0.5, 0.75, 1.0 -> median 0.625, q25 0.4375, q75 0.8125.
  assert cells == ["rte", "62.5", "37.5", "43.8", "81.2", "62.5", "2", "2", "4"]
  assert lines[3].split("|")[2].strip() == "87.5"
  per_template = metrics.template_table(rte, digits=2).strip().split("\n")
  assert per_template[0] == "| Template | seed 0 | seed 1 | Median |"
  assert per_template[3] == "| t1 | 25.00 | 100.00 | 62.50 |"


def test_eval_counts_match_numpy_merge_and_sum_over_processes(monkeypatch):
  """`EvalCounts` against NumPy per template and per task; two halves merged give the whole;
  the all-reduce over two (simulated) processes holding the same counts doubles them."""
  import jax
  from jax.experimental import multihost_utils
  rng = np.random.default_rng(0)
  preds, labels = rng.integers(0, 3, (2, 40)), rng.integers(0, 3, (2, 40))
  tasks, templates = rng.integers(0, 3, (2, 40)), rng.integers(-1, 4, (2, 40))
  counted = rng.random((2, 40)) > 0.2
  halves = [metrics.EvalCounts() for _ in range(2)]
  for b, half in enumerate(halves):
    half.add(preds[b], labels[b], counted[b], tasks[b], templates[b])
    half.num_unlabelled, half.num_batches = b + 1, 1
  counts = halves[0].merge(halves[1])
  got = counts.as_dict(per_task=True)
  ok = (preds == labels) & counted
  assert (got["num_correct"], got["num_examples"]) == (ok.sum(), counted.sum())
  assert (got["num_unlabelled"], got["num_batches"]) == (3, 2)
  assert got["accuracy"] == pytest.approx(ok.sum() / counted.sum())
  for t in range(4):
    sel = counted & (templates == t)
    assert got["per_template"][t]["num_correct"] == (ok & sel).sum()
    assert got["per_template"][t]["num_examples"] == sel.sum()
  for task in range(3):
    sel = counted & (tasks == task)
    entry = got["per_task"][task]
    assert (entry["num_correct"], entry["num_examples"]) == ((ok & sel).sum(), sel.sum())
    for t, r in entry["per_template"].items():
      assert r["num_examples"] == (sel & (templates == t)).sum()
  assert "per_task" not in counts.as_dict()

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([np.asarray(x)] * 2))
  doubled = counts.summed_over_processes()
  assert doubled.groups == {k: [2 * c, 2 * n] for k, (c, n) in counts.groups.items()}
  assert (doubled.num_unlabelled, doubled.num_batches) == (6, 2)  # batches: this process's
