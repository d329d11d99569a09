"""`data.hf_vocabulary.HfTokenizerVocabulary`: a byte-level BPE `tokenizer.json` trained here with
the `tokenizers` library encodes and decodes as the HF (transformers) tokenizer of that file,
in Python and in TensorFlow, and tokenises a registered task."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ia3_jax import data
from ia3_jax.data import vocabularies
from ia3_jax.data.hf_vocabulary import HfTokenizerVocabulary
from ia3_jax.errors import DataError

TOY = pathlib.Path(__file__).resolve().parents[1] / "examples" / "toy"
TEXTS = ["Hello world, how are you?", "Ünïcödé and emoji 🙂 survive bytes.", "  two  spaces",
         "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> pathlib.Path:
  """A directory with a tiny byte-level BPE tokenizer.json (pad id 0, <|endoftext|> id 1)."""
  root = tmp_path_factory.mktemp("bpe")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [json.loads(l)["text"] for l in (TOY / "train.jsonl").read_text().splitlines()]
  tok.train_from_iterator(corpus + TEXTS, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<pad>", "<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(root / "tokenizer.json"))
  return root


def test_encode_decode_equal_the_hf_tokenizer(tokenizer_dir):
  vocab = HfTokenizerVocabulary(tokenizer_dir)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
  assert (vocab.eos_id, vocab.pad_id, vocab.vocab_size) == (1, 0, len(hf))
  for text in TEXTS:
    ids = vocab.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False), text
    assert vocab.decode(ids) == hf.decode(ids) == text
    assert vocab.decode(ids + [vocab.eos_id, 5, 6]) == hf.decode(ids + [vocab.eos_id])  # to EOS
  ragged = vocab.encode_tf(np.array(TEXTS))
  assert ragged.to_list() == [vocab.encode(t) for t in TEXTS]
  np.testing.assert_array_equal(vocab.encode_tf(TEXTS[0]).numpy(), vocab.encode(TEXTS[0]))
  padded = ragged.to_tensor()  # 0-padded rows decode to the texts
  assert [t.decode() for t in vocab.decode_tf(padded).numpy()] == TEXTS


def test_a_task_tokenises_with_it_and_paths_load_it(tokenizer_dir):
  vocab = vocabularies._load_vocabulary(str(tokenizer_dir))  # a directory without spiece.model
  assert vocab == HfTokenizerVocabulary(tokenizer_dir / "tokenizer.json")
  data.register_task("hfvocab_toy", {"train": str(TOY / "train.jsonl"),
                                     "validation": str(TOY / "validation.jsonl")},
                     str(TOY / "toy.yaml"), vocabulary=vocab, num_choices=2)
  batch = next(iter(data.SeqioBatches("hfvocab_toy_eval", {"inputs": 64, "targets": 8,
                                                           "num_choices": 2},
                                      shuffle=False, repeat=False)(batch_size=2)))
  row = [int(t) for t in batch["encoder_input_tokens"][0] if t > 0]
  assert row[-1] == vocab.eos_id and vocab.encode(vocab.decode(row[:-1])) == row[:-1]
  with pytest.raises(DataError, match="no tokenizer.json"):
    HfTokenizerVocabulary(tokenizer_dir / "missing")


def test_text_that_encodes_to_id_0_is_refused_not_read_as_padding(tmp_path):
  """A tokenizer whose id 0 is a real token (byte-level BPE without special tokens: id 0 is
  "!", as in Llama 3 and Qwen2): seqio pads with 0, so such text is a one-line DataError."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS + ["Hi! <|endoftext|>"], trainers.BpeTrainer(
      vocab_size=300, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(["<|endoftext|>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  assert tok.id_to_token(0) == "!"
  vocab = HfTokenizerVocabulary(tmp_path)
  assert vocab.encode("Hello world") == tok.encode("Hello world").ids  # no id 0: fine
  with pytest.raises(DataError, match=r"tokenizer.json: 'Hi!' encodes to token id 0 \('!'\)"):
    vocab.encode("Hi!")
  import tensorflow as tf
  with pytest.raises(tf.errors.OpError, match="reserves for padding"):
    vocab.encode_tf(np.array(["fine", "Hi!"]))
