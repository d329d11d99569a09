"""Tiny random HF T5 models built locally, the PyTorch reference for model tests."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5ForConditionalGeneration

VARIANTS = {
    # T5 1.0: relu, tied embeddings, decoder output scaled by d_model^-0.5.
    "t5_1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # T5 1.1 / T0: gated-gelu, separate lm_head, no scaling.
    "t5_1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}

SHAPES = {
    "small": dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  vocab_size=128),
    # The odd shape of the foundation issue.
    "odd": dict(d_model=24, d_kv=5, num_heads=3, d_ff=40, num_layers=2, num_decoder_layers=3,
                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                vocab_size=96),
}


def hf_config(variant: str = "t5_1_1", shape: str = "small", **overrides) -> T5Config:
  kwargs = dict(SHAPES[shape], **VARIANTS[variant], dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  kwargs.update(overrides)
  return T5Config(**kwargs)


def make_hf_model(directory: pathlib.Path, variant: str = "t5_1_1", shape: str = "small", *,
                  seed: int = 0, fmt: str = "safetensors", **overrides):
  """Saves a random HF T5 to `directory` and returns the PyTorch model loaded back from it.

  For T5 1.1 the file gets an lm_head distinct from the embedding, as real T5 1.1 /
  T0 checkpoints have (transformers 5 would otherwise tie the two).
  """
  torch.manual_seed(seed)
  model = T5ForConditionalGeneration(hf_config(variant, shape, **overrides)).eval()
  with torch.no_grad():  # non-trivial layer norms, so scale bugs show
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.uniform_(0.5, 1.5)
  directory = pathlib.Path(directory)
  model.save_pretrained(directory)
  weights = directory / "model.safetensors"
  state = load_file(str(weights))
  if variant == "t5_1_1":
    gen = torch.Generator().manual_seed(seed + 1)
    state["lm_head.weight"] = torch.randn(state["shared.weight"].shape, generator=gen)
  if fmt == "bin":
    weights.unlink()
    torch.save(state, directory / "pytorch_model.bin")
  else:
    save_file(state, str(weights), metadata={"format": "pt"})
  return T5ForConditionalGeneration.from_pretrained(directory).eval()


def random_batch(rng: np.random.Generator, vocab: int, batch: int = 3, enc_len: int = 13,
                 dec_len: int = 7) -> dict[str, np.ndarray]:
  """Random tokens with row-wise padding (at least one row unpadded)."""
  def tokens(length):
    x = rng.integers(2, vocab, size=(batch, length))
    lengths = rng.integers(length // 2, length + 1, size=batch)
    lengths[0] = length
    return np.where(np.arange(length)[None] < lengths[:, None], x, 0).astype(np.int32)
  enc, dec = tokens(enc_len), tokens(dec_len)
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), dec[:, :-1]], axis=1)
  return dict(encoder_input_tokens=enc, decoder_target_tokens=dec, decoder_input_tokens=dec_in)


def torch_logits(model, batch: dict[str, np.ndarray]) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.tensor(batch["encoder_input_tokens"], dtype=torch.long),
                attention_mask=torch.tensor(batch["encoder_input_tokens"] > 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(batch["decoder_input_tokens"], dtype=torch.long))
  return out.logits.numpy()
