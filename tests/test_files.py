"""Atomic writes and JSON sanitising (ia3_jax.files)."""

import json

import numpy as np
import pytest

from ia3_jax import files


def test_write_json_sanitises_numpy_and_non_finite(tmp_path):
  path = files.write_json(tmp_path / "sub" / "r.json",
                          {1: np.float32(0.5), "a": np.arange(3), "nan": float("nan"),
                           "inf": np.float64("inf"), "t": (np.int64(2), 3)})
  assert json.loads(path.read_text()) == {"1": 0.5, "a": [0, 1, 2], "nan": None, "inf": None,
                                          "t": [2, 3]}
  assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path):
  path = tmp_path / "r.json"
  files.write_json(path, {"old": 1})
  with pytest.raises(RuntimeError):
    with files.atomic_open(path) as f:
      f.write('{"new": ')
      raise RuntimeError("interrupted mid-write")
  assert json.loads(path.read_text()) == {"old": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_unserialisable_object_leaves_nothing(tmp_path):
  with pytest.raises(TypeError):
    files.write_json(tmp_path / "r.json", {"x": object()})
  assert list(tmp_path.iterdir()) == []
