"""RAFT leaderboard files (ia3_jax.tasks.raft_submission): one infer run over the 11 test
sets (CSV stand-ins of the RAFT data) -> one `ID,Label` CSV per task, every test ID once in
file order, labels from the task's label set; bad predictions are one-line errors."""

import csv
import dataclasses
import json

import numpy as np
import pytest

from ia3_jax.train.assembly import ModelSpec
from ia3_jax import cli, data, runs, tasks
from ia3_jax.data import batches
from ia3_jax.errors import DataError
from ia3_jax.model import config
from ia3_jax.model import params as params_lib
from ia3_jax.peft import ia3
from ia3_jax.tasks import raft, raft_submission
from tests.data_fixtures import vocabulary

TEST_ROWS = 5
FIRST_ID = 50  # RAFT numbers its test rows after the 50 training rows


@pytest.fixture(scope="module")
def raft_dir(tmp_path_factory):
  """RAFT CSV stand-ins (train: 50 labelled rows, test: 5 unlabelled ones with IDs 50..54),
  registered as the built-in RAFT tasks."""
  root = tmp_path_factory.mktemp("raft") / "data"
  rng = np.random.default_rng(0)
  for task, (fields, labels) in raft.RAFT_TASKS.items():
    (root / task).mkdir(parents=True)
    for split, n, first in (("train.csv", 50, 0), ("test_unlabeled.csv", TEST_ROWS, FIRST_ID)):
      with open(root / task / split, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(fields) + ["ID", "Label"])
        for i in range(n):
          label = int(rng.integers(1, len(labels) + 1)) if split == "train.csv" else 0
          w.writerow([f"{field} text {i}" for field in fields] + [first + i, label])
  data.clear_cache()
  tasks.register_all(vocabulary(), raft_dir=str(root), groups=("raft",))
  yield str(root)
  data.clear_cache()


def _read(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


def test_one_infer_run_over_raft_eval_gives_a_submission_file_per_task(raft_dir, tmp_path):
  cfg = dataclasses.replace(config.get_config("tiny"), vocab_size=320)  # >= the 300 pieces
  lengths = {"inputs": 128, "targets": 16, "num_choices": 77}
  source = batches.SeqioBatches(tasks.RAFT_EVAL_MIXTURE, lengths, shuffle=False, repeat=False)
  out = runs.infer(output_dir=str(tmp_path / "run"), model=ModelSpec(cfg, peft=ia3.IA3Config()),
                   data=source, batch_size=8, checkpoint_path=None, seed=0)
  assert out["num_examples"] == 11 * TEST_ROWS
  assert cli.main(["raft-submission", "--predictions", out["path"],
                   "--out", str(tmp_path / "submission"), "--raft_dir", raft_dir]) == 0
  rows = [json.loads(line) for line in open(out["path"])]
  for task, (_, labels) in raft.RAFT_TASKS.items():
    table = _read(tmp_path / "submission" / task / "predictions.csv")
    assert table[0] == ["ID", "Label"]
    assert [r[0] for r in table[1:]] == [str(FIRST_ID + i) for i in range(TEST_ROWS)]
    assert all(r[1] in labels for r in table[1:])
    # Each row is that example's prediction, by its label index.
    tid = tasks.BUILTIN_TASK_IDS[f"raft_{task}"]
    preds = {r["example_id"]: r["prediction"] for r in rows if r["task_id"] == tid}
    assert [r[1] for r in table[1:]] == [labels[preds[i]] for i in range(TEST_ROWS)]


def test_infer_with_one_adapter_per_task_writes_rows_the_submission_reads_by_task(
    raft_dir, tmp_path):
  """ADAPTERS (one random (IA)^3 adapter per RAFT task): the rows' task_id are bank rows
  (0..10, the built-in ids of the T0 tasks), so the submission must follow each row's task."""
  cfg = dataclasses.replace(config.get_config("tiny"), vocab_size=320)
  lengths = {"inputs": 128, "targets": 16, "num_choices": 77}
  source = batches.SeqioBatches(tasks.RAFT_EVAL_MIXTURE, lengths, shuffle=False, repeat=False)
  rng = np.random.default_rng(1)
  like = params_lib.flatten(ia3.init_ia3(cfg))
  adapters = {key: params_lib.unflatten({p: rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
                                         for p, v in like.items()})
              for key in tasks.RAFT_KEYS}
  out = runs.infer(output_dir=str(tmp_path / "run"), model=ModelSpec(cfg), data=source,
                   batch_size=8, checkpoint_path=None, seed=0, adapters=adapters)
  rows = [json.loads(line) for line in open(out["path"])]
  assert len(rows) == 11 * TEST_ROWS and {r["task"] for r in rows} == set(tasks.RAFT_KEYS)
  assert {r["task_id"] for r in rows} == set(range(11))  # bank rows, not the RAFT ids
  assert cli.main(["raft-submission", "--predictions", out["path"],
                   "--out", str(tmp_path / "submission"), "--raft_dir", raft_dir]) == 0
  for task, (_, labels) in raft.RAFT_TASKS.items():
    table = _read(tmp_path / "submission" / task / "predictions.csv")
    preds = {r["example_id"]: r["prediction"] for r in rows if r["task"] == f"raft_{task}"}
    assert [r[0] for r in table[1:]] == [str(FIRST_ID + i) for i in range(TEST_ROWS)]
    assert [r[1] for r in table[1:]] == [labels[preds[i]] for i in range(TEST_ROWS)]


def test_task_field_wins_over_task_id_and_may_be_the_bare_name(raft_dir, tmp_path):
  rows = ([dict(r, task="raft_overruling", task_id=0) for r in _rows("overruling")]
          + [dict(r, task="tweet_eval_hate", task_id=3)
             for r in _rows("ade_corpus_v2", prediction=0)])
  written = raft_submission.write_submission(rows, tmp_path, raft_dir)
  assert sorted(written) == ["overruling", "tweet_eval_hate"]
  assert _read(written["tweet_eval_hate"])[1] == ["50", "hate speech"]


def _rows(task="overruling", n=TEST_ROWS, prediction=1):
  tid = tasks.BUILTIN_TASK_IDS[f"raft_{task}"]
  return [{"task_id": tid, "example_id": i, "template_id": 0, "prediction": prediction}
          for i in range(n)]


def test_labels_are_spelled_as_the_benchmark_does(raft_dir, tmp_path):
  written = raft_submission.write_submission(_rows("overruling") + _rows("banking_77", prediction=76),
                                             tmp_path, raft_dir)
  assert sorted(written) == ["banking_77", "overruling"]
  assert _read(written["overruling"])[1] == ["50", "overruling"]
  assert _read(written["banking_77"])[1] == ["50", "wrong_exchange_rate_for_cash_withdrawal"]


@pytest.mark.parametrize("rows, message", [
    (_rows(n=3), r"raft overruling: 2 of 5 test rows have no prediction \(IDs 53, 54\)"),
    (_rows(prediction=2), r"row 6: prediction 2 is not a label index of raft overruling \(0..1\)"),
    (_rows() + [dict(_rows()[0], prediction=0)],
     r"row 11: raft overruling example 0 was predicted twice, as 'overruling' and 'not overruling'"),
    (_rows() + [dict(_rows()[0], example_id=7)], r"predictions for examples \[7\] beyond its 5"),
    ([dict(_rows()[0], task_id=0)], r"row 6: task_id 0 is not a RAFT task"),
    ([dict(_rows()[0], task="rte")], r"row 6: task 'rte' is not a RAFT task"),
    ([{"example_id": 0, "prediction": 0}], r"row 6: no task or task_id field"),
    ([], r"no predictions"),
])
def test_bad_predictions_are_errors_and_nothing_is_written(raft_dir, tmp_path, rows, message):
  good = _rows("ade_corpus_v2")  # rows 1-5: valid, but not written either: all is checked first
  with pytest.raises(DataError, match=message):
    raft_submission.write_submission(good + rows if rows else rows, tmp_path / "out", raft_dir)
  assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line_naming_the_file(raft_dir, tmp_path, capsys):
  bad = tmp_path / "predictions.jsonl"
  bad.write_text(json.dumps(_rows()[0]) + "\n{oops\n")
  assert cli.main(["raft-submission", "--predictions", str(bad), "--out", str(tmp_path / "o"),
                   "--raft_dir", raft_dir]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and f"{bad}, line 2: not valid JSON" in err


def test_readme_command_as_written(raft_dir, tmp_path, monkeypatch):
  from tests.test_readme import readme_block
  (tmp_path / "runs" / "raft").mkdir(parents=True)
  (tmp_path / "runs" / "raft" / "predictions.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in _rows() + _rows("tweet_eval_hate", prediction=0)))
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("IA3_JAX_RAFT_DIR", raft_dir)
  (command,) = readme_block("raft-submission").strip().splitlines()
  assert command.startswith("ia3-jax raft-submission ")
  assert cli.main(command.split()[1:]) == 0
  table = _read(tmp_path / "my-raft-submissions" / "data" / "tweet_eval_hate" / "predictions.csv")
  assert table == [["ID", "Label"]] + [[str(FIRST_ID + i), "hate speech"] for i in range(TEST_ROWS)]
