"""Greedy decoding with a key/value cache, for the infer mode.

The encoder runs once; the decoder then takes one token per step against an
autoregressive cache (`network.init_decode_cache`), inside a single jitted
`lax.while_loop` that stops as soon as every row has produced EOS. Decoding
starts from token 0 (T5's decoder start = pad id), like `network.shift_right`
and HF `generate`.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ia3_jax.model import network

Array = jax.Array

DECODER_START_ID = 0
PAD_ID = 0


@functools.partial(jax.jit, static_argnames=("model", "max_length", "eos_id"))
def _greedy(model: network.Transformer, params: Any, encoder_input_tokens: Array,
            task_id: Optional[Array], max_length: int, eos_id: int) -> tuple[Array, Array]:
  """(tokens [B, max_length], number of decoder steps run)."""
  encoded, valid = model.apply({"params": params}, encoder_input_tokens, task_id=task_id,
                               method=network.Transformer.encode)
  batch = encoder_input_tokens.shape[0]
  cache = network.init_decode_cache(model, params, encoded, valid, max_length, task_id=task_id)

  def step(state):
    t, cache, tokens, last, done = state
    logits, mutated = model.apply(
        {"params": params, "cache": cache}, encoded, valid, last[:, None], task_id=task_id,
        decode=True, mutable=["cache"], method=network.Transformer.decode)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # ties: lowest id
    token = jnp.where(done, PAD_ID, token)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
    return t + 1, mutated["cache"], tokens, token, done | (token == eos_id)

  def running(state):
    t, _, _, _, done = state
    return (t < max_length) & ~jnp.all(done)

  state = (jnp.array(0, jnp.int32), cache, jnp.full((batch, max_length), PAD_ID, jnp.int32),
           jnp.full((batch,), DECODER_START_ID, jnp.int32), jnp.zeros((batch,), bool))
  steps, _, tokens, _, _ = jax.lax.while_loop(running, step, state)
  return tokens, steps


def greedy_decode(model: network.Transformer, params: Any, encoder_input_tokens: Array, *,
                  max_length: int, task_id: Optional[Array] = None, eos_id: int = 1) -> Array:
  """Greedy (argmax) decoding: tokens [B, max_length] int32.

  Row b holds the generated tokens without the decoder start token, up to
  and including its first EOS, then 0-padding. Rows that never emit EOS run
  for `max_length` tokens. Jitted once per (model, input shape, max_length,
  eos_id); the loop ends early when all rows are done.
  """
  if encoder_input_tokens.ndim != 2:
    raise ValueError(f"greedy_decode: encoder_input_tokens must be [B, L], "
                     f"got shape {encoder_input_tokens.shape}")
  if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
    raise ValueError(f"greedy_decode: max_length must be a positive int, got {max_length!r}")
  if task_id is not None and task_id.shape != encoder_input_tokens.shape[:1]:
    raise ValueError(f"greedy_decode: task_id shape {task_id.shape} != [B] = "
                     f"{encoder_input_tokens.shape[:1]}")
  return _greedy(model, params, encoder_input_tokens, task_id, int(max_length), int(eos_id))[0]
