"""Prefix and prompt tuning on decoder-only models: against peft's `PrefixTuningConfig` and
`PromptTuningConfig` on a tiny `LlamaForCausalLM`, and through the prompt key/value cache of
rank classification and generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ia3_jax.interop import hf_decoder
from ia3_jax.model import decoder
from ia3_jax.model.decoder_config import get_decoder_config
from ia3_jax.objectives import scoring
from ia3_jax.peft import prefix_tuning, prompt_tuning
from tests import tolerances
from tests.test_decoder import make_hf, padded_batch

P = 3  # virtual tokens


def prefix_model(config, num_tasks: int = 1) -> decoder.DecoderOnly:
  return decoder.DecoderOnly(config, prefix_tuning.prefix_tuning_blocks(
      length=P, num_tasks=num_tasks, base=decoder.DecoderBlocks()))


def prompt_model(config, num_tasks: int = 1) -> decoder.DecoderOnly:
  """Prompt tuning built on the decoder-only blocks (the config's family), as a gin run does."""
  return decoder.DecoderOnly(config, prompt_tuning.prompt_tuning_blocks(
      config, length=P, num_tasks=num_tasks))


def peft_logits(tmp_path, peft_config, seed: int):
  """(config, our params of the same tiny HF Llama, peft's prompt table [rows, width] drawn
  at random, tokens, mask, peft's logits) of `peft_config` on a right-padded batch."""
  import peft
  hf = make_hf(tmp_path, "llama")
  config, params = hf_decoder.load_hf_decoder(tmp_path)
  model = peft.get_peft_model(hf, peft_config).eval()
  embedding = model.prompt_encoder["default"].embedding.weight
  torch.manual_seed(1)
  with torch.no_grad():
    embedding.normal_(0.0, 1.0)
  tokens, mask = padded_batch(seed, "right", length=8)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  return config, params, embedding.detach().numpy(), tokens, mask, theirs


def test_prefix_tuning_equals_peft_prefix_tuning(tmp_path):
  """peft hands its prefix to the model as P cached positions (keys stored as given, real
  tokens at positions P, P+1, ...); ours are memory slots (no position; real tokens from 0).
  Rotary embeddings are relative, so the two agree exactly once each peft prefix key is
  rotated back by P positions: the logits must be equal."""
  import peft
  config, params, table, tokens, mask, theirs = peft_logits(
      tmp_path, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P), 3)
  kv = table.reshape(P, config.num_layers * 2, config.num_kv_heads, config.head_dim)
  cos, sin = decoder.rotary_tables(config, jnp.full((1, P), -P))
  for layer in range(config.num_layers):
    attention = params["decoder"][f"layers_{layer}"]["self_attention"]
    attention[prefix_tuning.KEY] = np.asarray(decoder.apply_rotary(
        jnp.asarray(kv[None, :, 2 * layer]), cos, sin))
    attention[prefix_tuning.VALUE] = kv[None, :, 2 * layer + 1]
  ours = np.asarray(decoder.forward(prefix_model(config), params, tokens, mask))
  valid = mask.astype(bool)
  tolerances.assert_close(ours[valid], theirs[valid])


def test_prompt_tuning_equals_peft_prompt_tuning(tmp_path):
  """peft puts the soft prompt before the token embeddings at positions 0..P-1, as ours."""
  import peft
  config, params, prompt, tokens, mask, theirs = peft_logits(
      tmp_path, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P), 5)
  assert theirs.shape[1] == P + tokens.shape[1]
  ids = prompt_tuning.prompt_init_ids(config.vocab_size, P)
  table = params["token_embedder"]["embedding"]
  params["decoder"][prompt_tuning.PARAM] = (prompt - table[ids[0]])[None]
  ours = prompt_model(config)
  got = np.asarray(decoder.forward(ours, params, tokens, mask))
  valid = mask.astype(bool)
  tolerances.assert_close(got[valid], theirs[:, P:][valid])
  vectors = prompt_tuning.prompt_vectors(params, config, length=P)
  tolerances.assert_close(np.asarray(vectors)[0], prompt)


def test_a_soft_prompt_goes_before_each_new_sequence_only():
  """Cached generation (the prompt pass, then one token per step) equals greedy decoding
  by full forward passes, each of which starts with the soft prompt."""
  config = get_decoder_config("tiny_llama")
  model = prompt_model(config, num_tasks=2)
  params = decoder.init_params(model, jax.random.key(0), with_task_id=True)
  delta = params["decoder"][prompt_tuning.PARAM]
  params["decoder"][prompt_tuning.PARAM] = np.random.default_rng(0).normal(
      size=delta.shape).astype(np.float32)
  tokens = np.array([[0, 0, 5, 17, 42, 8], [3, 4, 5, 6, 7, 9]], np.int32)
  task_id = np.array([1, 0], np.int32)
  got = np.asarray(decoder.greedy_generate(model, params, tokens, (tokens > 0).astype(np.int32),
                                           4, task_id=task_id))
  for b in range(2):
    seq = list(tokens[b][tokens[b] > 0])
    for _ in range(4):
      logits = decoder.forward(model, params, np.array([seq]), task_id=task_id[b:b + 1])
      seq.append(int(np.argmax(logits[0, -1])))
    assert got[b].tolist() == seq[-4:], b
  right = np.array([[5, 17, 42, 8, 0, 0], [3, 4, 5, 6, 7, 9]], np.int32)
  mask = (right > 0).astype(np.int32)
  positions = decoder.default_position_ids(jnp.asarray(mask), right.shape[1])
  given = decoder.forward(model, params, right, mask, positions, task_id=task_id)
  default = decoder.forward(model, params, right, mask, task_id=task_id)
  valid = mask.astype(bool)  # given positions are the tokens' own: the prompt goes before them
  tolerances.assert_close(np.asarray(given)[valid], np.asarray(default)[valid])


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_cached_scoring_and_mixed_tasks(method):
  """Rank classification through the prompt cache sees the prefixes (the soft prompt) as a
  full forward of prompt + choice does, and a mixed-task batch equals each task alone."""
  config = get_decoder_config("tiny_llama")
  model = (prefix_model if method == "prefix" else prompt_model)(config, num_tasks=2)
  params = decoder.init_params(model, jax.random.key(0), with_task_id=True)
  if method == "prefix":
    layer = params["decoder"]["layers_1"]["self_attention"]
    assert layer[prefix_tuning.KEY].shape == (2, P, config.num_kv_heads, config.head_dim)
  else:
    delta = params["decoder"][prompt_tuning.PARAM]
    assert delta.shape == (2, P, config.emb_dim)
    params["decoder"][prompt_tuning.PARAM] = np.random.default_rng(1).normal(
        size=delta.shape).astype(np.float32)
  prompt = np.array([[5, 17, 42, 8, 0], [3, 4, 5, 6, 7]], np.int32)
  choices = np.array([[[11, 12], [13, 0]], [[14, 15], [16, 17]]], np.int32)
  batch = {"encoder_input_tokens": prompt, "choice_tokens": choices,
           "choice_mask": np.ones((2, 2), np.int32)}
  rows = [(b, c) for b in range(2) for c in range(2)]  # each prompt + choice, right-padded
  pieces = [(prompt[b][prompt[b] > 0], choices[b, c][choices[b, c] > 0]) for b, c in rows]
  seqs = np.zeros((len(rows), 8), np.int32)
  for i, (p, ch) in enumerate(pieces):
    seqs[i, :len(p) + len(ch)] = np.concatenate([p, ch])
  for task in (0, 1):
    task_id = np.full((2,), task, np.int32)
    got = np.asarray(scoring.choice_log_probs(model, params, {**batch, "task_id": task_id}))
    logits = decoder.forward(model, params, seqs, (seqs > 0).astype(np.int32),
                             task_id=np.full((len(rows),), task, np.int32))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for i, ((b, c), (p, ch)) in enumerate(zip(rows, pieces)):
      want = logp[i, np.arange(len(p) - 1, len(p) - 1 + len(ch)), ch]
      tolerances.assert_close(got[b, c, :len(ch)], want)
  mixed = scoring.choice_log_probs(model, params, {**batch, "task_id": np.array([1, 0])})
  alone = [scoring.choice_log_probs(model, params, {**batch, "task_id": np.full((2,), t)})
           for t in (1, 0)]
  tolerances.assert_close(np.asarray(mixed)[0], np.asarray(alone[0])[0])
  tolerances.assert_close(np.asarray(mixed)[1], np.asarray(alone[1])[1])
