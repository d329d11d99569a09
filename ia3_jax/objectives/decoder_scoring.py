"""Rank classification with decoder-only models: the prompt once, every choice after it.

The batch is the T5 path's (`data.features`): `encoder_input_tokens [B, L]` is the
prompt, right-padded with 0, taken as given (no BOS is added: HF Llama tokenizers add
one, so a task that wants it puts the BOS id in its inputs; a prompt needs at least one
token: an empty row gives finite, meaningless scores); `choice_tokens
[B, C, T]` are the continuations (0-padded, scored as given, EOS included if the data
pipeline appended one). Token id 0 is padding in both. The choice's first token is
predicted from the prompt's last valid token, token t from choice tokens < t.

`prompt_context` runs the prompt once per example (`decoder.prefill`: its key/value
cache, and the logits of its last valid token alone, never [B, L, vocab]);
`choice_log_probs_from` scores k choices per example as B * k rows continuing that cache
(`decoder.continuation_logits`: each prompt's keys and values are read by its k rows,
never recomputed or copied), at positions counting on from the prompt's valid length. The
result equals one full forward pass over each unpadded prompt + choice.
`scoring.choice_log_probs` picks these for a `DecoderOnly` and adds the chunking over
choices.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from ia3_jax.model import decoder
from ia3_jax.objectives import losses

Array = jax.Array


def prompt_context(model: decoder.DecoderOnly, params: Any, prompt: Array,
                   task_id: Optional[Array], enable_dropout: bool = False,
                   rngs: Optional[dict] = None) -> tuple[Any, Array]:
  """(key/value cache of the prompts, logits [B, vocab] of each prompt's last valid
  token). No dropout in these models: `enable_dropout` and `rngs` are unused."""
  del enable_dropout, rngs
  valid = prompt > 0
  last = jnp.maximum(jnp.sum(valid, axis=-1) - 1, 0)  # an empty prompt reads slot 0
  logits, cache = decoder.prefill(model, params, prompt, valid, task_id=task_id,
                                  logits_index=last[:, None])
  return cache, logits[:, 0]


def choice_log_probs_from(model: decoder.DecoderOnly, params: Any, context: tuple[Any, Array],
                          task_id: Optional[Array], targets: Array,
                          enable_dropout: bool = False, rngs: Optional[dict] = None) -> Array:
  """log p [B, k, T] of choices `targets [B, k, T]` continuing their example's prompt."""
  del enable_dropout, rngs
  cache, last = context
  b, k, t = targets.shape
  flat = targets.reshape(b * k, t)
  rows_task = None if task_id is None else jnp.repeat(task_id, k)
  logits = jnp.repeat(last, k, axis=0)[:, None]
  if t > 1:
    rest = decoder.continuation_logits(model, params, cache, flat[:, :-1], task_id=rows_task)
    logits = jnp.concatenate([logits, rest], axis=1)
  return losses.token_log_probs(logits, flat).reshape(b, k, t)
