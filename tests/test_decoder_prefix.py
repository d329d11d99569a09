"""Prefix tuning on decoder-only models: against peft's `PrefixTuningConfig` on a tiny
`LlamaForCausalLM`, and through the prompt key/value cache of rank classification."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ia3_jax.interop import hf_decoder
from ia3_jax.model import decoder
from ia3_jax.model.decoder_config import get_decoder_config
from ia3_jax.objectives import scoring
from ia3_jax.peft import prefix_tuning
from tests import tolerances
from tests.test_decoder import make_hf, padded_batch

P = 3  # virtual tokens


def prefix_model(config, num_tasks: int = 1) -> decoder.DecoderOnly:
  return decoder.DecoderOnly(config, prefix_tuning.prefix_tuning_blocks(
      length=P, num_tasks=num_tasks, base=decoder.DecoderBlocks()))


def test_prefix_tuning_equals_peft_prefix_tuning(tmp_path):
  """peft hands its prefix to the model as P cached positions (keys stored as given, real
  tokens at positions P, P+1, ...); ours are memory slots (no position; real tokens from 0).
  Rotary embeddings are relative, so the two agree exactly once each peft prefix key is
  rotated back by P positions: the logits must be equal."""
  import peft
  hf = make_hf(tmp_path, "llama")
  config, params = hf_decoder.load_hf_decoder(tmp_path)
  model = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                          num_virtual_tokens=P)).eval()
  embedding = model.prompt_encoder["default"].embedding.weight
  torch.manual_seed(1)
  with torch.no_grad():
    embedding.normal_(0.0, 1.0)
  tokens, mask = padded_batch(3, "right", length=8)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  kv = embedding.detach().numpy().reshape(P, config.num_layers * 2, config.num_kv_heads,
                                          config.head_dim)
  cos, sin = decoder.rotary_tables(config, jnp.full((1, P), -P))
  for layer in range(config.num_layers):
    attention = params["decoder"][f"layers_{layer}"]["self_attention"]
    attention[prefix_tuning.KEY] = np.asarray(decoder.apply_rotary(
        jnp.asarray(kv[None, :, 2 * layer]), cos, sin))
    attention[prefix_tuning.VALUE] = kv[None, :, 2 * layer + 1]
  ours = np.asarray(decoder.forward(prefix_model(config), params, tokens, mask))
  valid = mask.astype(bool)
  tolerances.assert_close(ours[valid], theirs[valid])


def test_prefixes_reach_cached_scoring_and_mixed_tasks():
  """Rank classification through the prompt cache sees the prefixes as a full forward of
  prompt + choice does, and a mixed-task batch equals each task alone."""
  config = get_decoder_config("tiny_llama")
  model = prefix_model(config, num_tasks=2)
  params = decoder.init_params(model, jax.random.key(0), with_task_id=True)
  layer = params["decoder"]["layers_1"]["self_attention"]
  assert layer[prefix_tuning.KEY].shape == (2, P, config.num_kv_heads, config.head_dim)
  prompt = np.array([[5, 17, 42, 8, 0], [3, 4, 5, 6, 7]], np.int32)
  choices = np.array([[[11, 12], [13, 0]], [[14, 15], [16, 17]]], np.int32)
  batch = {"encoder_input_tokens": prompt, "choice_tokens": choices,
           "choice_mask": np.ones((2, 2), np.int32)}
  for task in (0, 1):
    task_id = np.full((2,), task, np.int32)
    got = np.asarray(scoring.choice_log_probs(model, params, {**batch, "task_id": task_id}))
    for b in range(2):
      for c in range(2):
        p = prompt[b][prompt[b] > 0]
        ch = choices[b, c][choices[b, c] > 0]
        seq = np.concatenate([p, ch])[None]
        logits = decoder.forward(model, params, seq, task_id=task_id[:1])
        logp = jax.nn.log_softmax(logits[0, len(p) - 1:-1])
        want = np.asarray(logp[np.arange(len(ch)), ch])
        tolerances.assert_close(got[b, c, :len(ch)], want)
  mixed = scoring.choice_log_probs(model, params, {**batch, "task_id": np.array([1, 0])})
  alone = [scoring.choice_log_probs(model, params, {**batch, "task_id": np.full((2,), t)})
           for t in (1, 0)]
  tolerances.assert_close(np.asarray(mixed)[0], np.asarray(alone[0])[0])
  tolerances.assert_close(np.asarray(mixed)[1], np.asarray(alone[1])[1])
