"""A multitask mixture for (IA)^3 pre-training: T0 training datasets from TFDS.

T-Few pre-trains (IA)^3 on T0's multitask mixture with the LM loss only. These
are six of T0's training datasets that TFDS provides (paraphrase, sentiment,
topic, multiple-choice QA, summarisation), each on its whole train split with
one random template per example. More datasets (for instance with a
promptsource checkout's templates) join through `ia3_jax.data.register_dataset`
and `ia3_jax.data.add_mixture`.
"""

from __future__ import annotations

import os
from typing import Any

from ia3_jax.data import DatasetSpec
from ia3_jax.data.sources import TfdsSource
from ia3_jax.data.templates import load_templates

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")

# key -> (TFDS name, splits, template file, number of choices or None for generative)
PRETRAIN: dict[str, tuple] = {
    "mrpc": ("glue/mrpc", ("train", "validation"), "mrpc.yaml", 2),
    "paws": ("paws_wiki", ("train", "validation"), "paws.yaml", 2),
    "imdb": ("imdb_reviews", ("train", "test"), "imdb.yaml", 2),
    "ag_news": ("ag_news_subset", ("train", "test"), "ag_news.yaml", 4),
    "cosmos_qa": ("cosmos_qa", ("train", "validation"), "cosmos_qa.yaml", 4),
    "gigaword": ("gigaword", ("train", "validation"), "gigaword.yaml", None),
}
MIXTURE = "t0_pretrain_multitask"


def _ag_news(ex: dict[str, Any]) -> dict[str, Any]:
  return dict(ex, text=f"{ex['title']} {ex['description']}".strip())


def specs(*, data_dir: str | None, task_ids: dict[str, int]) -> list[DatasetSpec]:
  out = []
  for key, (tfds_name, splits, file, num_choices) in PRETRAIN.items():
    source = TfdsSource(tfds_name, splits, adapter=_ag_news if key == "ag_news" else None,
                        data_dir=data_dir)
    out.append(DatasetSpec(key=key, source=source, templates=load_templates(os.path.join(TEMPLATE_DIR, file)),
                           train_split="train", eval_split=splits[1], num_shots=None,
                           num_choices=num_choices, task_id=task_ids[key]))
  return out
