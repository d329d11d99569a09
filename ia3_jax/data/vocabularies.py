"""The vocabulary of tasks registered without one: the run's model's own, resolved late.

A task tokenizes with its model's SentencePiece (or HF tokenizer.json) vocabulary, never a
download: `set_default_vocabulary`'s, else $IA3_JAX_SPM_PATH, else the gin run's
INITIAL_CHECKPOINT_PATH (`ModelVocabulary` looks it up when a task first tokenizes, so
tasks can be registered before the run names its model).
"""

from __future__ import annotations

import functools
import os
import sys

from ia3_jax import runtime

tf = runtime.import_tf()  # quietly, before seqio imports it
import seqio  # pylint: disable=g-import-not-at-top

from ia3_jax.errors import ConfigError

_DEFAULT_VOCAB: seqio.Vocabulary | None = None
SPM_PATH_ENV = "IA3_JAX_SPM_PATH"
RUN_MODEL_MACRO = "INITIAL_CHECKPOINT_PATH"


def set_default_vocabulary(vocabulary: seqio.Vocabulary | str | None) -> None:
  """Sets the vocabulary of tasks registered without one (a path is a SentencePiece model, an
  HF tokenizer.json or a model directory); None goes back to the model's own vocabulary."""
  global _DEFAULT_VOCAB
  if isinstance(vocabulary, (str, os.PathLike)):
    vocabulary = _load_vocabulary(os.fspath(vocabulary))
  _DEFAULT_VOCAB = vocabulary


@functools.lru_cache(maxsize=8)
def _load_vocabulary(path: str) -> seqio.Vocabulary:
  """A SentencePiece model or an HF `tokenizer.json` (a file, or a model directory with one
  and no SentencePiece model: Llama 3, Qwen2)."""
  from ia3_jax.data import hf_vocabulary  # pylint: disable=g-import-not-at-top
  from ia3_jax.interop import hf_checkpoints  # pylint: disable=g-import-not-at-top  (jax-free data layer)
  if os.path.basename(path) == hf_vocabulary.TOKENIZER_FILE:
    return hf_vocabulary.HfTokenizerVocabulary(path)
  try:
    return hf_checkpoints.load_vocabulary(path)
  except hf_checkpoints.CheckpointError:
    if os.path.isfile(os.path.join(path, hf_vocabulary.TOKENIZER_FILE)):
      return hf_vocabulary.HfTokenizerVocabulary(path)
    raise


def run_model_path() -> str | None:
  """The model directory of the gin-configured run (its INITIAL_CHECKPOINT_PATH), if any.

  The one place the data layer looks at gin: a run (`ia3-jax train/eval/score/infer`)
  names its model there, and tasks registered without a vocabulary use that model's.
  """
  gin = sys.modules.get("gin")  # only when a gin run is configured; never imports gin
  if gin is None:
    return None
  try:
    path = gin.query_parameter(f"%{RUN_MODEL_MACRO}")
  except (ValueError, KeyError):
    return None
  return os.fspath(path) if isinstance(path, (str, os.PathLike)) else None


def resolve_default_vocabulary() -> seqio.Vocabulary:
  """The vocabulary of tasks registered without one, now: `set_default_vocabulary`,
  else $IA3_JAX_SPM_PATH, else the run's model (INITIAL_CHECKPOINT_PATH's spiece.model)."""
  if _DEFAULT_VOCAB is not None:
    return _DEFAULT_VOCAB
  path = os.environ.get(SPM_PATH_ENV) or run_model_path()
  if path:
    return _load_vocabulary(path)
  raise ConfigError(
      "no vocabulary for a task registered without one: pass register_task(..., vocabulary="
      "hf_checkpoints.load_vocabulary(MODEL_DIR)), call data.set_default_vocabulary(...), set "
      f"${SPM_PATH_ENV}, or run with {RUN_MODEL_MACRO} set to a model directory holding its "
      "spiece.model")


class ModelVocabulary(seqio.Vocabulary):
  """The model's own vocabulary, looked up when a task first tokenizes (`resolve_default_vocabulary`).

  Tasks can then be registered before the run says which model it uses; nothing is
  downloaded, and with no model in sight tokenizing raises a `ConfigError` saying what to set.
  """

  def __init__(self):
    super().__init__(extra_ids=0)

  @property
  def resolved(self) -> seqio.Vocabulary:
    return resolve_default_vocabulary()

  # seqio.Vocabulary's public surface, delegated.
  @property
  def extra_ids(self) -> int:
    return self.resolved.extra_ids

  @property
  def vocab_size(self) -> int:
    return self.resolved.vocab_size

  @property
  def eos_id(self) -> int | None:
    return self.resolved.eos_id

  @property
  def pad_id(self) -> int:
    return self.resolved.pad_id

  @property
  def unk_id(self) -> int | None:
    return self.resolved.unk_id

  @property
  def _base_vocab_size(self) -> int:
    return self.resolved._base_vocab_size  # pylint: disable=protected-access

  def encode(self, s):
    return self.resolved.encode(s)

  def decode(self, ids):
    return self.resolved.decode(ids)

  def encode_tf(self, s):
    return self.resolved.encode_tf(s)

  def decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  def _encode(self, s):
    return self.resolved.encode(s)

  def _decode(self, ids):
    return self.resolved.decode(ids)

  def _encode_tf(self, s):
    return self.resolved.encode_tf(s)

  def _decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  def __eq__(self, other) -> bool:
    return other is self

  __hash__ = object.__hash__


_MODEL_VOCABULARY = ModelVocabulary()


def default_vocabulary() -> seqio.Vocabulary:
  """The vocabulary of a registration that gets none: `set_default_vocabulary`'s, else the
  model's own (`ModelVocabulary`: $IA3_JAX_SPM_PATH or the run's INITIAL_CHECKPOINT_PATH,
  resolved when the task first tokenizes; never a download)."""
  return _DEFAULT_VOCAB if _DEFAULT_VOCAB is not None else _MODEL_VOCABULARY
