"""Scoring and rank classification: against PyTorch and against one full forward per choice."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ia3_jax.interop import hf_checkpoints
from ia3_jax.model import layers, network
from ia3_jax.model.config import get_config
from ia3_jax.objectives import scoring
from tests import hf_utils
from tests import tolerances

NUM_TASKS = 3
TINY = get_config("tiny", num_encoder_layers=1, num_decoder_layers=1)  # cheap to compile


class TaskScaledMlp(layers.MlpBlock):
  """Test override: scales `wo`'s output by a per-task vector picked by task_id."""

  def project(self, x, name, features, kernel_axes, task_id, kernel_init=None):
    y = super().project(x, name, features, kernel_axes, task_id, kernel_init)
    if name != "wo" or task_id is None:
      return y
    bank = self.param("task_scale", nn.initializers.uniform(1.0), (NUM_TASKS, features))
    return y * (0.5 + bank)[task_id][:, None, :]


# Jitted entry points: eager flax compiles op by op, which dominates test time on 2 cores.
init_params = jax.jit(network.init_params, static_argnums=0, static_argnames="with_task_id")
rank_classify = jax.jit(scoring.rank_classify, static_argnums=0,
                        static_argnames=("length_normalize", "max_choices_per_step"))
choice_log_probs = jax.jit(scoring.choice_log_probs, static_argnums=0,
                           static_argnames=("max_choices_per_step", "enable_dropout"))


@functools.cache
def task_model():
  """A tiny model whose output depends on task_id, with its params (shared, immutable)."""
  model = network.Transformer(TINY, network.Blocks(mlp=TaskScaledMlp))
  return model, init_params(model, jax.random.key(3), with_task_id=True)


def choice_batch(seed, vocab=128, batch=3, num_choices=3, enc_len=9, choice_len=5,
                 with_task=True):
  """Random rank-classification batch; row 1 (if any) has a padding choice; choices end in EOS.

  Every test uses the same shapes and the task model, so jitted code is compiled once.
  """
  rng = np.random.default_rng(seed)
  enc = hf_utils.random_batch(rng, vocab, batch, enc_len, 2)["encoder_input_tokens"]
  choices = np.zeros((batch, num_choices, choice_len), np.int32)
  for b in range(batch):
    for c in range(num_choices):
      n = rng.integers(1, choice_len)  # content tokens, then EOS
      choices[b, c, :n] = rng.integers(2, vocab, size=n)
      choices[b, c, n] = 1
  choice_mask = np.ones((batch, num_choices), np.int32)
  if batch > 1:
    choice_mask[1, -1] = 0
    choices[1, -1] = 0
  out = dict(encoder_input_tokens=enc, choice_tokens=choices, choice_mask=choice_mask,
             label=rng.integers(0, 2, size=batch).astype(np.int32))
  if with_task:
    out["task_id"] = np.arange(batch, dtype=np.int32) % NUM_TASKS
  return out


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def forward(model, params, enc, dec_in, targets=None, task_id=None):
  """Full-model logits (jitted per model and shape; eager flax is slow on 2 cores)."""
  return _forward(model, params, enc, dec_in, targets, task_id)


_forward = jax.jit(
    lambda model, params, enc, dec_in, targets, task_id: model.apply(
        {"params": params}, enc, dec_in, targets, task_id=task_id), static_argnums=0)


def per_choice_reference(model, params, batch):
  """NumPy (log-probs [B, C, T], sums [B, C], lengths [B, C]) from one full forward per choice."""
  choices = batch["choice_tokens"]
  logps = []
  for c in range(choices.shape[1]):
    targets = choices[:, c]
    logits = forward(model, params, batch["encoder_input_tokens"], network.shift_right(targets),
                     targets, batch.get("task_id"))
    logp = np_log_softmax(np.asarray(logits, np.float64))
    logps.append(np.take_along_axis(logp, targets[..., None], -1)[..., 0])
  logp = np.stack(logps, 1)
  mask = (choices > 0) & (batch["choice_mask"][..., None] > 0)
  return logp, np.where(mask, logp, 0).sum(-1), mask.sum(-1)


# ---------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant,shape", [("t5_1_1", "small"), ("t5_1_0", "odd")])
def test_score_matches_pytorch_sum_of_log_probs(tmp_path, variant, shape):
  torch_model = hf_utils.make_hf_model(tmp_path, variant, shape)
  config, params = hf_checkpoints.load_hf_checkpoint(tmp_path)
  batch = hf_utils.random_batch(np.random.default_rng(4), config.vocab_size, 4, 13, 9)
  targets = batch["decoder_target_tokens"]
  assert (targets == 0).any()  # padding must be excluded from the sum
  ours = np.asarray(scoring.score(network.Transformer(config), params,
                                  batch["encoder_input_tokens"], targets))
  logp = torch.log_softmax(torch.tensor(hf_utils.torch_logits(torch_model, batch),
                                        dtype=torch.float64), -1)
  tok = torch.gather(logp, -1, torch.tensor(targets, dtype=torch.long)[..., None])[..., 0]
  theirs = (tok * torch.tensor(targets > 0)).sum(-1).numpy()
  # Sums of same-sign log-probabilities (no cancellation): relative error only.
  tolerances.assert_close_to_torch(ours, theirs, scale_tol=0)
  # Also HF's own loss: mean token cross-entropy with -100 on padding.
  labels = torch.tensor(np.where(targets > 0, targets, -100), dtype=torch.long)
  enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
  for b in range(len(targets)):
    with torch.no_grad():
      loss = torch_model(input_ids=enc[b:b + 1], attention_mask=(enc[b:b + 1] > 0).long(),
                         labels=labels[b:b + 1]).loss.item()
    tolerances.assert_close_to_torch(ours[b], -loss * (targets[b] > 0).sum(), scale_tol=0)


def test_score_passes_task_id():
  model, params = task_model()
  batch = choice_batch(5)
  enc, targets = batch["encoder_input_tokens"], batch["choice_tokens"][:, 0]
  a = np.asarray(scoring.score(model, params, enc, targets, task_id=batch["task_id"]))
  b = np.asarray(scoring.score(model, params, enc, targets, task_id=batch["task_id"][::-1]))
  ref = per_choice_reference(model, params, batch)[1][:, 0]
  tolerances.assert_close(a, ref)
  assert a[1] == pytest.approx(b[1], rel=tolerances.RTOL) and abs(a[0] - b[0]) > 1e-3  # task 1 stays put


# ---------------------------------------------------------------------------
# rank classification
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_choices_per_step", [None, 2])  # 2: two chunks, one padded
def test_rank_classification_equals_one_forward_per_choice(max_choices_per_step):
  """Encoder reuse (and chunking) vs one full forward per choice, task_id repeated per choice."""
  model, params = task_model()
  batch = choice_batch(0)
  ref_logp, ref_sum, ref_len = per_choice_reference(model, params, batch)
  logp = np.asarray(choice_log_probs(model, params, batch,
                                     max_choices_per_step=max_choices_per_step))
  real = (batch["choice_tokens"] > 0) & (batch["choice_mask"][..., None] > 0)
  tolerances.assert_close(logp[real], ref_logp[real])
  if max_choices_per_step is None:  # task_id reaches the model, one row per example
    other = dict(batch, task_id=(batch["task_id"] + 1) % NUM_TASKS)
    assert np.abs(np.asarray(choice_log_probs(model, params, other)) - logp)[real].min() > 0
  for normalize in ((True, False) if max_choices_per_step is None else (True,)):
    out = rank_classify(model, params, batch, length_normalize=normalize,
                        max_choices_per_step=max_choices_per_step)
    ref = np.where(ref_len > 0, ref_sum / (np.maximum(ref_len, 1) if normalize else 1), -np.inf)
    scores = np.asarray(out["scores"])
    assert np.isneginf(scores[1, -1]) and np.isfinite(np.delete(scores.ravel(), 5)).all()
    tolerances.assert_close(scores, ref)
    np.testing.assert_array_equal(out["predictions"], ref.argmax(-1))


def _dot_operand_shapes(jaxpr):
  """Shapes of every dot_general operand in a jaxpr and the jaxprs nested in it."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes += [tuple(v.aval.shape) for v in eqn.invars]
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          shapes += _dot_operand_shapes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          shapes += _dot_operand_shapes(sub)
  return shapes


@pytest.mark.parametrize("max_choices_per_step", [None, 2])
def test_choices_share_their_example_cross_attention_keys_and_values(max_choices_per_step):
  """The cross-attention key/value projections see one encoder row per example, not per choice."""
  model, params = task_model()
  batch = choice_batch(0)
  b, c, t = batch["choice_tokens"].shape
  k = c if max_choices_per_step is None else max_choices_per_step
  length, emb = batch["encoder_input_tokens"].shape[1], TINY.emb_dim
  jaxpr = jax.make_jaxpr(functools.partial(
      scoring.choice_log_probs, model, max_choices_per_step=max_choices_per_step))(params, batch)
  shapes = _dot_operand_shapes(jaxpr.jaxpr)
  assert (b * k, t, emb) in shapes  # the decoder's projections, one row per choice
  assert (b, length, emb) in shapes
  assert not [s for s in shapes if s[:2] == (b * k, length)], shapes  # no repeated encoder rows


def test_length_normalisation_can_change_the_prediction():
  """Short choice: EOS alone. Long one: 4 greedy tokens + EOS, a higher mean but lower sum."""
  model, params = task_model()
  batch = choice_batch(1)
  batch["choice_mask"][:] = 1
  enc = batch["encoder_input_tokens"]
  dec = np.zeros((3, 5), np.int32)
  valid = np.ones_like(dec)
  for i in range(4):  # causal decoder: logits at i depend on dec[:, :i + 1] only
    logits = np.array(forward(model, params, enc, dec, valid, batch["task_id"]))[:, i]
    logits[:, 1] = -np.inf
    dec[:, i + 1] = logits.argmax(-1)
  batch["choice_tokens"][:, 0] = [1, 0, 0, 0, 0]
  batch["choice_tokens"][:, 1, :4] = dec[:, 1:]
  batch["choice_tokens"][:, 1, 4] = 1
  summed = rank_classify(model, params, batch, length_normalize=False)
  normed = rank_classify(model, params, batch, length_normalize=True)
  s, n = np.asarray(summed["scores"]), np.asarray(normed["scores"])
  np.testing.assert_allclose(n[:, :2], s[:, :2] / np.array([1, 5]), rtol=1e-6)
  assert (s[:, 0] > s[:, 1]).any() and (n[:, 1] > n[:, 0]).any(), (s, n)
  assert (np.asarray(summed["predictions"]) != np.asarray(normed["predictions"])).any()


def test_ties_go_to_the_first_choice():
  scores = jnp.array([[1.0, 2.0, 2.0], [3.0, 3.0, -jnp.inf], [-jnp.inf, 0.5, 0.5]])
  np.testing.assert_array_equal(scoring.predict(scores), [1, 0, 1])
  model, params = task_model()
  batch = choice_batch(2)
  batch["choice_mask"][:] = 1
  batch["choice_tokens"][:] = batch["choice_tokens"][:, 2:3]  # three copies of one choice
  out = rank_classify(model, params, batch)
  scores = np.asarray(out["scores"])
  np.testing.assert_array_equal(scores, np.repeat(scores[:, :1], 3, axis=1))  # exact ties
  np.testing.assert_array_equal(out["predictions"], 0)


def test_classifier_compiles_once_per_batch_shape():
  model, params = task_model()
  classifier = scoring.RankClassifier(model)
  for seed in range(3):
    batch = choice_batch(10 + seed)
    batch["example_id"] = np.arange(3) + 100 * seed  # host features do not retrace
    out = classifier(params, batch)
    ref = rank_classify(model, params, batch)
    tolerances.assert_close(out["scores"], ref["scores"])
    np.testing.assert_array_equal(out["predictions"], ref["predictions"])
  assert classifier.num_traces == 1 and classifier.cache_size() == 1
  classifier(params, choice_batch(20, num_choices=4))
  assert classifier.num_traces == 2 and classifier.cache_size() == 2


def test_chunked_gradients_equal_unchunked():
  model, params = task_model()
  batch = choice_batch(4)
  mask = jnp.asarray((batch["choice_tokens"] > 0) & (batch["choice_mask"][..., None] > 0))

  def loss(p, k):
    logp = choice_log_probs(model, p, batch, max_choices_per_step=k)
    return jnp.sum(jnp.where(mask, logp, 0.0))

  full = jax.grad(loss)(params, None)
  chunked = jax.jit(jax.grad(loss), static_argnums=1)(params, 2)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(chunked)):
    tolerances.assert_close(a, b, rtol=1e-4)
  scale = full["decoder"]["layers_0"]["mlp"]["task_scale"]
  assert np.abs(np.asarray(scale)).sum() > 0  # the gradient reaches the task bank


def test_dropout_needs_rngs_and_uses_them():
  _, params = task_model()
  model = network.Transformer(TINY.replace(dropout_rate=0.3), network.Blocks(mlp=TaskScaledMlp))
  batch = choice_batch(5)
  with pytest.raises(ValueError, match="rngs"):
    choice_log_probs(model, params, batch, enable_dropout=True)
  # Chunked (k=2): every chunk folds its own stream from the key.
  run = lambda seed: np.asarray(choice_log_probs(
      model, params, batch, enable_dropout=True, rngs={"dropout": jax.random.key(seed)},
      max_choices_per_step=2))
  a, b, c = run(1), run(1), run(2)
  np.testing.assert_array_equal(a, b)
  real = batch["choice_tokens"] > 0
  assert np.isfinite(a).all() and np.abs(a - c)[real].min() > 0


def test_bad_batches_name_the_field():
  model, params = task_model()
  batch = choice_batch(6)
  with pytest.raises(ValueError, match="choice_tokens"):
    rank_classify(model, params, dict(batch, choice_tokens=batch["choice_tokens"][0]))
  with pytest.raises(ValueError, match="choice_mask"):
    rank_classify(model, params, dict(batch, choice_mask=batch["choice_mask"][:, :2]))
  with pytest.raises(ValueError, match="max_choices_per_step"):
    choice_log_probs(model, params, batch, max_choices_per_step=0)
  with pytest.raises(ValueError, match="encoder_input_tokens"):
    rank_classify(model, params, {"choice_tokens": batch["choice_tokens"]})


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------


def test_evaluate_masks_rows_and_pads_the_final_batch():
  model, params = task_model()
  batches, preds = [], []
  for i in range(3):
    b = choice_batch(30 + i)
    # rank_classify is checked against one full forward per choice above.
    pred = np.asarray(rank_classify(model, params, b)["predictions"])
    # Labels: the prediction on even rows, another real choice on odd rows.
    b["label"] = np.where(np.arange(3) % 2 == 0, pred, (pred + 1) % 2).astype(np.int32)
    b["template_id"] = np.array([0, 1, 0], np.int32)
    b["example_mask"] = np.ones(3, np.int32)
    batches.append(b)
    preds.append(pred)
  batches[0]["example_mask"][2] = 0   # a padding row
  batches[1]["label"][1] = -1         # an unlabelled row
  # Final partial batch: 2 rows and no example_mask; evaluate pads it back to 3 rows.
  batches[2] = {k: v[:2] for k, v in batches[2].items() if k != "example_mask"}
  preds[2] = preds[2][:2]
  correct = total = 0
  per_template = {0: [0, 0], 1: [0, 0]}
  for b, pred in zip(batches, preds):
    counted = b.get("example_mask", np.ones(len(pred))).astype(bool) & (b["label"] >= 0)
    hits = counted & (pred == b["label"])
    correct, total = correct + hits.sum(), total + counted.sum()
    for t in per_template:
      per_template[t][0] += (hits & (b["template_id"] == t)).sum()
      per_template[t][1] += (counted & (b["template_id"] == t)).sum()

  classifier = scoring.RankClassifier(model)
  result = scoring.evaluate(model, params, iter(batches), classifier=classifier, progress=False,
                            return_predictions=True)
  assert (correct, total) == (4, 6)
  assert result["num_examples"] == 6 and result["num_correct"] == 4
  assert result["accuracy"] == pytest.approx(4 / 6)
  assert result["num_unlabelled"] == 1 and result["num_batches"] == 3
  assert classifier.num_traces == 1  # the partial batch was padded, not recompiled
  counted_preds = np.concatenate([p[b.get("example_mask", np.ones(len(p))).astype(bool)
                                    & (b["label"] >= 0)] for b, p in zip(batches, preds)])
  np.testing.assert_array_equal(result["predictions"], counted_preds)
  assert result["scores"].shape == (6, 3)
  for t, (c, n) in per_template.items():
    assert result["per_template"][t] == {"accuracy": c / n, "num_correct": c, "num_examples": n}
  with pytest.raises(ValueError, match="label"):
    scoring.evaluate(model, params, [{k: v for k, v in batches[1].items() if k != "label"}],
                     classifier=classifier, progress=False)
