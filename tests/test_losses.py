"""Tests for ia3_jax.objectives.losses against a NumPy implementation written from the formulas."""

import functools
import math

import jax
import mpmath  # ships with torch (via sympy), a test dependency
import jax.numpy as jnp
import numpy as np
import pytest

from ia3_jax.objectives import losses
from tests import tolerances

B, C, T, V = 5, 4, 7, 11


# ---------------------------------------------------------------------------
# NumPy references (float64, loops, straight from docs/design.md "T-Few losses").
# ---------------------------------------------------------------------------


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_logsumexp(x):
  x = np.asarray(x, np.float64)
  m = x.max()
  return m + math.log(np.exp(x - m).sum())


def np_tfew(logp, tokens, cmask, label, emask=None, alpha=1.0, ul_epsilon=0.0):
  """Returns dict of lm, ul, ln and token counts, computed example by example."""
  logp = np.asarray(logp, np.float64)
  nb, nc, _ = logp.shape
  emask = np.ones(nb) if emask is None else emask
  lm_num = lm_den = ul_num = ul_den = 0.0
  ln_terms = []
  for b in range(nb):
    if not emask[b]:
      continue
    betas, correct_beta = [], None
    for c in range(nc):
      if not cmask[b, c]:
        continue
      positions = [t for t in range(tokens.shape[2]) if tokens[b, c, t] != 0]
      if not positions:
        continue
      lp = logp[b, c, positions]
      if c == label[b]:
        lm_num -= lp.sum()
        lm_den += len(positions)
      else:
        if ul_epsilon:
          ul_num -= np.log(1.0 - np.exp(lp) + ul_epsilon).sum()
        else:
          ul_num -= np.log(-np.expm1(lp)).sum()
        ul_den += len(positions)
      beta = lp.sum() / len(positions) ** alpha
      betas.append(beta)
      if c == label[b]:
        correct_beta = beta
    ln_terms.append(np_logsumexp(betas) - correct_beta)
  return dict(lm=lm_num / lm_den, ul=ul_num / ul_den, ln=float(np.mean(ln_terms)),
              lm_tokens=lm_den, ul_tokens=ul_den, examples=len(ln_terms))


def np_cross_entropy(logits, targets, weights, z_loss, label_smoothing):
  logits = np.asarray(logits, np.float64)
  vocab = logits.shape[-1]
  conf = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  q = np.full(logits.shape, low)
  np.put_along_axis(q, targets[..., None], conf, axis=-1)
  entropy = -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)
  logz = np_logsumexp_last(logits)
  per_token = -(q * np_log_softmax(logits)).sum(-1) - entropy + z_loss * logz ** 2
  grad = (np.exp(np_log_softmax(logits)) * (1 + 2 * z_loss * logz)[..., None] - q) * weights[..., None]
  return (per_token * weights).sum(), (z_loss * logz ** 2 * weights).sum(), weights.sum(), grad


def np_logsumexp_last(x):
  m = x.max(-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


# ---------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------


def make_batch(seed, nb=B, nc=C, nt=T):
  """Random choices of different lengths, padding choices (with garbage tokens), EOS last."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((nb, nc, nt), np.int32)
  cmask = np.ones((nb, nc), np.int32)
  label = np.zeros(nb, np.int32)
  for b in range(nb):
    num_real = rng.integers(2, nc + 1)
    cmask[b, num_real:] = 0
    for c in range(nc):
      length = rng.integers(1, nt + 1)
      tokens[b, c, :length - 1] = rng.integers(2, V, length - 1)
      tokens[b, c, length - 1] = losses.EOS_ID
    label[b] = rng.integers(0, num_real)
  # Real-looking log-probs on real tokens, garbage (incl. p = 1) elsewhere.
  logp = np.log(rng.uniform(0.02, 0.98, (nb, nc, nt))).astype(np.float32)
  logp[tokens == 0] = rng.choice([0.0, -3.0, -1e4], size=int((tokens == 0).sum()))
  return logp, tokens, cmask, label


@pytest.fixture(scope="module")
def batch():
  return make_batch(0)


tfew_jit = jax.jit(losses.tfew_loss, static_argnames=("lm_weight", "ul_weight", "ln_weight",
                                                      "alpha", "ul_epsilon"))


# ---------------------------------------------------------------------------
# token_log_probs.
# ---------------------------------------------------------------------------


def test_token_log_probs_matches_numpy():
  rng = np.random.default_rng(1)
  logits = (rng.normal(size=(2, 3, 4, 50)) * 8).astype(np.float32)
  targets = rng.integers(0, 50, (2, 3, 4))
  got = jax.jit(losses.token_log_probs)(logits, targets)
  want = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
  assert got.shape == targets.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Gradient is onehot - softmax.
  grad = jax.grad(lambda z: losses.token_log_probs(z, targets).sum())(logits)
  onehot = np.eye(50)[targets]
  tolerances.assert_close(grad, onehot - np.exp(np_log_softmax(logits)), scale_tol=1e-6)


def test_token_log_probs_bf16_is_float32():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(3, 5, 40)) * 4, jnp.bfloat16)
  targets = rng.integers(0, 40, (3, 5))
  got = jax.jit(losses.token_log_probs)(logits, targets)
  assert got.dtype == jnp.float32
  want = np.take_along_axis(np_log_softmax(np.asarray(logits.astype(jnp.float32))),
                            targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_log_probs_keeps_precision_near_one():
  # p = 1 - 1e-9: the naive float32 log-softmax returns exactly 0 here.
  gap = math.log((1 - 1e-9) / 1e-9)
  logits = jnp.array([[gap, 0.0, -1.0]], jnp.float32)
  got = losses.token_log_probs(logits, jnp.array([0]))
  want = -math.log1p(math.exp(-gap) + math.exp(-gap - 1.0))
  np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_token_log_probs_with_ties_at_the_maximum():
  """Tied maxima (all-equal rows, as from a zero-initialised head; two-way ties with the
  target on and off them; a -inf logit): log p and its gradient onehot - softmax as NumPy's."""
  logits = np.array([[0.0] * 6,
                     [3.0, 3.0, 1.0, -2.0, 0.5, 3.0],
                     [3.0, 3.0, 1.0, -2.0, 0.5, 2.0],
                     [-np.inf, 7.0, 7.0, 1.0, 0.0, 0.0]], np.float32)
  targets = np.array([2, 5, 4, 2])
  got, grad = jax.jit(jax.value_and_grad(
      lambda z: losses.token_log_probs(z, targets).sum()))(logits)
  log_softmax = np_log_softmax(logits.astype(np.float64))
  want = np.take_along_axis(log_softmax, targets[:, None], -1)[:, 0]
  tolerances.assert_close(losses.token_log_probs(logits, targets), want, scale_tol=1e-6)
  tolerances.assert_close(got, want.sum(), scale_tol=1e-6)
  tolerances.assert_close(grad, np.eye(6)[targets] - np.exp(log_softmax), scale_tol=1e-6)


def test_token_log_probs_rejects_bad_shapes():
  with pytest.raises(ValueError, match="targets shape"):
    losses.token_log_probs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))


# ---------------------------------------------------------------------------
# T-Few terms vs NumPy.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_tfew_terms_match_numpy(batch, alpha):
  logp, tokens, cmask, label = batch
  want = np_tfew(logp, tokens, cmask, label, alpha=alpha)
  loss, m = tfew_jit(logp, tokens, cmask, label, alpha=alpha)
  np.testing.assert_allclose(m["lm_loss"], want["lm"], rtol=1e-5)
  np.testing.assert_allclose(m["ul_loss"], want["ul"], rtol=1e-5)
  np.testing.assert_allclose(m["ln_loss"], want["ln"], rtol=1e-5)
  np.testing.assert_allclose(loss, want["lm"] + want["ul"] + want["ln"], rtol=1e-5)
  assert int(m["num_correct_tokens"]) == want["lm_tokens"]
  assert int(m["num_incorrect_tokens"]) == want["ul_tokens"]
  assert int(m["num_examples"]) == want["examples"] == B
  assert int(m["num_invalid_labels"]) == 0
  # The single-term functions agree with the combined one.
  args = (logp, tokens, cmask, label)
  np.testing.assert_allclose(jax.jit(losses.lm_loss)(*args), want["lm"], rtol=1e-5)
  np.testing.assert_allclose(jax.jit(losses.unlikelihood_loss)(*args), want["ul"], rtol=1e-5)
  ln = jax.jit(functools.partial(losses.length_normalized_loss, alpha=alpha))(*args)
  np.testing.assert_allclose(ln, want["ln"], rtol=1e-5)


def test_unlikelihood_repo_variant_matches_numpy(batch):
  logp, tokens, cmask, label = batch
  want = np_tfew(logp, tokens, cmask, label, ul_epsilon=0.01)
  got = jax.jit(functools.partial(losses.unlikelihood_loss, ul_epsilon=0.01))(
      logp, tokens, cmask, label)
  np.testing.assert_allclose(got, want["ul"], rtol=1e-5)
  assert not np.isclose(got, np_tfew(logp, tokens, cmask, label)["ul"], rtol=1e-3)


def test_accuracy_metric(batch):
  logp, tokens, cmask, label = batch
  mask = np.asarray(losses.choice_token_mask(tokens, cmask))
  beta = np.where(mask, logp, 0).sum(-1) / np.maximum(mask.sum(-1), 1)
  beta = np.where(mask.any(-1), beta, -np.inf)
  _, m = tfew_jit(logp, tokens, cmask, label)
  np.testing.assert_allclose(m["accuracy"], np.mean(beta.argmax(-1) == label))


@pytest.mark.parametrize("length_normalize", [False, True])
def test_choice_scores(batch, length_normalize):
  logp, tokens, cmask, label = batch
  mask = losses.choice_token_mask(tokens, cmask)
  got = np.asarray(jax.jit(losses.choice_scores, static_argnums=2)(logp, mask, length_normalize))
  for b in range(B):
    for c in range(C):
      positions = np.flatnonzero(tokens[b, c]) if cmask[b, c] else []
      if len(positions) == 0:
        assert got[b, c] == -np.inf
        continue
      s = logp[b, c, positions].astype(np.float64).sum()
      want = s / len(positions) if length_normalize else s
      np.testing.assert_allclose(got[b, c], want, rtol=1e-5)
  assert np.isneginf(got).any()  # the fixture has padding choices


# ---------------------------------------------------------------------------
# Numerical safety.
# ---------------------------------------------------------------------------


def _two_choice_logits(gap):
  """One example, choice 0 correct, choice 1 = [EOS] with logits making p(EOS) = sigmoid(gap)."""
  logits = np.zeros((1, 2, 1, 2), np.float32)
  logits[0, 0, 0] = [0.0, 2.0]
  logits[0, 1, 0] = [0.0, gap]
  tokens = np.ones((1, 2, 1), np.int32)
  return jnp.asarray(logits), tokens, np.ones((1, 2), np.int32), np.zeros(1, np.int32)


def _loss_of_logits(logits, tokens, cmask, label, **kw):
  return losses.tfew_loss(losses.token_log_probs(logits, tokens), tokens, cmask, label, **kw)[0]


_loss_and_grad = jax.jit(jax.value_and_grad(_loss_of_logits))
_loss_and_grad_repo_ul = jax.jit(jax.value_and_grad(functools.partial(_loss_of_logits,
                                                                      ul_epsilon=0.01)))


def test_unlikelihood_gradient_exact_at_p_near_one():
  gap = math.log((1 - 1e-9) / 1e-9)  # p = 1 - 1e-9
  logits, tokens, cmask, label = _two_choice_logits(gap)
  f = jax.jit(functools.partial(_loss_of_logits, lm_weight=0.0, ln_weight=0.0))
  value, grad = jax.value_and_grad(f)(logits, tokens, cmask, label)
  # -log(1 - sigmoid(gap)) = softplus(gap); its gradient is sigmoid(gap) ~ 1.
  np.testing.assert_allclose(value, np.logaddexp(0.0, gap), rtol=1e-6)
  np.testing.assert_allclose(grad[0, 1, 0], [-1.0, 1.0], rtol=1e-6)
  assert np.all(np.asarray(grad[0, 0]) == 0)


@pytest.mark.parametrize("gap", [math.log((1 - 1e-9) / 1e-9), 40.0, 100.0, 1e4])
def test_all_terms_finite_when_p_rounds_to_one(gap):
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(B, C, T, V)).astype(np.float32)
  _, tokens, cmask, label = make_batch(4)
  # Every real target token is nearly certain, in correct and incorrect choices.
  np.put_along_axis(logits, tokens[..., None], gap, axis=-1)
  value, grad = _loss_and_grad(jnp.asarray(logits), tokens, cmask, label)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  if gap < 80:  # beyond ~87, 1 - p underflows float32 and the UL term saturates (~83, no gradient)
    assert np.any(np.abs(np.asarray(grad)) > 0.01)
  # Same for the repo's arithmetic.
  _, g = _loss_and_grad_repo_ul(logits, tokens, cmask, label)
  assert np.all(np.isfinite(g))


def test_log1mexp_matches_numpy_and_has_finite_gradients():
  x = np.array([-1e-30, -1e-9, -1e-4, -0.5, -0.7, -0.69, -2.0, -30.0, -200.0], np.float32)
  with mpmath.workdps(60):  # high-precision reference
    want = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(float(v))))) for v in x]
  np.testing.assert_allclose(losses.log1mexp(x), want, rtol=1e-5)
  grads = jax.vmap(jax.grad(losses.log1mexp))(jnp.asarray(np.append(x, [0.0, -1e-40])))
  assert np.all(np.isfinite(grads))


# ---------------------------------------------------------------------------
# Invariances and masking.
# ---------------------------------------------------------------------------


def test_padding_does_not_change_losses(batch):
  logp, tokens, cmask, label = batch
  extra_t, extra_c = 3, 2
  rng = np.random.default_rng(5)
  logp2 = rng.choice([0.0, -2.0, -1e4], size=(B, C + extra_c, T + extra_t)).astype(np.float32)
  tokens2 = rng.integers(1, V, (B, C + extra_c, T + extra_t)).astype(np.int32)  # garbage in padded choices
  tokens2[:, :C, :] = 0
  logp2[:, :C, :T] = logp
  tokens2[:, :C, :T] = tokens
  cmask2 = np.concatenate([cmask, np.zeros((B, extra_c), np.int32)], axis=1)
  base_loss, base = tfew_jit(logp, tokens, cmask, label)
  ln = jax.jit(losses.length_normalized_loss)
  np.testing.assert_allclose(ln(logp2, tokens2, cmask2, label), base["ln_loss"], rtol=1e-6)
  loss2, m2 = tfew_jit(logp2, tokens2, cmask2, label)
  np.testing.assert_allclose(loss2, base_loss, rtol=1e-6)
  for key in ("lm_loss", "ul_loss", "num_correct_tokens", "num_incorrect_tokens", "accuracy"):
    np.testing.assert_allclose(m2[key], base[key], rtol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 0.0, 1.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
                                     (1.0, 1.0, 0.0), (2.0, 0.5, 0.0)])
def test_zero_weighted_terms_contribute_nothing(batch, weights):
  logp, tokens, cmask, label = batch
  lm_w, ul_w, ln_w = weights
  terms = [(lm_w, losses.lm_loss), (ul_w, losses.unlikelihood_loss),
           (ln_w, losses.length_normalized_loss)]

  def remaining(lp):
    return sum(w * fn(lp, tokens, cmask, label) for w, fn in terms if w != 0)

  def combined(lp):
    return losses.tfew_loss(lp, tokens, cmask, label, lm_weight=lm_w, ul_weight=ul_w,
                            ln_weight=ln_w)[0]

  v1, g1 = jax.jit(jax.value_and_grad(combined))(logp)
  v2, g2 = jax.jit(jax.value_and_grad(remaining))(logp)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-9)

  # Traced weights give the same loss and gradient.
  def traced(lp, w):
    return losses.tfew_loss(lp, tokens, cmask, label, lm_weight=w[0], ul_weight=w[1],
                            ln_weight=w[2])[0]

  v3, g3 = jax.jit(jax.value_and_grad(traced))(logp, jnp.asarray(weights))
  np.testing.assert_allclose(v3, v2, rtol=1e-6)
  np.testing.assert_allclose(g3, g2, rtol=1e-6, atol=1e-9)


def test_zero_weight_removes_term_gradient_where_term_alone_has_one():
  # Sanity: the UL gradient is non-zero on incorrect choices, so dropping it is observable.
  logp, tokens, cmask, label = make_batch(6)
  g_ul = jax.jit(jax.grad(lambda lp: losses.unlikelihood_loss(lp, tokens, cmask, label)))(logp)
  g_no_ul = jax.jit(jax.grad(lambda lp: losses.tfew_loss(lp, tokens, cmask, label,
                                                         ul_weight=0.0)[0]))(logp)
  incorrect = np.asarray(losses.choice_token_mask(tokens, cmask)) & (
      np.arange(C)[None, :, None] != label[:, None, None])
  assert np.all(np.asarray(g_ul)[incorrect] > 0)
  g_lm_ln = jax.jit(jax.grad(lambda lp: losses.lm_loss(lp, tokens, cmask, label)
                             + losses.length_normalized_loss(lp, tokens, cmask, label)))(logp)
  np.testing.assert_allclose(g_no_ul, g_lm_ln, rtol=1e-6, atol=1e-9)


def test_example_mask_rows_contribute_nothing():
  logp, tokens, cmask, label = make_batch(7, nb=6)
  keep = np.array([1, 0, 1, 1, 0, 1], np.int32)
  # Dropped rows hold garbage: NaN log-probs, no real choices, an impossible label.
  logp = logp.copy()
  logp[keep == 0] = np.nan
  cmask = cmask.copy()
  cmask[1] = 0
  label = label.copy()
  label[4] = 99

  def f(lp, tk, cm, lb, em):
    return losses.tfew_loss(lp, tk, cm, lb, em)

  (loss, m), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(logp, tokens, cmask, label, keep)
  rows = keep == 1
  (loss_sub, m_sub), grad_sub = jax.jit(jax.value_and_grad(f, has_aux=True))(
      logp[rows], tokens[rows], cmask[rows], label[rows], np.ones(rows.sum(), np.int32))
  np.testing.assert_allclose(loss, loss_sub, rtol=1e-6)
  for key in ("lm_loss", "ul_loss", "ln_loss", "accuracy", "num_examples",
              "num_correct_tokens", "num_incorrect_tokens"):
    np.testing.assert_allclose(m[key], m_sub[key], rtol=1e-6)
  assert int(m["num_examples"]) == 4 and int(m["num_invalid_labels"]) == 0
  assert np.all(np.asarray(grad)[~rows] == 0)
  np.testing.assert_allclose(np.asarray(grad)[rows], grad_sub, rtol=1e-6, atol=1e-9)
  want = np_tfew(logp, tokens, cmask, label, emask=keep)
  np.testing.assert_allclose(m["ln_loss"], want["ln"], rtol=1e-5)


def test_invalid_labels_are_dropped_and_counted(batch):
  logp, tokens, cmask, label = batch
  bad = label.copy()
  bad[0] = C + 3                                        # out of range
  padded_choice = int(np.flatnonzero(cmask[1] == 0)[0]) if (cmask[1] == 0).any() else None
  cmask2 = cmask.copy()
  if padded_choice is None:  # make one
    padded_choice = (label[1] + 1) % C
    cmask2[1, padded_choice] = 0
  bad[1] = padded_choice                               # names a padding choice
  loss, m = tfew_jit(logp, tokens, cmask2, bad)
  assert int(m["num_invalid_labels"]) == 2 and int(m["num_examples"]) == B - 2
  keep = np.array([0, 0] + [1] * (B - 2))
  want_loss, _ = tfew_jit(logp, tokens, cmask2, label, keep)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  assert np.isfinite(loss)


def test_shape_errors_name_the_field(batch):
  logp, tokens, cmask, label = batch
  with pytest.raises(ValueError, match="choice_mask"):
    losses.tfew_loss(logp, tokens, cmask[:, :2], label)
  with pytest.raises(ValueError, match="label"):
    losses.tfew_loss(logp, tokens, cmask, label[:2])
  with pytest.raises(ValueError, match="example_mask"):
    losses.tfew_loss(logp, tokens, cmask, label, np.ones(B + 1))
  with pytest.raises(ValueError, match="choice_tokens"):
    losses.lm_loss(logp, tokens[:, :, :2], cmask, label)


# ---------------------------------------------------------------------------
# Plain LM loss: z-loss and label smoothing (T5X semantics).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("z_loss,label_smoothing", [(0.0, 0.0), (1e-4, 0.0), (0.0, 0.1),
                                                    (1e-2, 0.2)])
def test_cross_entropy_matches_numpy(z_loss, label_smoothing):
  rng = np.random.default_rng(8)
  logits = (rng.normal(size=(3, 6, 29)) * 3 + 5).astype(np.float32)  # offset: log Z far from 0
  targets = rng.integers(0, 29, (3, 6))
  weights = (rng.uniform(size=(3, 6)) > 0.3).astype(np.float32)
  fn = jax.jit(functools.partial(losses.cross_entropy_with_logits, z_loss=z_loss,
                                 label_smoothing=label_smoothing))
  loss, zl, wsum = fn(logits, targets, weights)
  grad = jax.grad(lambda z: fn(z, targets, weights)[0])(logits)
  want_loss, want_z, want_w, want_grad = np_cross_entropy(logits, targets, weights, z_loss,
                                                          label_smoothing)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(zl, want_z, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(wsum, want_w)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_cross_entropy_defaults_and_minimum():
  rng = np.random.default_rng(9)
  targets = rng.integers(0, 13, (4, 5))
  logits = rng.normal(size=(4, 5, 13)).astype(np.float32)
  loss, zl, wsum = losses.cross_entropy_with_logits(logits, targets)
  assert float(wsum) == 20 and float(zl) == 0
  want = -np.take_along_axis(np_log_softmax(logits), targets[..., None], -1).sum()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # With label smoothing the normalising constant makes the optimum exactly 0.
  ls = 0.1
  q = np.full((4, 5, 13), ls / 12)
  np.put_along_axis(q, targets[..., None], 1 - ls, axis=-1)
  loss_at_q, _, _ = losses.cross_entropy_with_logits(np.log(q).astype(np.float32), targets,
                                                     label_smoothing=ls)
  np.testing.assert_allclose(loss_at_q, 0.0, atol=1e-4)
  assert float(losses.cross_entropy_with_logits(logits, targets, label_smoothing=ls)[0]) > 1


def test_cross_entropy_rejects_bad_settings():
  z = jnp.zeros((2, 3, 5))
  t = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.cross_entropy_with_logits(z, t, label_smoothing=1.0)
  with pytest.raises(ValueError, match="z_loss"):
    losses.cross_entropy_with_logits(z, t, z_loss=-1.0)


# ---------------------------------------------------------------------------
# LossConfig.
# ---------------------------------------------------------------------------


def test_loss_config_builds_the_losses(batch):
  logp, tokens, cmask, label = batch
  cfg = losses.LossConfig(ul_weight=0.0, alpha=0.5, z_loss=1e-4, label_smoothing=0.1)
  loss, m = jax.jit(cfg.choice_loss)(logp, tokens, cmask, label)
  want, _ = tfew_jit(logp, tokens, cmask, label, ul_weight=0.0, alpha=0.5)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(loss, m["lm_loss"] + m["ln_loss"], rtol=1e-6)
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 3))
  got = cfg.lm_loss(logits, targets)
  want = np_cross_entropy(logits, targets, np.ones((2, 3)), 1e-4, 0.1)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert losses.LossConfig() == losses.LossConfig(1.0, 1.0, 1.0, 1.0, 0.0, 0.0)
  with pytest.raises(Exception):
    cfg.alpha = 2.0  # frozen


@pytest.mark.parametrize("field,value", [("lm_weight", -1.0), ("ul_weight", float("nan")),
                                         ("alpha", -0.5), ("z_loss", -1e-4),
                                         ("label_smoothing", 1.0), ("ul_epsilon", -0.01)])
def test_loss_config_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=f"LossConfig.{field}"):
    losses.LossConfig(**{field: value})
