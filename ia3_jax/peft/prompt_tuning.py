"""Prompt tuning (Lester et al. 2021): a learned soft prompt before the encoder input
(T5), or before each new sequence of a decoder-only model.

Each task has P prompt vectors; each example prepends the vectors of its task
(`task_id`), so one batch may mix tasks. The encoder sees `[prompt; tokens]`
(prompt positions always valid, so the decoder also attends to them), with
relative positions counted from the first prompt vector -- exactly as if the
prompt were P ordinary tokens.

Initialisation (as in Lester et al. and the T-Few repo): prompt vectors start
as copies of vocabulary embedding rows, drawn uniformly from ids `[3, 5003)`
(the 5,000 most frequent SentencePiece pieces; clipped to the vocabulary) by a
NumPy generator seeded with `init_seed`, or given by `init_token_ids`.

Parameterisation: the trainable param is `encoder/prompt_delta
[num_tasks, P, E]`, zero at init, and the prompt is `embedding[init_ids] +
prompt_delta`. So the prompt starts from the rows of whatever embedding the
model runs with -- in particular the *loaded* pretrained one, however the
trainer initialises new params (no post-load step) -- and the first output
equals the base model fed `[t_1..t_P; tokens]`. With the embedding frozen this
is prompt tuning exactly (same gradients; use an optimizer without
parameter-scaled updates, as T-Few's `scale_parameter: false` does, for the
same updates). `prompt_vectors` gives the effective prompts.

Decoder-only models (`model.decoder`): the prompt vectors go before the tokens of
every new sequence (a full forward pass, the prompt pass that fills a key/value
cache; not the tokens that continue it), at positions 0..P-1, the tokens from P
on, as peft's `PromptTuningConfig` does (tested: same logits); the param is
`decoder/prompt_delta`, and the logits are the tokens' only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax.model import decoder, layers, network
from ia3_jax.model.config import T5Config
from ia3_jax.peft import banks, registry

Array = jax.Array
Params = Any

PARAM = "prompt_delta"
TRAINABLE_PATTERNS = (r"(encoder|decoder)/prompt_delta",)
INIT_VOCAB_RANGE = (3, 5003)


def prompt_init_ids(vocab_size: int, length: int, num_tasks: int = 1, *, init_seed: int = 0,
                    init_token_ids: Optional[Sequence] = None) -> np.ndarray:
  """Token ids `[num_tasks, length]` whose embedding rows initialise the prompts.

  `init_token_ids` may be `[length]` (same for every task) or `[num_tasks, length]`.
  """
  if init_token_ids is not None:
    ids = np.asarray(init_token_ids, np.int64)
    if ids.ndim == 1:
      ids = np.broadcast_to(ids, (num_tasks, ids.shape[0]))
    if ids.shape != (num_tasks, length):
      raise ValueError(f"prompt_tuning: init_token_ids has shape {ids.shape}; expected "
                       f"({length},) or ({num_tasks}, {length})")
    if ids.min() < 1 or ids.max() >= vocab_size:
      raise ValueError(f"prompt_tuning: init_token_ids must lie in [1, {vocab_size}) "
                       "(0 is padding)")
    return np.array(ids)
  low, high = INIT_VOCAB_RANGE
  high = min(high, vocab_size)
  if high <= low:
    raise ValueError(f"prompt_tuning: vocabulary of {vocab_size} is too small to sample "
                     f"init rows from [{low}, {INIT_VOCAB_RANGE[1]})")
  return np.random.default_rng(init_seed).integers(low, high, size=(num_tasks, length))


class SoftPrompt(nn.Module):
  """Mixin: the per-task soft prompts `[B, P, E]` of a batch (param `prompt_delta`)."""

  length: int = 100
  num_tasks: int = 1
  init_seed: int = 0
  init_token_ids: Optional[tuple] = None

  def soft_prompt(self, batch: int, task_id: Optional[Array]) -> Array:
    shape = (self.num_tasks, self.length, self.config.emb_dim)
    delta = self.param(PARAM, layers.logical(nn.initializers.zeros, (banks.TASKS_AXIS, None, "embed")),
                       shape, jnp.float32)
    ids = prompt_init_ids(self.config.vocab_size, self.length, self.num_tasks,
                          init_seed=self.init_seed, init_token_ids=self.init_token_ids)
    bank = jnp.take(self.shared_embedding.embedding, jnp.asarray(ids, jnp.int32), axis=0) + delta
    return banks.task_rows(bank, task_id, batch, "prompt_tuning")


class PromptEncoder(SoftPrompt, network.Encoder):
  """Encoder that prepends a per-task soft prompt to the token embeddings."""

  def embed_inputs(self, tokens: Array, task_id: Optional[Array]) -> tuple[Array, Array]:
    x, valid = super().embed_inputs(tokens, task_id)
    prompt = self.soft_prompt(tokens.shape[0], task_id)
    x = jnp.concatenate([prompt.astype(x.dtype), x], axis=1)
    valid = jnp.concatenate([jnp.ones((tokens.shape[0], self.length), bool), valid], axis=1)
    return x, valid


class PromptDecoderStack(SoftPrompt, decoder.DecoderOnlyStack):
  """Decoder-only stack that puts a per-task soft prompt before every new sequence."""

  def prepend(self, x: Array, valid: Array, position_ids: Optional[Array],
              task_id: Optional[Array]) -> tuple[Array, Array, Optional[Array], int]:
    batch = x.shape[0]
    x = jnp.concatenate([self.soft_prompt(batch, task_id).astype(x.dtype), x], axis=1)
    valid = jnp.concatenate([jnp.ones((batch, self.length), bool), valid], axis=1)
    if position_ids is not None:  # the prompt at 0..P-1, the given positions after it
      position_ids = jnp.broadcast_to(position_ids, valid[:, self.length:].shape)
      prompt = jnp.broadcast_to(jnp.arange(self.length), (batch, self.length))
      position_ids = jnp.concatenate([prompt, position_ids + self.length], axis=1)
    return x, valid, position_ids, self.length


def _as_tuple(ids: Optional[Sequence]) -> Optional[tuple]:
  if ids is None:
    return None
  ids = np.asarray(ids)
  return tuple(int(i) for i in ids) if ids.ndim == 1 else tuple(tuple(int(i) for i in r) for r in ids)


@registry.register
@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(registry.PeftMethod):
  """Prompt tuning: `length` soft-prompt vectors per task, initialised from the embedding
  rows of `init_token_ids` ([length] or [num_tasks, length]) or of ids drawn with
  `init_seed` from `INIT_VOCAB_RANGE`."""

  name = "prompt_tuning"
  trainable_patterns = TRAINABLE_PATTERNS
  supports_mixed_tasks = True
  description = "Prompt tuning: a soft prompt before the input"

  length: int = 100
  init_seed: int = 0
  init_token_ids: Optional[tuple] = None

  def validate(self) -> None:
    self.require_positive_int("length")

  def blocks(self, config: Optional[Any], base: network.Blocks,
             num_tasks: int = 1) -> network.Blocks:
    """`base` whose encoder (decoder-only: stack) prepends the prompts; with `config` the
    init ids are checked now (else at model init)."""
    self.check_num_tasks(num_tasks)
    if config is not None:
      try:
        prompt_init_ids(config.vocab_size, self.length, num_tasks, init_seed=self.init_seed,
                        init_token_ids=self.init_token_ids)
      except ValueError as e:
        raise self.invalid("init_token_ids", str(e)) from None
    field, cls = (("decoder", PromptDecoderStack) if isinstance(base, decoder.DecoderBlocks)
                  else ("encoder", PromptEncoder))
    return base.replace(**{field: functools.partial(
        cls, length=self.length, num_tasks=int(num_tasks), init_seed=int(self.init_seed),
        init_token_ids=_as_tuple(self.init_token_ids))})


def prompt_tuning_blocks(config: Optional[Any] = None, *, num_tasks: int = 1,
                         base: Optional[network.Blocks] = None,
                         **hyperparameters: Any) -> network.Blocks:
  """`base` (default: the blocks of `config`'s family, else T5's) with
  prompt tuning (`PromptTuningConfig` fields)."""
  return PromptTuningConfig(**hyperparameters).blocks(
      config, registry.base_blocks(config, base), num_tasks)


def prompt_vectors(params: Params, config: T5Config, *, length: int = 100, num_tasks: int = 1,
                   init_seed: int = 0, init_token_ids: Optional[Sequence] = None,
                   **unused) -> Array:
  """The effective prompts `[num_tasks, P, E]`: init rows of the embedding plus the delta.

  Takes the keyword arguments given to `prompt_tuning_blocks`.
  """
  del unused
  ids = prompt_init_ids(config.vocab_size, length, num_tasks, init_seed=init_seed,
                        init_token_ids=init_token_ids)
  stack = "encoder" if PARAM in params.get("encoder", {}) else "decoder"
  delta = params[stack][PARAM]
  if delta.shape != ids.shape + (config.emb_dim,):
    raise ValueError(f"prompt_vectors: {stack}/{PARAM} has shape {delta.shape}; expected "
                     f"{ids.shape + (config.emb_dim,)} (same length/num_tasks as the model?)")
  embedding = jnp.asarray(params["token_embedder"]["embedding"])
  return jnp.take(embedding, jnp.asarray(ids, jnp.int32), axis=0) + delta
