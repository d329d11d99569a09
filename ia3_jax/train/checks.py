"""Checks of a run's inputs against its model: a one-line error instead of a wrong answer.

Token ids beyond the embedding, a vocabulary larger than the model's, eval
data with nothing to score or with choices that cannot be told apart, and
(once per run) truncated or indistinguishable training examples.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import numpy as np

from ia3_jax.data import features
from ia3_jax.errors import ConfigError, DataError
from ia3_jax.model.config import T5Config

log = logging.getLogger(__name__)


def source_name(source: Any) -> str:
  return str(getattr(source, "name", None) or type(source).__name__)


def check_vocabulary(source: Any, config: T5Config) -> None:
  """A source with a vocabulary larger than the model's embedding is a ConfigError."""
  vocabulary = getattr(source, "vocabulary", None)
  if not callable(vocabulary):
    return
  size = vocabulary().vocab_size
  if size > config.vocab_size:
    raise ConfigError(f"{source_name(source)}: its vocabulary has {size} pieces but the model's "
                      f"embedding has vocab_size={config.vocab_size} rows; token ids beyond it "
                      "have no embedding (use the model's vocabulary, or a model with "
                      f"vocab_size >= {size})")


def check_source_task_ids(source: Any, check: Callable[..., None]) -> None:
  """The task ids a source's batches carry (`task_ids()`, if it has them) against the model's
  banks (`check(ids, source=...)`, e.g. `ModelSpec.check_task_ids`), before the run starts."""
  task_ids = getattr(source, "task_ids", None)
  if callable(task_ids):
    for key, task_id in task_ids().items():
      check(np.asarray([task_id]), source=f"{source_name(source)} (dataset {key!r})")


def check_token_ids(batch: Mapping[str, np.ndarray], vocab_size: int, where: str) -> None:
  """Token ids outside the embedding would turn the loss non-finite: a DataError instead."""
  for key in features.TOKEN_FEATURES:
    if key in batch and np.size(batch[key]):
      top = int(np.max(batch[key]))
      if top >= vocab_size or int(np.min(batch[key])) < 0:
        raise DataError(f"{where}: feature {key!r} holds token id {top}, outside the model's "
                        f"vocab_size={vocab_size} (a task vocabulary larger than the model's "
                        "embedding?)")


def check_eval_result(result: Mapping[str, Any], name: str) -> None:
  """No labelled example, or answer choices that cannot be told apart, is a DataError."""
  if not result["num_examples"]:
    raise DataError(f"{name}: no labelled examples to evaluate ({result['num_unlabelled']} "
                    "unlabelled); an empty split or file?")
  if result.get("num_identical_choices"):
    raise DataError(f"{name}: {result['num_identical_choices']} of {result['num_examples']} "
                    "examples have identical answer choices (feature 'choices', e.g. after "
                    "cutting to TASK_FEATURE_LENGTHS['targets']); their accuracy would be "
                    "meaningless. Raise the targets length or fix the template's answer_choices")


def warn_train_batch(batch: Mapping[str, np.ndarray], stats: Any, name: str, reported: dict,
                      show: Callable[[str], None]) -> None:
  """Reports (once) the first truncated and the first indistinguishable training example."""
  if stats is not None and not reported["truncated"]:
    if stats.any_truncated:
      reported["truncated"] = True
      show(f"truncated: {stats.report(name + ' (train, so far)')}")
  if not reported["identical"] and "choice_tokens" in batch:
    mask = np.asarray(batch.get("example_mask", np.ones(np.shape(batch["label"])))).astype(bool)
    same = features.identical_choices(batch["choice_tokens"], batch["choice_mask"])[mask]
    if same.any():
      reported["identical"] = True
      msg = (f"warning: {name}: {int(same.sum())} training examples in one batch have "
             "identical answer choices (feature 'choices', e.g. after cutting to "
             "TASK_FEATURE_LENGTHS['targets']); the loss cannot separate them")
      log.warning("%s", msg)
      show(msg)
