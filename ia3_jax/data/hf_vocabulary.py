"""A seqio vocabulary over an HF `tokenizers` file (`tokenizer.json`: the byte-level BPE of
Llama 3, Qwen2, ...), so tasks tokenise for those models as for SentencePiece ones.

Text is encoded without the tokenizer's special tokens (`add_special_tokens=False`: the task
pipeline appends `eos_id`; a task that wants a BOS puts it in its inputs) and decoded with
them kept. Token id 0 is seqio's padding id, as everywhere in ia3-jax: text that encodes to
id 0 (a real token in some tokenizers: "!" in Llama 3's and Qwen2's) would be read as
padding, so it is refused with a `DataError` naming the tokenizer, the token and the text.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional, Sequence

import numpy as np
from ia3_jax import runtime

tf = runtime.import_tf()  # quietly, before seqio imports it
import seqio  # pylint: disable=g-import-not-at-top

from ia3_jax.errors import DataError


PathLike = str | os.PathLike
TOKENIZER_FILE = "tokenizer.json"
# End-of-sequence tokens, first found wins (Llama 3 base, Qwen2 / GPT-2, Llama 2 / Mistral).
EOS_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")


class HfTokenizerVocabulary(seqio.Vocabulary):
  """`path`: a `tokenizer.json` file or a directory holding one. `eos_token` (default: the
  first of `EOS_TOKENS` the tokenizer has) is the EOS the pipeline appends."""

  def __init__(self, path: PathLike, *, eos_token: Optional[str] = None):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    file = pathlib.Path(path)
    if file.is_dir():
      file = file / TOKENIZER_FILE
    if not file.is_file():
      raise DataError(f"{path}: no {TOKENIZER_FILE} (an HF tokenizers file)")
    self._file = str(file)
    self._tokenizer = Tokenizer.from_file(self._file)
    names = (eos_token,) if eos_token else EOS_TOKENS
    found = [self._tokenizer.token_to_id(n) for n in names]
    found = [i for i in found if i is not None]
    if not found:
      raise DataError(f"{file}: no EOS token ({', '.join(names)}); pass eos_token=")
    self._eos_id = found[0]
    super().__init__(extra_ids=0)

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def unk_id(self) -> Optional[int]:
    unk = getattr(self._tokenizer.model, "unk_token", None)
    return self._tokenizer.token_to_id(unk) if unk else None

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> Sequence[int]:
    ids = self._tokenizer.encode(s, add_special_tokens=False).ids
    if 0 in ids:
      raise DataError(f"{self._file}: {s[:60]!r} encodes to token id 0 "
                      f"({self._tokenizer.id_to_token(0)!r}), which ia3-jax reserves for "
                      "padding; rephrase the text or template without it")
    return ids

  def _decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """A string scalar -> int32 ids [n]; strings [k] -> a ragged [k, None] (as seqio's)."""
    def encode(strings):
      flat = np.asarray(strings.numpy(), dtype=object).reshape(-1)
      ids = [self._encode(x.decode("utf-8")) for x in flat]
      return (tf.constant([i for row in ids for i in row], tf.int32),
              tf.constant([len(row) for row in ids], tf.int64))
    s = tf.convert_to_tensor(s)
    values, lengths = tf.py_function(encode, [s], (tf.int32, tf.int64))
    values.set_shape([None])
    if s.shape.rank == 0:
      return values
    return tf.RaggedTensor.from_row_lengths(values, tf.reshape(lengths, [-1]))

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int ids [..., n] -> strings [...] (padding, id 0, dropped)."""
    def decode(rows):
      flat = rows.numpy().reshape(-1, rows.shape[-1])
      return tf.constant([self._decode([i for i in row if i != self.pad_id]) for row in flat])
    ids = tf.convert_to_tensor(ids)
    out = tf.py_function(decode, [ids], tf.string)
    return tf.reshape(out, tf.shape(ids)[:-1])

  def __eq__(self, other) -> bool:
    return isinstance(other, HfTokenizerVocabulary) and (
        (self._file, self._eos_id) == (other._file, other._eos_id))

  def __hash__(self) -> int:
    return hash((self._file, self._eos_id))
