"""Sequence scoring and rank classification (inputs once per example), and the eval loop.

Rank classification (docs/design.md): each example has C answer choices; every
choice is scored by the model's log-likelihood of its target tokens given the
input, s_n = sum_t log p(y_t^(n) | x, y_<t^(n)), optionally divided by its
length T_n (T-Few default), and the prediction is the argmax, ties going to
the first choice. The encoder runs once per example, and the decoder scores
all C choices (or `max_choices_per_step` of them at a time, to bound memory)
in one batch against it: grouped cross-attention projects each example's
encoder output to keys and values once for all its choices. A decoder-only
model (`decoder_scoring`) runs each prompt once and scores the choices as
continuations of its key/value cache.

Batch layout (from `feature_converters.RankClassificationFeatureConverter`):
  encoder_input_tokens [B, L], choice_tokens [B, C, T] (decoder targets, EOS
  included, 0-padded; shifted right here), choice_mask [B, C], label [B],
  optional task_id [B], template_id [B], example_mask [B] (0 = padding row).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ia3_jax.data import features
from ia3_jax.model import families, network
from ia3_jax.objectives import decoder_scoring, losses, metrics

Array = jax.Array
Batch = Mapping[str, Any]



# ---------------------------------------------------------------------------
# Per-token log-probabilities of every choice (shared with the train step).
# ---------------------------------------------------------------------------


def _check_batch(batch: Batch) -> tuple[int, int, int]:
  for key in features.TOKEN_FEATURES:
    if key not in batch:
      raise ValueError(f"batch has no {key!r} feature (has: {sorted(batch)})")
  enc, choices = batch["encoder_input_tokens"], batch["choice_tokens"]
  if enc.ndim != 2:
    raise ValueError(f"batch['encoder_input_tokens'] must be [B, L], got shape {enc.shape}")
  if choices.ndim != 3 or choices.shape[0] != enc.shape[0]:
    raise ValueError(f"batch['choice_tokens'] must be [B, C, T] with B = {enc.shape[0]}, "
                     f"got shape {choices.shape}")
  b, c, t = choices.shape
  if "choice_mask" in batch and batch["choice_mask"].shape != (b, c):
    raise ValueError(f"batch['choice_mask'] shape {batch['choice_mask'].shape} "
                     f"!= [B, C] = {(b, c)}")
  if batch.get("task_id") is not None and batch["task_id"].shape != (b,):
    raise ValueError(f"batch['task_id'] shape {batch['task_id'].shape} != [B] = {(b,)}")
  return b, c, t


def _chunk_size(k: Any) -> int:
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"max_choices_per_step must be a positive int or None, got {k!r}")
  return int(k)


def _fold_rngs(rngs: Optional[Mapping[str, Array]], index: Any) -> Optional[dict]:
  """A distinct stream per decoder call (index 0 is kept for the encoder)."""
  if rngs is None:
    return None
  return {name: jax.random.fold_in(key, index) for name, key in rngs.items()}


def _encode_prompt(model: network.Transformer, params: Any, inputs: Array,
                   task_id: Optional[Array], enable_dropout: bool,
                   rngs: Optional[dict]) -> tuple[Array, Array]:
  """The T5 context of the choices: (encoder output, input validity)."""
  return model.apply({"params": params}, inputs, task_id=task_id,
                     enable_dropout=enable_dropout, rngs=rngs, method=network.Transformer.encode)


def _decode_choices(model: network.Transformer, params: Any, context: tuple[Array, Array],
                    task_id: Optional[Array], targets: Array, enable_dropout: bool,
                    rngs: Optional[dict]) -> Array:
  """log p of targets [B, k, T] against one encoder output per example -> [B, k, T].

  The k choices of example b are decoder rows b*k .. b*k + k - 1 against the
  unrepeated encoder output (grouped cross-attention of
  `network.Transformer.decode`): each example's cross-attention keys and
  values are computed once, not k times, with the same result as repeating
  `encoded` k times.
  """
  encoded, valid = context
  b, k, t = targets.shape
  flat = targets.reshape(b * k, t)
  logits = model.apply(
      {"params": params}, encoded, valid, network.shift_right(flat), flat,
      task_id=None if task_id is None else jnp.repeat(task_id, k),
      enable_dropout=enable_dropout, rngs=rngs, method=network.Transformer.decode)
  return losses.token_log_probs(logits, flat).reshape(b, k, t)


# family name -> (context of the choices from the inputs, log p of k choices per example
# against it); `families.of` tells the families apart.
_SCORERS = {
    families.T5.name: (_encode_prompt, _decode_choices),
    families.DECODER_ONLY.name: (decoder_scoring.prompt_context,
                                 decoder_scoring.choice_log_probs_from),
}


def choice_log_probs(model: Any, params: Any, batch: Batch, *,
                     max_choices_per_step: Optional[int] = None, enable_dropout: bool = False,
                     rngs: Optional[Mapping[str, Array]] = None) -> Array:
  """Per-token log-probabilities [B, C, T] (float32) of every choice's target tokens.

  Pure and jit/grad-friendly. The inputs run once per example: T5's encoder, or a
  decoder-only model's prompt pass (`decoder_scoring`: the choices continue its
  key/value cache). With `max_choices_per_step = k < C`, choices are decoded k at a
  time (`lax.map` over ceil(C / k) chunks, the last one padded with empty
  choices) and each chunk is rematerialised under `jax.grad`
  (`jax.checkpoint`), so decoder activations for only B * k sequences are
  alive at once, in the forward and in the backward pass.

  Padding positions (choice_tokens == 0) and padding choices get arbitrary
  finite values: mask them (`losses.choice_token_mask`). `task_id` is passed
  to the model when the batch has one. With `enable_dropout`, `rngs` (e.g.
  {"dropout": key}) is required; the encoder and each decoder chunk draw
  from distinct streams folded from it.
  """
  b, c, t = _check_batch(batch)
  k = c if max_choices_per_step is None else min(_chunk_size(max_choices_per_step), c)
  if enable_dropout and not rngs:
    raise ValueError("choice_log_probs: enable_dropout=True needs rngs, e.g. {'dropout': key}")
  context_fn, decode_fn = _SCORERS[families.of(model).name]
  task_id = batch.get("task_id")
  choices = jnp.asarray(batch["choice_tokens"])
  context = context_fn(model, params, batch["encoder_input_tokens"], task_id, enable_dropout,
                       _fold_rngs(rngs, 0))

  if k == c:
    return decode_fn(model, params, context, task_id, choices, enable_dropout,
                     _fold_rngs(rngs, 1))

  num_chunks = math.ceil(c / k)
  padded = jnp.pad(choices, ((0, 0), (0, num_chunks * k - c), (0, 0)))
  chunks = padded.reshape(b, num_chunks, k, t).swapaxes(0, 1)  # [n, B, k, T]

  @jax.checkpoint
  def one_chunk(p, ctx, tid, keys, targets, index):
    return decode_fn(model, p, ctx, tid, targets, enable_dropout, _fold_rngs(keys, index + 1))

  rngs = None if rngs is None else dict(rngs)
  logp = jax.lax.map(lambda xs: one_chunk(params, context, task_id, rngs, *xs),
                     (chunks, jnp.arange(num_chunks)))       # [n, B, k, T]
  return logp.swapaxes(0, 1).reshape(b, num_chunks * k, t)[:, :c]


# ---------------------------------------------------------------------------
# Rank classification.
# ---------------------------------------------------------------------------


def predict(scores: Array) -> Array:
  """argmax over choices [B, C] -> [B]; ties go to the first choice (jnp.argmax)."""
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def rank_classify(model: Any, params: Any, batch: Batch, *,
                  length_normalize: bool = True,
                  max_choices_per_step: Optional[int] = None) -> dict[str, Array]:
  """Scores [B, C] (s_n, or s_n / T_n when length-normalised; -inf for padding
  choices) and predictions [B] (argmax, ties to the first choice)."""
  b, c, _ = _check_batch(batch)
  logp = choice_log_probs(model, params, batch, max_choices_per_step=max_choices_per_step)
  choice_mask = batch.get("choice_mask")
  if choice_mask is None:
    choice_mask = jnp.ones((b, c), jnp.int32)
  token_mask = losses.choice_token_mask(batch["choice_tokens"], choice_mask)
  scores = losses.choice_scores(logp, token_mask, length_normalize)
  return {"scores": scores, "predictions": predict(scores)}


def model_inputs(batch: Batch) -> dict[str, Any]:
  """The features `rank_classify` reads (host-only features would retrigger jit)."""
  return {k: batch[k] for k in features.MODEL_FEATURES if batch.get(k) is not None}


class RankClassifier:
  """`rank_classify` under `jax.jit`: one compilation per batch shape.

  Only the model features of a batch enter the jitted function, so extra
  host features (ids, lengths, labels) neither retrace nor move to device.
  `num_traces` counts Python traces (each is followed by one compilation);
  it stays at 1 while the batch shapes stay the same.
  """

  def __init__(self, model: Any, *, length_normalize: bool = True,
               max_choices_per_step: Optional[int] = None):
    self.model = model
    self.length_normalize = length_normalize
    self.max_choices_per_step = max_choices_per_step
    self.num_traces = 0

    def classify(params, batch):
      self.num_traces += 1  # runs only while tracing
      return rank_classify(model, params, batch, length_normalize=length_normalize,
                           max_choices_per_step=max_choices_per_step)

    self._jitted = jax.jit(classify)

  def __call__(self, params: Any, batch: Batch) -> dict[str, Array]:
    return self._jitted(params, model_inputs(batch))

  def cache_size(self) -> int:
    """Number of compiled executables held by jit (private jax API; for checks)."""
    return self._jitted._cache_size()


# ---------------------------------------------------------------------------
# Sequence scoring (T5X `score_batch` semantics).
# ---------------------------------------------------------------------------


def _score(model: network.Transformer, params: Any, encoder_input_tokens: Array,
           targets: Array, task_id: Optional[Array] = None) -> Array:
  logits = model.apply({"params": params}, encoder_input_tokens, network.shift_right(targets),
                       targets, task_id=task_id)
  logp = losses.token_log_probs(logits, targets)
  return jnp.sum(jnp.where(targets > 0, logp, 0.0), axis=-1)


_score_jit = jax.jit(_score, static_argnums=0)


def score(model: network.Transformer, params: Any, encoder_input_tokens: Array, targets: Array,
          task_id: Optional[Array] = None) -> Array:
  """Summed log-likelihood [B] of `targets` [B, T] given the inputs [B, L] (jitted).

  As T5X `score_batch`: decoder inputs are the targets shifted right, and the
  sum runs over target tokens with weight targets > 0 (EOS counts, padding
  does not).
  """
  if encoder_input_tokens.ndim != 2 or targets.ndim != 2 or (
      encoder_input_tokens.shape[0] != targets.shape[0]):
    raise ValueError(f"score: encoder_input_tokens {encoder_input_tokens.shape} and targets "
                     f"{targets.shape} must be [B, L] and [B, T]")
  return _score_jit(model, params, encoder_input_tokens, targets, task_id)


# ---------------------------------------------------------------------------
# The evaluation loop.
# ---------------------------------------------------------------------------


def _pad_rows(inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Appends all-zero rows (empty inputs, no choices) up to `rows`."""
  return {k: np.concatenate([v, np.zeros((rows - v.shape[0],) + v.shape[1:], v.dtype)])
          for k, v in inputs.items()}


def evaluate(model: Any, params: Any, batches: Iterable[Batch], *,
             length_normalize: bool = True, max_choices_per_step: Optional[int] = None,
             classifier: Optional[RankClassifier] = None, progress: bool = True,
             desc: str = "eval", total: Optional[int] = None,
             return_predictions: bool = False, per_task: bool = False) -> dict[str, Any]:
  """Rank-classification accuracy over `batches` (`evaluate_counts(...).as_dict()`).

  Returns:
    dict(accuracy, num_correct, num_examples, num_unlabelled, num_batches,
    num_identical_choices (counted rows whose answer choices cannot be told apart),
    per_template {template_id: dict(accuracy, num_correct, num_examples)} when
    batches carry template_id >= 0, and with `return_predictions` the
    predictions, labels and scores of the counted rows, in order). With
    `per_task`, also per_task {task_id: dict(accuracy, num_correct, num_examples,
    per_template)}, grouped by the batches' `task_id` (mixed-task batches).
  """
  counts, kept = evaluate_counts(
      model, params, batches, length_normalize=length_normalize,
      max_choices_per_step=max_choices_per_step, classifier=classifier, progress=progress,
      desc=desc, total=total, per_task=per_task, keep_predictions=return_predictions)
  result = counts.as_dict(per_task=per_task)
  if return_predictions:
    result.update({k: np.concatenate(v) if v else np.zeros((0,)) for k, v in kept.items()})
  return result


def evaluate_counts(model: Any, params: Any, batches: Iterable[Batch], *,
                    length_normalize: bool = True, max_choices_per_step: Optional[int] = None,
                    classifier: Optional[RankClassifier] = None, progress: bool = True,
                    desc: str = "eval", total: Optional[int] = None, per_task: bool = False,
                    keep_predictions: bool = False
                    ) -> tuple[metrics.EvalCounts, dict[str, list[np.ndarray]]]:
  """(`metrics.EvalCounts` of `batches`, the counted rows' predictions, labels and scores
  per batch when `keep_predictions`).

  Rows with example_mask == 0 are skipped; rows with label < 0 (unlabelled)
  are skipped and counted in `num_unlabelled`. A batch with fewer rows than
  the first one (the final partial batch) is padded with empty rows so the
  jitted classifier is not compiled again. `per_task`: every batch must carry `task_id`.
  """
  classifier = classifier or RankClassifier(
      model, length_normalize=length_normalize, max_choices_per_step=max_choices_per_step)
  rows = None
  counts = metrics.EvalCounts()
  kept: dict[str, list[np.ndarray]] = {"predictions": [], "labels": [], "scores": []}
  for batch in tqdm(batches, desc=desc, total=total, disable=not progress):
    counts.num_batches += 1
    inputs = {k: np.asarray(v) for k, v in model_inputs(batch).items()}
    b, c, _ = _check_batch(inputs)
    if "label" not in batch:
      raise ValueError(f"evaluate: batch {counts.num_batches} has no 'label' feature")
    labels = np.asarray(batch["label"])
    mask = np.asarray(batch.get("example_mask", np.ones((b,), bool))).astype(bool)
    if labels.shape != (b,) or mask.shape != (b,):
      raise ValueError(f"evaluate: batch {counts.num_batches}: label {labels.shape} and "
                       f"example_mask {mask.shape} must be [B] = {(b,)}")
    if per_task and "task_id" not in batch:
      raise ValueError(f"evaluate(per_task=True): batch {counts.num_batches} has no 'task_id'")
    rows = b if rows is None else rows
    out = classifier(params, _pad_rows(inputs, rows) if b < rows else inputs)
    predictions = np.asarray(out["predictions"])[:b]
    counts.num_unlabelled += int(np.sum(mask & (labels < 0)))
    mask &= labels >= 0
    counts.num_identical_choices += int(np.sum(features.identical_choices(
        inputs["choice_tokens"], inputs.get("choice_mask", np.ones((b, c), np.int32)))[mask]))
    counts.add(predictions, labels, mask, batch.get("task_id") if per_task else None,
               batch.get("template_id"))
    if keep_predictions:
      kept["predictions"].append(predictions[mask])
      kept["labels"].append(labels[mask])
      kept["scores"].append(np.asarray(out["scores"])[:b][mask])
  return counts, kept
