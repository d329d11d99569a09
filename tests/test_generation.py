"""Greedy decoding with the cache: against HF `generate` and against repeated full forwards."""

import numpy as np
import pytest
import torch

from ia3_jax.interop import hf_checkpoints
from ia3_jax.model import generation, network
from tests import hf_utils
from tests.test_scoring import NUM_TASKS, forward, task_model

MAX_LENGTH = 10
EOS = 1


def boost_eos(torch_model, params, factor):
  """Scales the EOS row of the output layer in both models, so some rows stop early."""
  with torch.no_grad():
    torch_model.lm_head.weight[EOS] *= factor
  if "logits_dense" in params["decoder"]:
    params["decoder"]["logits_dense"]["kernel"][:, EOS] *= factor
  else:  # tied: the embedding is the output layer (EOS never appears in these inputs)
    params["token_embedder"]["embedding"][EOS] *= factor
  return torch_model, params


def hf_greedy(torch_model, enc, max_new_tokens):
  """HF greedy tokens without the decoder start token, 0-padded to max_new_tokens."""
  ids = torch.tensor(enc, dtype=torch.long)
  with torch.no_grad():
    out = torch_model.generate(input_ids=ids, attention_mask=(ids > 0).long(),
                               max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
  out = out.numpy()
  assert (out[:, 0] == 0).all()  # decoder start token
  return np.pad(out[:, 1:], ((0, 0), (0, max_new_tokens + 1 - out.shape[1])))


def full_forward_greedy(model, params, enc, max_length, task_id=None):
  """Reference without a cache: one full forward pass over the prefix per step."""
  batch = enc.shape[0]
  dec = np.zeros((batch, max_length + 1), np.int32)
  done = np.zeros(batch, bool)
  for t in range(max_length):  # causal: logits at t see dec[:, :t + 1] only
    token = np.asarray(forward(model, params, enc, dec[:, :-1], None, task_id))[:, t].argmax(-1)
    token = np.where(done, 0, token)
    dec[:, t + 1] = token
    done |= token == EOS
  return dec[:, 1:]


# EOS boosts chosen so that rows stop at different steps (checked below).
@pytest.mark.parametrize("variant,seed,factor", [("t5_1_1", 1, 1.1), ("t5_1_0", 0, 2.2)])
def test_greedy_equals_hf_generate_and_full_forwards(tmp_path, variant, seed, factor):
  torch_model = hf_utils.make_hf_model(tmp_path, variant)
  config, params = hf_checkpoints.load_hf_checkpoint(tmp_path)
  torch_model, params = boost_eos(torch_model, params, factor)
  model = network.Transformer(config)
  enc = hf_utils.random_batch(np.random.default_rng(seed), config.vocab_size, 6, 11, 2)[
      "encoder_input_tokens"]
  ours = np.asarray(generation.greedy_decode(model, params, enc, max_length=MAX_LENGTH))
  theirs = hf_greedy(torch_model, enc, MAX_LENGTH)
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(ours, full_forward_greedy(model, params, enc, MAX_LENGTH))
  # Not vacuous: some rows stop mid-way (then 0-padding), some run to max_length.
  stopped = (ours == EOS).any(-1)
  ends = [int(np.argmax(row == EOS)) for row in ours[stopped]]
  assert stopped.any() and not stopped.all() and max(ends) > 0, ours
  for row, end in zip(ours[stopped], ends):
    assert (row[end + 1:] == 0).all() and (row[:end] > 0).all()


def test_loop_stops_when_every_row_is_done(tmp_path):
  torch_model = hf_utils.make_hf_model(tmp_path, "t5_1_1")
  config, params = hf_checkpoints.load_hf_checkpoint(tmp_path)
  torch_model, params = boost_eos(torch_model, params, 50.0)
  model = network.Transformer(config)
  enc = hf_utils.random_batch(np.random.default_rng(1), config.vocab_size, 6, 11, 2)[
      "encoder_input_tokens"]
  tokens, steps = generation._greedy(model, params, enc, None, MAX_LENGTH, EOS)
  tokens = np.asarray(tokens)
  last = max(int(np.argmax(r == EOS)) for r in tokens) + 1
  assert (tokens == EOS).any(-1).all() and int(steps) == last < MAX_LENGTH
  np.testing.assert_array_equal(tokens, hf_greedy(torch_model, enc, MAX_LENGTH))


def test_greedy_passes_task_id():
  model, params = task_model()
  enc = hf_utils.random_batch(np.random.default_rng(2), 128, 3, 9, 2)["encoder_input_tokens"]
  task_id = np.arange(3, dtype=np.int32) % NUM_TASKS
  ours = np.asarray(generation.greedy_decode(model, params, enc, max_length=6, task_id=task_id))
  np.testing.assert_array_equal(ours, full_forward_greedy(model, params, enc, 6, task_id))
  other = np.asarray(generation.greedy_decode(model, params, enc, max_length=6,
                                              task_id=(task_id + 1) % NUM_TASKS))
  assert not np.array_equal(ours, other)


def test_bad_arguments_are_named():
  model, params = task_model()
  enc = np.ones((2, 5), np.int32)
  with pytest.raises(ValueError, match="max_length"):
    generation.greedy_decode(model, params, enc, max_length=0)
  with pytest.raises(ValueError, match="encoder_input_tokens"):
    generation.greedy_decode(model, params, enc[0], max_length=3)
  with pytest.raises(ValueError, match="task_id"):
    generation.greedy_decode(model, params, enc, max_length=3, task_id=np.zeros(3, np.int32))
