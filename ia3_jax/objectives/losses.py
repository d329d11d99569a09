"""T-Few losses for rank-classification training, and the plain LM loss.

Everything here is a pure function of arrays: safe under `jax.jit`, `jax.grad`
and `jax.vmap`, with no Python control flow on traced values.

Choice-shaped inputs (what the rank-classification feature converter yields):

  choice_logp    [B, C, T] float  log p(y_t^(n) | x, y_<t^(n)) of each choice's
                                  target tokens (see `token_log_probs`).
  choice_tokens  [B, C, T] int    target token ids; 0 = padding. EOS (id 1) is a
                                  real target token.
  choice_mask    [B, C]    0/1    1 = real choice, 0 = padding choice.
  label          [B]       int    index of the correct choice.
  example_mask   [B]       0/1    optional; 0 removes a row (padded rows of a
                                  final partial batch) from every term.

Token mask = (choice_tokens > 0) & choice_mask[..., None]. With it, for every
example with correct choice c (docs/design.md, "T-Few losses"):

  s_n  = sum_t log p(y_t^(n))          T_n = number of target tokens
  L_LM = -sum_{b,t} log p(y_t^(c_b)) / sum_b T_{c_b}       (pooled over batch)
  L_UL = -sum_{b, n != c_b, t} log(1 - p(y_t^(n))) / sum_{b, n != c_b} T_n
  L_LN = mean_b [ -beta_c + logsumexp_n beta_n ],   beta_n = s_n / T_n^alpha

  L = lm_weight * L_LM + ul_weight * L_UL + ln_weight * L_LN   (T-Few: 1, 1, 1)

Rows are dropped from every term (and counted in the metrics) when
example_mask is 0 or when their label is out of range or points at a padding
choice; a choice with no target tokens is treated as a padding choice.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Weight = Union[float, Array]

PAD_ID = 0
EOS_ID = 1

# log p is clamped to at most this value before computing log(1 - p): keeps
# log(1 - p) finite (>= about -83) when p rounds to exactly 1 in float32.
_MAX_LOGP = -1e-36
_LOG_HALF = -math.log(2.0)


# ---------------------------------------------------------------------------
# Per-token log-probabilities.
# ---------------------------------------------------------------------------


@jax.custom_vjp
def _target_log_probs(logits: Array, targets: Array) -> tuple[Array, Array]:
  """(log p(target), log Z) over the last axis of float32 logits.

  The usual `z_t - max - log(sum exp(z - max))` rounds `log(1 + eps)` to 0 for
  eps < 6e-8 in float32, so a near-certain token gets log p = 0 exactly, and
  its gradient 1 - p cancels to 0. Here the sum leaves out (one copy of) the
  maximum and uses log1p, so log p of a near-certain target is -eps, and the
  gradient at the target is -expm1(log p) = eps, not 1 + eps - 1: that is
  what keeps the unlikelihood gradient right as p -> 1. Only reductions and
  elementwise ops over V, in forms XLA:CPU runs as vectorised multi-threaded
  library reductions (no argmax, no compare-and-select); no one-hot.
  """
  return _target_log_probs_fwd(logits, targets)[0]


def _target_log_probs_fwd(logits: Array, targets: Array):
  targets = targets[..., None].astype(jnp.int32)
  maximum = jnp.max(logits, axis=-1, keepdims=True)
  x = logits - maximum
  # -sign(x) is 1 below the maximum and 0 at it (x == 0), so this sums the
  # non-maximal terms exactly, without a 1 + eps rounding.
  rest = jnp.sum(-jnp.sign(x) * jnp.exp(x), axis=-1)
  # Ties at the maximum add 1 each, all but one: their count is the full sum
  # minus `rest`, an integer. A second reduction, behind a barrier: XLA:CPU
  # would otherwise merge the two into one slow multi-output loop.
  logits_b, maximum_b = jax.lax.optimization_barrier((logits, maximum))
  ties = jnp.round(jnp.sum(jnp.exp(logits_b - maximum_b), axis=-1) - rest)
  log1p_rest = jnp.log1p(rest + (ties - 1.0))
  target_logit = jnp.take_along_axis(logits, targets, axis=-1)[..., 0]
  # The target at the maximum: z_t - max = 0 exactly, so log p = -log1p(rest).
  logp = (target_logit - maximum[..., 0]) - log1p_rest
  log_z = maximum[..., 0] + log1p_rest
  return (logp, log_z), (logits, targets, logp, log_z)


def _target_log_probs_bwd(residuals, cotangents):
  """d log p_t / dz = onehot(t) - softmax(z), d log Z / dz = softmax(z); at the
  target 1 - p_t is taken as -expm1(log p_t), exact as p_t -> 1."""
  logits, targets, logp, log_z = residuals
  g_logp, g_logz = cotangents
  probs = jnp.exp(logits - log_z[..., None])
  grad = (g_logz - g_logp)[..., None] * probs
  at_target = g_logp * -jnp.expm1(logp) + g_logz * jnp.exp(logp)
  return jnp.put_along_axis(grad, targets, at_target[..., None], axis=-1, inplace=False), None


_target_log_probs.defvjp(_target_log_probs_fwd, _target_log_probs_bwd)


def token_log_probs(logits: Array, targets: Array) -> Array:
  """log p(target) under softmax(logits), in float32.

  Args:
    logits: [..., T, V] float (any float dtype; cast to float32 here).
    targets: [..., T] int token ids in [0, V).

  Returns:
    [..., T] float32 log-probabilities of the targets (padding positions are
    computed like any other; mask them downstream).
  """
  if logits.ndim != targets.ndim + 1 or logits.shape[:-1] != targets.shape:
    raise ValueError(f"token_log_probs: logits shape {logits.shape} must be targets shape "
                     f"{targets.shape} plus a vocabulary axis")
  return _target_log_probs(logits.astype(jnp.float32), targets)[0]


def log1mexp(x: Array) -> Array:
  """log(1 - exp(x)) for x <= 0, stable near x = 0 and for x << 0.

  Uses log(-expm1(x)) for x > -log 2 and log1p(-exp(x)) otherwise (Maechler
  2012). Both branches get safe inputs so gradients are never NaN; x is first
  clamped to <= _MAX_LOGP so x = 0 (p == 1 in float32) gives a finite value.
  """
  x = jnp.minimum(x, _MAX_LOGP)
  near_zero = x > _LOG_HALF
  x_near = jnp.where(near_zero, x, _LOG_HALF)
  x_far = jnp.where(near_zero, _LOG_HALF, x)
  return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


# ---------------------------------------------------------------------------
# Masks and scores.
# ---------------------------------------------------------------------------


def choice_token_mask(choice_tokens: Array, choice_mask: Array) -> Array:
  """[B, C, T] bool: real target tokens (non-padding, in a real choice)."""
  return (choice_tokens > PAD_ID) & (choice_mask[..., None] > 0)


def choice_scores(choice_logp: Array, token_mask: Array, length_normalize: bool,
                  *, alpha: float = 1.0) -> Array:
  """Rank-classification scores [B, C]: s_n, or s_n / T_n**alpha when length-normalised.

  Choices without target tokens (padding choices) score -inf, so argmax and
  softmax ignore them.
  """
  token_mask = token_mask.astype(bool)
  logp = jnp.where(token_mask, choice_logp.astype(jnp.float32), 0.0)
  scores = jnp.sum(logp, axis=-1)
  lengths = jnp.sum(token_mask, axis=-1)
  if length_normalize:
    scores = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** alpha
  return jnp.where(lengths > 0, scores, -jnp.inf)


# ---------------------------------------------------------------------------
# T-Few terms.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Batch:
  """Masks shared by the three terms."""
  logp: Array          # [B, C, T] float32, 0 where masked
  token_mask: Array    # [B, C, T] bool, real tokens of valid rows
  correct: Array       # [B, C] bool, the labelled choice of a valid row
  row_valid: Array     # [B] bool
  num_invalid_labels: Array  # scalar int32: rows dropped for a bad label


def _prepare(choice_logp: Array, choice_tokens: Array, choice_mask: Array, label: Array,
             example_mask: Optional[Array]) -> _Batch:
  if choice_logp.ndim != 3 or choice_tokens.shape != choice_logp.shape:
    raise ValueError(f"choice_logp {choice_logp.shape} and choice_tokens {choice_tokens.shape} "
                     "must both be [B, C, T]")
  batch, num_choices, _ = choice_logp.shape
  if choice_mask.shape != (batch, num_choices):
    raise ValueError(f"choice_mask shape {choice_mask.shape} != [B, C] = {(batch, num_choices)}")
  if label.shape != (batch,):
    raise ValueError(f"label shape {label.shape} != [B] = {(batch,)}")
  if example_mask is None:
    example_mask = jnp.ones((batch,), bool)
  elif example_mask.shape != (batch,):
    raise ValueError(f"example_mask shape {example_mask.shape} != [B] = {(batch,)}")

  token_mask = choice_token_mask(choice_tokens, choice_mask)
  real_choice = jnp.any(token_mask, axis=-1)                        # [B, C]
  correct = jnp.arange(num_choices)[None, :] == label[:, None]     # all False if out of range
  label_ok = jnp.any(correct & real_choice, axis=-1)               # [B]
  in_batch = example_mask > 0
  row_valid = in_batch & label_ok
  token_mask = token_mask & row_valid[:, None, None]
  logp = jnp.where(token_mask, choice_logp.astype(jnp.float32), 0.0)
  return _Batch(logp=logp, token_mask=token_mask, correct=correct & row_valid[:, None],
                row_valid=row_valid,
                num_invalid_labels=jnp.sum(in_batch & ~label_ok).astype(jnp.int32))


def _lm_sum(b: _Batch) -> tuple[Array, Array]:
  mask = b.token_mask & b.correct[..., None]
  return -jnp.sum(jnp.where(mask, b.logp, 0.0)), jnp.sum(mask)


def _ul_sum(b: _Batch, ul_epsilon: float) -> tuple[Array, Array]:
  mask = b.token_mask & ~b.correct[..., None]
  # Masked positions get a harmless stand-in so neither branch sees log(0).
  logp = jnp.where(mask, b.logp, -1.0)
  if ul_epsilon > 0:
    log_not_p = jnp.log(1.0 - jnp.exp(logp) + ul_epsilon)
  else:
    log_not_p = log1mexp(logp)
  return -jnp.sum(jnp.where(mask, log_not_p, 0.0)), jnp.sum(mask)


def _ln_per_example(b: _Batch, alpha: float) -> Array:
  beta = choice_scores(b.logp, b.token_mask, length_normalize=True, alpha=alpha)
  # Dropped rows would be all -inf: give them a finite stand-in (masked below).
  beta = jnp.where(b.row_valid[:, None], beta, 0.0)
  beta_correct = jnp.sum(jnp.where(b.correct, beta, 0.0), axis=-1)
  per_example = jax.nn.logsumexp(beta, axis=-1) - beta_correct
  return jnp.where(b.row_valid, per_example, 0.0)


def _ratio(total: Array, count: Array) -> Array:
  return total / jnp.maximum(count, 1).astype(jnp.float32)


def lm_loss(choice_logp: Array, choice_tokens: Array, choice_mask: Array, label: Array,
            example_mask: Optional[Array] = None) -> Array:
  """L_LM: token cross-entropy on the correct choice, sum over the batch / its token count."""
  b = _prepare(choice_logp, choice_tokens, choice_mask, label, example_mask)
  return _ratio(*_lm_sum(b))


def unlikelihood_loss(choice_logp: Array, choice_tokens: Array, choice_mask: Array,
                      label: Array, example_mask: Optional[Array] = None, *,
                      ul_epsilon: float = 0.0) -> Array:
  """L_UL: -log(1 - p) on every token of every incorrect choice, / their total count.

  Deviation from the T-Few repo (src/models/EncoderDecoder.py): the repo
  computes -log(1 - exp(logp) + 0.01); we compute -log(1 - p) exactly with a
  stable log1p/expm1 form (`log1mexp`), so the term and its gradient stay
  finite and correct as p -> 1 (for p = 1 - 1e-9 the gradient w.r.t. the
  logits is O(1), where the repo's +0.01 makes it ~1e-7; feed log-probs
  from `token_log_probs`, which keeps log p = -1e-9 instead of rounding it to
  0). Only past 1 - p < 1e-36 (a logit gap of ~83) does the float32 term
  saturate at ~83 with zero gradient.

  `ul_epsilon=0.01` reproduces the repo's per-token arithmetic on real
  tokens. The repo also sums -log(1.01) over every masked position (padding,
  and the correct choice, whose log-probs it sets to -100) before dividing;
  that constant shifts the logged value but has no gradient, and is not
  reproduced here. ul_epsilon must be a static Python float.
  """
  if ul_epsilon < 0:
    raise ValueError(f"ul_epsilon must be >= 0, got {ul_epsilon}")
  b = _prepare(choice_logp, choice_tokens, choice_mask, label, example_mask)
  return _ratio(*_ul_sum(b, ul_epsilon))


def length_normalized_loss(choice_logp: Array, choice_tokens: Array, choice_mask: Array,
                           label: Array, example_mask: Optional[Array] = None, *,
                           alpha: float = 1.0) -> Array:
  """L_LN: softmax cross-entropy over choices of s_n / T_n**alpha, mean over examples."""
  b = _prepare(choice_logp, choice_tokens, choice_mask, label, example_mask)
  return _ratio(jnp.sum(_ln_per_example(b, alpha)), jnp.sum(b.row_valid))


def _weighted(weight: Weight, term: Array) -> Array:
  """weight * term; a static zero weight drops the term (no 0 * inf, no gradient)."""
  if isinstance(weight, (int, float)) and weight == 0:
    return jnp.zeros((), jnp.float32)
  return weight * term


def tfew_loss(choice_logp: Array, choice_tokens: Array, choice_mask: Array, label: Array,
              example_mask: Optional[Array] = None, *, lm_weight: Weight = 1.0,
              ul_weight: Weight = 1.0, ln_weight: Weight = 1.0, alpha: float = 1.0,
              ul_epsilon: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """The T-Few objective lm_weight * L_LM + ul_weight * L_UL + ln_weight * L_LN.

  Weights may be Python numbers or traced scalars; a Python 0 removes the term
  from the loss and its gradient (it is still reported in the metrics, with
  its gradient stopped). alpha and ul_epsilon (see `unlikelihood_loss`) are
  static Python floats.

  Returns:
    (loss, metrics) with metrics: loss, lm_loss, ul_loss, ln_loss,
    accuracy (length-normalised argmax, ties to the first choice, over valid
    rows), num_examples (valid rows), num_invalid_labels (rows dropped because
    the label is out of range or names a padding choice), num_correct_tokens,
    num_incorrect_tokens.
  """
  if ul_epsilon < 0:
    raise ValueError(f"ul_epsilon must be >= 0, got {ul_epsilon}")
  b = _prepare(choice_logp, choice_tokens, choice_mask, label, example_mask)
  lm_total, lm_count = _lm_sum(b)
  ul_total, ul_count = _ul_sum(b, ul_epsilon)
  num_examples = jnp.sum(b.row_valid)
  lm = _ratio(lm_total, lm_count)
  ul = _ratio(ul_total, ul_count)
  ln = _ratio(jnp.sum(_ln_per_example(b, alpha)), num_examples)
  loss = _weighted(lm_weight, lm) + _weighted(ul_weight, ul) + _weighted(ln_weight, ln)

  scores = choice_scores(b.logp, b.token_mask, length_normalize=True, alpha=alpha)
  hit = jnp.any(b.correct & (jnp.arange(scores.shape[1]) == jnp.argmax(scores, axis=-1)[:, None]),
                axis=-1)
  metrics = {
      "loss": loss,
      "lm_loss": jax.lax.stop_gradient(lm),
      "ul_loss": jax.lax.stop_gradient(ul),
      "ln_loss": jax.lax.stop_gradient(ln),
      "accuracy": _ratio(jnp.sum(hit), num_examples),
      "num_examples": num_examples.astype(jnp.int32),
      "num_invalid_labels": b.num_invalid_labels,
      "num_correct_tokens": lm_count.astype(jnp.int32),
      "num_incorrect_tokens": ul_count.astype(jnp.int32),
  }
  return loss, metrics


# ---------------------------------------------------------------------------
# Plain LM objective (T5X semantics).
# ---------------------------------------------------------------------------


def cross_entropy_with_logits(logits: Array, targets: Array, weights: Optional[Array] = None,
                              *, z_loss: float = 0.0,
                              label_smoothing: float = 0.0) -> tuple[Array, Array, Array]:
  """Weighted token cross-entropy with optional z-loss and label smoothing.

  Same semantics as T5X `compute_weighted_cross_entropy` (our own code): the
  target distribution puts 1 - label_smoothing on the target and
  label_smoothing / (V - 1) on every other token; the entropy of that
  distribution is subtracted so a perfect prediction has loss 0; z_loss *
  log(Z)^2 is added per token (Z = softmax normaliser). Nothing is divided:
  the caller normalises (e.g. by weight_sum). The smoothed cross-entropy is
  computed from the target logit and the sum of all logits, so no [.., V]
  one-hot is built.

  Args:
    logits: [..., T, V] float (computed in float32).
    targets: [..., T] int.
    weights: [..., T] per-token weights, or None for all ones (as T5X).
    z_loss: coefficient of the auxiliary z-loss (>= 0).
    label_smoothing: in [0, 1).

  Returns:
    (loss_sum, z_loss_sum, weight_sum): loss_sum includes the z-loss;
    z_loss_sum is that part alone, for logging; weight_sum = sum of weights.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  if z_loss < 0:
    raise ValueError(f"z_loss must be >= 0, got {z_loss}")
  if logits.ndim != targets.ndim + 1 or logits.shape[:-1] != targets.shape:
    raise ValueError(f"cross_entropy_with_logits: logits shape {logits.shape} must be targets "
                     f"shape {targets.shape} plus a vocabulary axis")
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  target_logp, log_z = _target_log_probs(logits, targets)
  if label_smoothing > 0:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    sum_logp = jnp.sum(logits, axis=-1) - vocab * log_z
    cross_entropy = -((confidence - low) * target_logp + low * sum_logp)
    entropy = -(confidence * math.log(confidence) + label_smoothing * math.log(low))
    cross_entropy = cross_entropy - entropy
  else:
    cross_entropy = -target_logp
  token_z_loss = z_loss * jnp.square(log_z)
  token_loss = cross_entropy + token_z_loss
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  return jnp.sum(token_loss * weights), jnp.sum(token_z_loss * weights), jnp.sum(weights)


# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss settings the trainer builds (gin binds it at the edges).

  T-Few: lm_weight = ul_weight = ln_weight = 1, alpha = 1. The z_loss and
  label_smoothing fields apply to the plain LM objective
  (`cross_entropy_with_logits`, e.g. multitask (IA)^3 pre-training).
  ul_epsilon = 0.01 gives the T-Few repo's unlikelihood arithmetic.
  """

  lm_weight: float = 1.0
  ul_weight: float = 1.0
  ln_weight: float = 1.0
  alpha: float = 1.0
  z_loss: float = 0.0
  label_smoothing: float = 0.0
  ul_epsilon: float = 0.0

  def __post_init__(self):
    for name in ("lm_weight", "ul_weight", "ln_weight", "alpha", "z_loss", "ul_epsilon"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"LossConfig.{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(self.label_smoothing, (int, float)) or not 0 <= self.label_smoothing < 1:
      raise ValueError(f"LossConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")

  def choice_loss(self, choice_logp: Array, choice_tokens: Array, choice_mask: Array,
                  label: Array, example_mask: Optional[Array] = None
                  ) -> tuple[Array, dict[str, Array]]:
    """`tfew_loss` with this config's weights, alpha and ul_epsilon."""
    return tfew_loss(choice_logp, choice_tokens, choice_mask, label, example_mask,
                     lm_weight=self.lm_weight, ul_weight=self.ul_weight,
                     ln_weight=self.ln_weight, alpha=self.alpha, ul_epsilon=self.ul_epsilon)

  def lm_loss(self, logits: Array, targets: Array, weights: Optional[Array] = None
              ) -> tuple[Array, Array, Array]:
    """`cross_entropy_with_logits` with this config's z_loss and label_smoothing."""
    return cross_entropy_with_logits(logits, targets, weights, z_loss=self.z_loss,
                                     label_smoothing=self.label_smoothing)
