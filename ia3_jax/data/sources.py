"""Example sources: TFDS builders, JSONL and CSV files, in-memory lists.

A source returns the examples of a split as `Record`s, in a fixed order (the
order few-shot sampling indexes into), each knowing where it came from (file
and line, or dataset, split and index) so errors can say so. TensorFlow and
TFDS are imported only when a TFDS source is read.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence

import numpy as np

from ia3_jax import runtime
from ia3_jax.data.templates import DataError

Fields = dict[str, Any]
Adapter = Callable[[Fields], Fields]


@dataclasses.dataclass(frozen=True)
class Record:
  """One example: its fields, its position in the split and where it came from."""
  fields: Fields
  index: int
  where: str


class Source:
  """Base class: `load(split)` returns the split's records in a fixed order."""

  name: str = "source"

  @property
  def splits(self) -> tuple[str, ...]:
    raise NotImplementedError

  def load(self, split: str) -> list[Record]:
    return list(self.iterate(split))

  def iterate(self, split: str) -> Iterator[Record]:
    raise NotImplementedError

  def _check_split(self, split: str) -> None:
    if split not in self.splits:
      raise DataError(f"{self.name}: unknown split {split!r}; splits: {list(self.splits)}")


class InMemorySource(Source):
  """Examples given as Python lists of dicts, one list per split."""

  def __init__(self, name: str, splits: Mapping[str, Sequence[Mapping[str, Any]]]):
    self.name = name
    self._data = {s: list(v) for s, v in splits.items()}
    for split, rows in self._data.items():
      for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
          raise DataError(f"{name}: split {split!r}, example {i}: expected a dict, got {type(row).__name__}")

  @property
  def splits(self):
    return tuple(self._data)

  def iterate(self, split):
    self._check_split(split)
    for i, row in enumerate(self._data[split]):
      yield Record(dict(row), i, f"{self.name}: split {split!r}, example {i}")


class _FileSource(Source):
  """Files, one per split."""

  def __init__(self, files: Mapping[str, str | os.PathLike], name: str | None = None,
               adapter: Adapter | None = None):
    if not files:
      raise ValueError("a file source needs at least one split file")
    self._files = {s: os.fspath(p) for s, p in files.items()}
    self.name = name or ", ".join(self._files.values())
    self._adapter = adapter

  @property
  def splits(self):
    return tuple(self._files)

  def path(self, split: str) -> str:
    self._check_split(split)
    return self._files[split]

  def _open(self, split: str):
    path = self.path(split)
    try:
      return open(path, "rb")
    except OSError as e:
      raise DataError(f"{path}: cannot read split {split!r} of {self.name}: {e.strerror}") from None

  def _adapt(self, fields: Fields, where: str) -> Fields:
    if self._adapter is None:
      return fields
    try:
      return self._adapter(fields)
    except DataError:
      raise
    except (KeyError, ValueError, TypeError, IndexError) as e:
      raise DataError(f"{where}: {type(e).__name__}: {e}") from None


class JsonlSource(_FileSource):
  """JSON Lines files: one JSON object per line; blank lines are skipped."""

  def iterate(self, split):
    path = self.path(split)
    with self._open(split) as f:
      index = 0
      for lineno, line in enumerate(text_lines(f, path), start=1):
        if not line.strip():
          continue
        where = f"{path}, line {lineno}"
        yield Record(self._adapt(json_object(line, where), where), index, where)
        index += 1


class CsvSource(_FileSource):
  """CSV files with a header row; values are strings unless `converters` say otherwise."""

  def __init__(self, files, name=None, adapter=None, *, delimiter: str = ",",
               converters: Mapping[str, Callable[[str], Any]] | None = None):
    super().__init__(files, name, adapter)
    self._delimiter = delimiter
    self._converters = dict(converters or {})

  def iterate(self, split):
    path = self.path(split)
    with self._open(split) as f:
      reader = csv.DictReader(text_lines(f, path), delimiter=self._delimiter)
      header = reader.fieldnames or []
      if not header:
        raise DataError(f"{path}, line 1: missing CSV header row")
      for field in self._converters:
        if field not in header:
          raise DataError(f"{path}, line 1: missing field {field!r} in the CSV header {header}")
      start = 2
      for index, row in enumerate(reader):
        where = f"{path}, line {start}"
        start = reader.line_num + 1
        if None in row:
          raise DataError(f"{where}: more values than the {len(header)} header fields")
        if any(v is None for v in row.values()):
          missing = [k for k, v in row.items() if v is None]
          raise DataError(f"{where}: missing field(s) {missing} (fewer values than header fields)")
        for field, convert in self._converters.items():
          try:
            row[field] = convert(row[field])
          except (ValueError, TypeError) as e:
            raise DataError(f"{where}: field {field!r} = {row[field]!r}: {e}") from None
        yield Record(self._adapt(dict(row), where), index, where)


def text_lines(f: BinaryIO, path: str | os.PathLike) -> Iterator[str]:
  """The lines of a binary file as UTF-8 text (a leading byte-order mark dropped); a byte
  sequence that is not UTF-8 is a `DataError` naming the file, line and column."""
  for lineno, raw in enumerate(f, start=1):
    try:
      yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
      column = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
      raise DataError(f"{path}, line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                      f"column {column}); save the file as UTF-8") from None


def json_object(line: str, where: str) -> dict:
  """One JSON Lines row, which must be an object; errors name `where`, the 1-based column
  and the text there."""
  line = line.rstrip("\r\n")
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    near = line[e.pos:e.pos + 20].rstrip("\r\n")
    msg = e.msg[:-len(" at")] if e.msg.endswith(" at") else e.msg
    raise DataError(f"{where}: not valid JSON ({msg} at column {e.pos + 1}"
                    f"{f', at {near!r}' if near else ', at the end of the line'})") from None
  if not isinstance(row, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
  return row


def _to_python(value: Any) -> Any:
  """numpy/bytes values from TFDS to plain Python (str, int, float, lists)."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_to_python(v) for v in value.tolist()] if value.ndim else _to_python(value.item())
  if isinstance(value, np.generic):
    return _to_python(value.item())
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_to_python(v) for v in value]
  return value


# Files a TFDS builder with manual download needs, when we know them.
_MANUAL_FILES = {
    "story_cloze/2016": ("cloze_test_val__spring2016.csv", "cloze_test_test__spring2016.csv"),
    "story_cloze/2018": ("cloze_test_val__winter2018.csv", "cloze_test_test__winter2018.csv"),
}


class TfdsSource(Source):
  """A TFDS builder, read in file order, with fields renamed by `adapter`.

  If the dataset is not prepared in `data_dir` it is downloaded and prepared
  (unless `download=False`). Builders that need a manual download (StoryCloze)
  read from `manual_dir` (else $IA3_JAX_TFDS_MANUAL_DIR, else
  `<data_dir>/downloads/manual`); when that is
  missing the error says which files to put where.
  """

  def __init__(self, tfds_name: str, splits: Sequence[str], *, name: str | None = None,
               adapter: Adapter | None = None, data_dir: str | None = None,
               manual_dir: str | None = None, download: bool = True):
    self.tfds_name = tfds_name
    self.name = name or f"tfds {tfds_name}"
    self._splits = tuple(splits)
    self._adapter = adapter
    self.data_dir = data_dir
    self.manual_dir = manual_dir
    self.download = download

  @property
  def splits(self):
    return self._splits

  def _builder(self):
    runtime.import_tf()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      builder = tfds.builder(self.tfds_name, data_dir=self.data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
      raise DataError(f"{self.name}: cannot build TFDS dataset {self.tfds_name!r}: {e}") from None
    if not builder.is_prepared():
      config = None
      if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual = self._check_manual_dir(builder)
        config = tfds.download.DownloadConfig(manual_dir=manual)
      if self.download:
        builder.download_and_prepare(download_config=config)
      else:
        raise DataError(f"{self.name}: TFDS dataset {self.tfds_name!r} is not prepared in "
                        f"{builder.data_dir} and download=False")
    return builder

  def _check_manual_dir(self, builder) -> str:
    root = self.data_dir or os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir)))
    manual = (self.manual_dir or os.environ.get("IA3_JAX_TFDS_MANUAL_DIR")
              or os.path.join(root, "downloads", "manual"))
    needed = _MANUAL_FILES.get(self.tfds_name, ())
    missing = [f for f in needed if not os.path.isfile(os.path.join(manual, f))]
    if not os.path.isdir(manual) or missing or not os.listdir(manual):
      files = f" It must contain {list(needed)}; missing: {missing or list(needed)}." if needed else ""
      raise DataError(
          f"{self.name}: TFDS dataset {self.tfds_name!r} needs a manual download; manual "
          f"directory {manual!r} is missing or incomplete.{files} Pass manual_dir= (or set "
          f"IA3_JAX_TFDS_MANUAL_DIR). TFDS says:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    return manual

  def iterate(self, split):
    self._check_split(split)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = self._builder()
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(interleave_cycle_length=1))
    options = runtime.import_tf().data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    for index, example in enumerate(tfds.as_numpy(ds)):
      where = f"{self.name}: split {split!r}, example {index}"
      fields = _to_python(example)
      if self._adapter is not None:
        try:
          fields = self._adapter(fields)
        except DataError:
          raise
        except (KeyError, ValueError, TypeError, IndexError) as e:
          raise DataError(f"{where}: {type(e).__name__}: {e}") from None
      yield Record(fields, index, where)
