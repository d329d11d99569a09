"""From raw examples to batches: sources, few-shot samples, templates, seqio tasks, converters.

The data API in one namespace, each name from its home module (imported on first use, so
that `ia3_jax.data.sources` and friends load without seqio and TensorFlow):

    from ia3_jax import data
    data.register_task("my_task", {"train": "train.jsonl"}, "templates.yaml")
    batches = data.get_batches("my_task_fewshot_seed0", "train", 8, lengths)
"""

import importlib
from typing import Any

_HOMES = {
    **{name: "batches" for name in (
        "BatchIterator", "SeqioBatches", "get_batches", "op_error_message",
        "truncation_report")},
    "BatchSource": "features",
    **{name: "registration" for name in (
        "DatasetSpec", "Registered", "RenderedSource", "TaskInfo", "add_mixture", "clear_cache",
        "dataset_template_names", "get_task_info", "lookup", "output_features",
        "register_dataset", "register_task", "registered_names", "rendered_examples",
        "select_first_template", "select_random_template", "tokenize_prompted")},
    **{name: "vocabularies" for name in (
        "RUN_MODEL_MACRO", "SPM_PATH_ENV", "ModelVocabulary", "default_vocabulary",
        "resolve_default_vocabulary", "run_model_path", "set_default_vocabulary")},
    **{name: "task_registry" for name in (
        "FIRST_USER_TASK_ID", "register_task_id", "task_id", "task_ids")},
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
  home = _HOMES.get(name)
  if home is None:
    raise AttributeError(f"module 'ia3_jax.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"ia3_jax.data.{home}"), name)
  globals()[name] = value
  return value
