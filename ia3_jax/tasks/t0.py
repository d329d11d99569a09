"""The T0 held-out datasets (T-Few's evaluation suite) from TFDS."""

from __future__ import annotations

import os
from typing import Any

from ia3_jax.data import DatasetSpec, fewshot
from ia3_jax.data.sources import TfdsSource
from ia3_jax.data.templates import TemplateSet, load_templates, promptsource_templates

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")

# key -> (TFDS name, splits, template file, promptsource (dataset, subset), choices, unlabelled splits)
T0_HELDOUT: dict[str, tuple] = {
    "rte": ("super_glue/rte", ("train", "validation", "test"), "rte.yaml", ("super_glue", "rte"), 2, ("test",)),
    "cb": ("super_glue/cb", ("train", "validation", "test"), "cb.yaml", ("super_glue", "cb"), 3, ("test",)),
    "anli_r1": ("anli/r1", ("train", "validation", "test"), "anli.yaml", ("anli", None), 3, ()),
    "anli_r2": ("anli/r2", ("train", "validation", "test"), "anli.yaml", ("anli", None), 3, ()),
    "anli_r3": ("anli/r3", ("train", "validation", "test"), "anli.yaml", ("anli", None), 3, ()),
    "copa": ("super_glue/copa", ("train", "validation", "test"), "copa.yaml", ("super_glue", "copa"), 2, ("test",)),
    "hellaswag": ("hellaswag", ("train", "validation", "test"), "hellaswag.yaml", ("hellaswag", None), 4, ("test",)),
    "story_cloze": ("story_cloze/2016", ("validation", "test"), "story_cloze.yaml", ("story_cloze", "2016"), 2, ()),
    "winogrande": ("winogrande", ("train_xs", "train_s", "train_m", "train_l", "train_xl", "validation", "test"),
                   "winogrande.yaml", ("winogrande", "winogrande_xl"), 2, ("test",)),
    "wsc": ("super_glue/wsc.fixed", ("train", "validation", "test"), "wsc.yaml", ("super_glue", "wsc.fixed"), 2, ("test",)),
    "wic": ("super_glue/wic", ("train", "validation", "test"), "wic.yaml", ("super_glue", "wic"), 2, ("test",)),
}


def _anli(ex: dict[str, Any]) -> dict[str, Any]:
  return dict(ex, premise=ex["context"])


def _hellaswag(ex: dict[str, Any]) -> dict[str, Any]:
  return dict(ex, ctx=ex["context"])


def _story_cloze(ex: dict[str, Any]) -> dict[str, Any]:
  """TFDS joins the four sentences into `context`; endings[i] is promptsource's sentence_quiz{i+1}."""
  if len(ex["endings"]) != 2:
    raise ValueError(f"field 'endings' must hold 2 endings, got {len(ex['endings'])}")
  if ex["label"] not in (1, 2):
    raise ValueError(f"field 'label' (AnswerRightEnding) must be 1 or 2, got {ex['label']}")
  return dict(ex, sentence_quiz1=ex["endings"][0], sentence_quiz2=ex["endings"][1],
              answer_right_ending=ex["label"], label=ex["label"] - 1)


def _winogrande(ex: dict[str, Any]) -> dict[str, Any]:
  return dict(ex, answer=str(ex["label"] + 1) if ex["label"] >= 0 else "")


ADAPTERS = {"anli_r1": _anli, "anli_r2": _anli, "anli_r3": _anli, "hellaswag": _hellaswag,
            "story_cloze": _story_cloze, "winogrande": _winogrande}


def templates_for(key: str, promptsource_dir: str | None = None) -> TemplateSet:
  """Our templates for `key`, or promptsource's original-task ones from a checkout."""
  _, _, file, (ps_dataset, ps_subset), _, _ = T0_HELDOUT[key]
  if promptsource_dir:
    return promptsource_templates(promptsource_dir, ps_dataset, ps_subset).filter(
        original_task_only=True, with_choices=True)
  return load_templates(os.path.join(TEMPLATE_DIR, file))


def specs(*, data_dir: str | None = None, manual_dir: str | None = None,
          promptsource_dir: str | None = None, task_ids: dict[str, int]) -> list[DatasetSpec]:
  """DatasetSpecs of the 11 T0 held-out datasets with the T-Few few-shot setup."""
  out = []
  for key, (tfds_name, splits, _, _, num_choices, unlabeled) in T0_HELDOUT.items():
    setup = fewshot.TFEW_SETUPS[key]
    source = TfdsSource(tfds_name, splits, name=f"tfds {tfds_name}", adapter=ADAPTERS.get(key),
                        data_dir=data_dir, manual_dir=manual_dir)
    out.append(DatasetSpec(key=key, source=source, templates=templates_for(key, promptsource_dir),
                           train_split=setup.train_split, eval_split=setup.eval_split,
                           num_shots=setup.num_shots, seeds=fewshot.TFEW_SEEDS,
                           num_choices=num_choices, unlabeled_splits=frozenset(unlabeled),
                           task_id=task_ids[key],
                           # promptsource's question-specific templates (COPA) render empty
                           # on the other examples: skipped there and counted.
                           skip_empty_renders=promptsource_dir is not None))
  return out
