"""Sources: JSONL, CSV, in-memory lists and TFDS (mock data), with errors naming file and line."""

import os

import pytest
import tensorflow_datasets as tfds

from ia3_jax.data import sources
from ia3_jax.data.templates import DataError


def test_jsonl_reads_in_order_and_skips_blank_lines(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n')
  src = sources.JsonlSource({"train": path})
  records = src.load("train")
  assert [r.fields for r in records] == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
  assert [r.index for r in records] == [0, 1]
  assert records[1].where == f"{path}, line 3"


def test_jsonl_errors_name_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "a"}\n{"text": "b",\n')
  with pytest.raises(DataError, match=rf"{path}, line 2: not valid JSON"):
    sources.JsonlSource({"train": path}).load("train")
  path.write_text('{"text": "a"}\n[1, 2]\n')
  with pytest.raises(DataError, match=rf"{path}, line 2: expected a JSON object, got list"):
    sources.JsonlSource({"train": path}).load("train")
  with pytest.raises(DataError, match="cannot read split 'train'"):
    sources.JsonlSource({"train": tmp_path / "nope.jsonl"}).load("train")
  with pytest.raises(DataError, match="unknown split 'test'"):
    sources.JsonlSource({"train": path}).load("test")


def test_csv_with_converters_and_errors(tmp_path):
  path = tmp_path / "d.csv"
  path.write_text('text,label\n"hello, world",1\n"multi\nline",0\n')
  records = sources.CsvSource({"train": path}, converters={"label": int}).load("train")
  assert [r.fields for r in records] == [{"text": "hello, world", "label": 1},
                                        {"text": "multi\nline", "label": 0}]
  assert records[1].where == f"{path}, line 3"
  path.write_text("text,label\na,1\nb,x\n")
  with pytest.raises(DataError, match=rf"{path}, line 3: field 'label' = 'x'"):
    sources.CsvSource({"train": path}, converters={"label": int}).load("train")
  path.write_text("text,label\na,1\nb\n")
  with pytest.raises(DataError, match=rf"{path}, line 3: missing field\(s\) \['label'\]"):
    sources.CsvSource({"train": path}).load("train")
  with pytest.raises(DataError, match=rf"{path}, line 1: missing field 'gold'"):
    sources.CsvSource({"train": path}, converters={"gold": int}).load("train")


def test_in_memory_source():
  src = sources.InMemorySource("mine", {"train": [{"x": 1}, {"x": 2}]})
  assert [r.fields["x"] for r in src.load("train")] == [1, 2]
  assert src.load("train")[1].where == "mine: split 'train', example 1"
  with pytest.raises(DataError, match="example 0: expected a dict"):
    sources.InMemorySource("mine", {"train": ["x"]})


def test_tfds_source_under_mock_data():
  rename = lambda ex: dict(ex, premise=ex["context"])
  src = sources.TfdsSource("anli/r1", ("train", "test"), adapter=rename)
  with tfds.testing.mock_data(num_examples=6):
    records = src.load("test")
  assert len(records) == 6
  fields = records[0].fields
  assert isinstance(fields["premise"], str) and fields["premise"] == fields["context"]
  assert isinstance(fields["label"], int) and 0 <= fields["label"] < 3
  assert records[5].where == "tfds anli/r1: split 'test', example 5"


def test_story_cloze_manual_dir_missing_says_so(tmp_path, monkeypatch):
  monkeypatch.delenv("IA3_JAX_TFDS_MANUAL_DIR", raising=False)
  src = sources.TfdsSource("story_cloze/2016", ("validation", "test"), data_dir=str(tmp_path))
  with pytest.raises(DataError) as e:
    src.load("test")
  msg = str(e.value)
  assert "needs a manual download" in msg
  assert os.path.join(str(tmp_path), "downloads", "manual") in msg
  assert "cloze_test_val__spring2016.csv" in msg and "rocstories" in msg
  # With the files in place the check passes (TFDS itself is mocked here).
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in ("cloze_test_val__spring2016.csv", "cloze_test_test__spring2016.csv"):
    (manual / name).write_text("InputStoryid\n")
  monkeypatch.setenv("IA3_JAX_TFDS_MANUAL_DIR", str(manual))
  with tfds.testing.mock_data(num_examples=2):
    assert len(sources.TfdsSource("story_cloze/2016", ("validation", "test"),
                                  data_dir=str(tmp_path)).load("test")) == 2
