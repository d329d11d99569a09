"""Built-in seqio tasks: T0 held-out datasets, RAFT, and a multitask pre-training mixture.

    from ia3_jax import tasks
    tasks.register_all()            # default vocabulary (see ia3_jax.data.default_vocabulary)
    tasks.register_all(vocabulary)  # or any seqio.Vocabulary

`register_all` is idempotent (a second call with the same arguments does
nothing; different arguments re-register). Registration reads no data; data
is read when a task's dataset is first requested. Names (see ia3_jax.data):

  {key}_fewshot_seed{S}  for S in 0, 1, 32, 42, 1024 (T-Few few-shot training)
  {key}_eval_{template}, {key}_eval          (evaluation, per template / all)
  t0_heldout_fewshot_seed{S}, raft_fewshot_seed{S}   (multitask few-shot mixtures)
  raft_eval   (the 11 RAFT test sets: `ia3-jax infer`, then `ia3-jax raft-submission`)
  {key}_train for the pre-training datasets, and their mixture t0_pretrain_multitask

with key in T0_HELDOUT_KEYS (rte, cb, anli_r1..3, copa, hellaswag, story_cloze,
winogrande, wsc, wic), raft_<task> for the 11 RAFT tasks, and PRETRAIN_KEYS.
Importing this package is cheap; TensorFlow and seqio load on registration.
"""

from __future__ import annotations

import os

T0_HELDOUT_KEYS = ("rte", "cb", "anli_r1", "anli_r2", "anli_r3", "copa", "hellaswag",
                   "story_cloze", "winogrande", "wsc", "wic")
RAFT_KEYS = tuple(f"raft_{t}" for t in (
    "ade_corpus_v2", "banking_77", "neurips_impact_statement_risks", "one_stop_english",
    "overruling", "semiconductor_org_types", "systematic_review_inclusion", "tai_safety_research",
    "terms_of_service", "tweet_eval_hate", "twitter_complaints"))
RAFT_EVAL_MIXTURE = "raft_eval"  # the 11 RAFT test sets (unlabelled), for a leaderboard submission
PRETRAIN_KEYS = ("mrpc", "paws", "imdb", "ag_news", "cosmos_qa", "gigaword")

# Stable task ids (the `task_id` field of every batch): never renumber, only append.
BUILTIN_TASK_IDS: dict[str, int] = {
    key: i for i, key in enumerate(T0_HELDOUT_KEYS + RAFT_KEYS + PRETRAIN_KEYS)}

_REGISTERED: dict[str, tuple] = {}


def register_all(vocabulary=None, *, data_dir: str | None = None, manual_dir: str | None = None,
                 raft_dir: str | None = None, promptsource_dir: str | None = None,
                 groups=("t0", "raft", "pretrain")) -> list[str]:
  """Registers the built-in tasks and mixtures; returns their names.

  Args:
    vocabulary: seqio.Vocabulary; default `ia3_jax.data.default_vocabulary()`.
    data_dir: TFDS data directory (default: TFDS's).
    manual_dir: TFDS manual-download directory (StoryCloze's CSV files);
      default $IA3_JAX_TFDS_MANUAL_DIR, else `<data_dir>/downloads/manual`.
    raft_dir: RAFT CSV folder; default $IA3_JAX_RAFT_DIR.
    promptsource_dir: a promptsource checkout: use its original-task templates
      for the T0 held-out datasets instead of ours.
    groups: any of "t0", "raft", "pretrain".
  """
  from ia3_jax import data  # pylint: disable=g-import-not-at-top
  from ia3_jax.data.fewshot import TFEW_SEEDS  # pylint: disable=g-import-not-at-top

  vocabulary = vocabulary or data.default_vocabulary()
  raft_dir = raft_dir or os.environ.get("IA3_JAX_RAFT_DIR")
  for key, task_id in BUILTIN_TASK_IDS.items():
    data.register_task_id(key, task_id)
  names: list[str] = []
  for group in groups:
    args = (data_dir, manual_dir, raft_dir, promptsource_dir)
    previous = _REGISTERED.get(group)
    if previous is not None and previous[0] == vocabulary and previous[1] == args:
      names.extend(previous[2])
      continue
    group_names = _register_group(group, vocabulary, data_dir, manual_dir, raft_dir,
                                  promptsource_dir, TFEW_SEEDS)
    _REGISTERED[group] = (vocabulary, args, group_names)
    names.extend(group_names)
  return names


def _register_group(group, vocabulary, data_dir, manual_dir, raft_dir, promptsource_dir, seeds):
  from ia3_jax import data  # pylint: disable=g-import-not-at-top
  from ia3_jax.tasks import pretrain, raft, t0  # pylint: disable=g-import-not-at-top

  if group == "t0":
    specs = t0.specs(data_dir=data_dir, manual_dir=manual_dir, promptsource_dir=promptsource_dir,
                     task_ids=BUILTIN_TASK_IDS)
  elif group == "raft":
    specs = raft.specs(raft_dir, task_ids=BUILTIN_TASK_IDS)
  elif group == "pretrain":
    specs = pretrain.specs(data_dir=data_dir, task_ids=BUILTIN_TASK_IDS)
  else:
    raise ValueError(f"unknown task group {group!r}; groups: t0, raft, pretrain")
  names = []
  registered = [data.register_dataset(spec, vocabulary) for spec in specs]
  for r in registered:
    names.extend(r.train + r.eval + (r.eval_mixture,))
  if group in ("t0", "raft"):
    prefix = "t0_heldout" if group == "t0" else "raft"
    for seed in seeds:
      tasks = [f"{spec.key}_fewshot_seed{seed}" for spec in specs]
      names.append(data.add_mixture(f"{prefix}_fewshot_seed{seed}", tasks, kind="train",
                                    default_split="train"))
    if group == "raft":  # one infer run over every test set -> raft.write_submission
      names.append(data.add_mixture(RAFT_EVAL_MIXTURE, [n for r in registered for n in r.eval],
                                    kind="eval", default_split="test"))
  else:
    names.append(data.add_mixture(pretrain.MIXTURE, [f"{s.key}_train" for s in specs],
                                  kind="train", default_split="train"))
  return names
