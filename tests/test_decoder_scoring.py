"""Decoder-only rank classification (prompt once, choices continuing its cache) against one
full forward per choice (ours) and against transformers' logits of prompt + choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ia3_jax.interop import hf_decoder
from ia3_jax.model import decoder, network
from ia3_jax.model.decoder_config import get_decoder_config
from ia3_jax.objectives import losses, scoring
from ia3_jax.peft import ia3
from tests import tolerances
from tests.test_decoder import TINY, make_hf

choice_log_probs = jax.jit(scoring.choice_log_probs, static_argnums=0,
                           static_argnames="max_choices_per_step")
rank_classify = jax.jit(scoring.rank_classify, static_argnums=0,
                        static_argnames=("length_normalize", "max_choices_per_step"))


def rc_batch(seed: int, batch: int = 2, num_choices: int = 3, prompt_len: int = 7,
             choice_len: int = 4) -> dict[str, np.ndarray]:
  """Prompts of different lengths right-padded with 0; choices of 1..T tokens, 0-padded;
  row 1 has a padding choice."""
  rng = np.random.default_rng(seed)
  prompts = np.zeros((batch, prompt_len), np.int32)
  for b, n in enumerate([prompt_len, 4, 1, 5][:batch]):
    prompts[b, :n] = rng.integers(1, TINY["vocab_size"], n)
  choices = np.zeros((batch, num_choices, choice_len), np.int32)
  for b in range(batch):
    for c in range(num_choices):
      n = rng.integers(1, choice_len + 1)
      choices[b, c, :n] = rng.integers(1, TINY["vocab_size"], n)
  mask = np.ones((batch, num_choices), np.int32)
  if batch > 1:
    mask[1, -1] = 0
    choices[1, -1] = 0
  return {"encoder_input_tokens": prompts, "choice_tokens": choices, "choice_mask": mask}


def _pieces(batch, b, c):
  prompt = batch["encoder_input_tokens"][b]
  choice = batch["choice_tokens"][b, c]
  return prompt[prompt > 0], choice[choice > 0]


def reference_logp(batch, logits_of) -> np.ndarray:
  """log p [B, C, T] of each choice from `logits_of(prompt + choice) -> [len, vocab]`,
  one full forward per choice (0 at padding)."""
  out = np.zeros(batch["choice_tokens"].shape, np.float64)
  for b, c in np.ndindex(*batch["choice_mask"].shape):
    prompt, choice = _pieces(batch, b, c)
    if not batch["choice_mask"][b, c] or not len(choice):
      continue
    logits = np.asarray(logits_of(np.concatenate([prompt, choice])), np.float64)
    steps = logits[len(prompt) - 1: len(prompt) - 1 + len(choice)]
    logp = steps - np.logaddexp.reduce(steps, axis=-1, keepdims=True)
    out[b, c, :len(choice)] = logp[np.arange(len(choice)), choice]
  return out


def ours_full(model, params, length: int = 16):
  """Our logits of one sequence, right-padded to `length` (one compilation for all)."""
  def run(tokens):
    padded = np.zeros((1, length), np.int32)
    padded[0, :len(tokens)] = tokens
    return decoder.forward(model, params, jnp.asarray(padded), jnp.asarray(padded > 0))[0]
  return run


def hf_full(hf):
  def run(tokens):
    with torch.no_grad():
      return hf(input_ids=torch.tensor(tokens[None], dtype=torch.long)).logits[0].float().numpy()
  return run


def token_mask(batch):
  return np.asarray(losses.choice_token_mask(batch["choice_tokens"], batch["choice_mask"]))


CASES = {"llama_tied_gqa": ("llama", dict(tie_word_embeddings=True)),
         "mistral_sliding_window": ("mistral", dict(sliding_window=3)),
         "qwen2_biases": ("qwen2", {})}


@pytest.mark.parametrize("case", sorted(CASES))
def test_choice_log_probs_equal_one_forward_per_choice_and_transformers(tmp_path, case):
  kind, overrides = CASES[case]
  hf = make_hf(tmp_path, kind, num_hidden_layers=1, **overrides)  # one layer: cheap compiles
  config, params = hf_decoder.load_hf_decoder(tmp_path)
  model = decoder.DecoderOnly(config)
  batch = rc_batch(0)
  real = token_mask(batch)
  got = np.asarray(choice_log_probs(model, params, batch))
  assert got.shape == batch["choice_tokens"].shape and np.all(np.isfinite(got))
  tolerances.assert_close(got[real], reference_logp(batch, ours_full(model, params))[real])
  theirs = reference_logp(batch, hf_full(hf))
  tolerances.assert_close_to_torch(got[real], theirs[real])
  summed = np.where(batch["choice_mask"] > 0, np.sum(theirs, -1), -np.inf)
  tolerances.assert_close_to_torch(np.where(batch["choice_mask"] > 0,
                                            np.sum(np.where(real, got, 0), -1), -np.inf), summed)
  out = rank_classify(model, params, batch)  # length-normalised (T-Few), and predictions
  want = summed / np.maximum(real.sum(-1), 1)
  tolerances.assert_close_to_torch(np.asarray(out["scores"]), want)
  np.testing.assert_array_equal(out["predictions"], np.argmax(want, -1))


def test_one_token_choices_and_a_one_token_prompt():
  config = get_decoder_config("tiny_llama", num_layers=1)
  model = decoder.DecoderOnly(config)
  params = decoder.init_params(model, jax.random.key(1))
  batch = rc_batch(1, batch=3, choice_len=1)
  real = token_mask(batch)
  got = np.asarray(choice_log_probs(model, params, batch))
  tolerances.assert_close(got[real], reference_logp(batch, ours_full(model, params))[real])


def test_gradients_through_the_prompt_cache_equal_the_full_forward():
  config = get_decoder_config("tiny_llama", num_layers=1)  # cheap to compile
  model = ia3.ia3_model(config, num_tasks=2)
  params = decoder.init_params(model, jax.random.key(2), with_task_id=True)
  vectors, base = ia3.extract_ia3(params)
  rng = np.random.default_rng(0)
  vectors = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32),
                         vectors)
  batch = {**rc_batch(2), "task_id": np.array([1, 0], np.int32)}
  real = token_mask(batch)

  def cached(v):
    logp = scoring.choice_log_probs(model, ia3.insert_ia3(base, v), batch)
    return jnp.sum(jnp.where(real, logp, 0.0))

  rows = [(b, *_pieces(batch, b, c)) for b, c in zip(*np.nonzero(batch["choice_mask"]))]
  seqs = np.zeros((len(rows), 16), np.int32)
  for i, (_, prompt, choice) in enumerate(rows):
    seqs[i, :len(prompt) + len(choice)] = np.concatenate([prompt, choice])
  targets = np.zeros(seqs.shape, np.int32)  # the choice tokens where they are predicted
  for i, (_, prompt, choice) in enumerate(rows):
    targets[i, len(prompt) - 1: len(prompt) - 1 + len(choice)] = choice

  def full(v):  # each choice: one forward over its unpadded prompt + choice, own task row
    logits = model.apply({"params": ia3.insert_ia3(base, v)}, jnp.asarray(seqs),
                         jnp.asarray(seqs > 0),
                         task_id=jnp.asarray(batch["task_id"][[r[0] for r in rows]]))
    logp = losses.token_log_probs(logits, jnp.asarray(targets))
    return jnp.sum(jnp.where(targets > 0, logp, 0.0))

  def chunked(v):  # two choices at a time, each chunk rematerialised
    logp = scoring.choice_log_probs(model, ia3.insert_ia3(base, v), batch,
                                    max_choices_per_step=2)
    return jnp.sum(jnp.where(real, logp, 0.0))

  remat = decoder.DecoderOnly(config, ia3.ia3_blocks(num_tasks=2, base=decoder.DecoderBlocks(
      remat="full")))

  def rematerialised(v):  # the choice rows' layers recomputed in the backward pass
    logp = scoring.choice_log_probs(remat, ia3.insert_ia3(base, v), batch)
    return jnp.sum(jnp.where(real, logp, 0.0))

  scanned = decoder.DecoderOnly(config, ia3.ia3_blocks(num_tasks=2, base=decoder.DecoderBlocks(
      remat="full", scan_layers=True)))

  def scanned_layers(v):  # prompt cache and choice rows through nn.scan, stacked params
    params = network.scan_params(ia3.insert_ia3(base, v))
    logp = scoring.choice_log_probs(scanned, params, batch)
    return jnp.sum(jnp.where(real, logp, 0.0))

  (want, want_grad), *others = (jax.jit(jax.value_and_grad(f))(vectors)
                                for f in (full, cached, chunked, rematerialised, scanned_layers))
  for got, got_grad in others:
    tolerances.assert_close(got, want)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
      tolerances.assert_close(g, w)


def test_an_all_padding_row_is_finite_and_changes_no_other_row():
  """`scoring.evaluate` pads a last partial batch with all-zero rows (no prompt, no choice)."""
  config = get_decoder_config("tiny_llama", num_layers=1, sliding_window=4)
  model = decoder.DecoderOnly(config)
  params = decoder.init_params(model, jax.random.key(3))
  batch = rc_batch(3, batch=3)
  padded = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}
  got = np.asarray(choice_log_probs(model, params, padded))
  assert np.all(np.isfinite(got))
  real = token_mask(batch)
  tolerances.assert_close(got[:3][real], np.asarray(choice_log_probs(model, params, batch))[real])
