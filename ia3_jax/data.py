"""The data API in one namespace: register seqio tasks (`registration`), read batches (`batches`).

    from ia3_jax import data
    data.register_task("my_task", {"train": "train.jsonl"}, "templates.yaml")
    batches = data.get_batches("my_task_fewshot_seed0", "train", 8, lengths)

Each name lives in the module after the colon; this module only re-exports them.
"""

from ia3_jax.batches import (BatchIterator, BatchSource, SeqioBatches, get_batches,
                             op_error_message, truncation_report)
from ia3_jax.registration import (FIRST_USER_TASK_ID, RUN_MODEL_MACRO, SPM_PATH_ENV, DatasetSpec,
                                  ModelVocabulary, Registered, RenderedSource, TaskInfo,
                                  add_mixture, clear_cache, default_vocabulary, get_task_info,
                                  lookup, output_features, register_dataset, register_task,
                                  register_task_id, registered_names, rendered_examples,
                                  resolve_default_vocabulary, run_model_path,
                                  select_first_template, select_random_template,
                                  set_default_vocabulary, task_id, task_ids, tokenize_prompted)

__all__ = [
    "BatchIterator", "BatchSource", "SeqioBatches", "get_batches", "op_error_message",
    "truncation_report", "FIRST_USER_TASK_ID", "RUN_MODEL_MACRO", "SPM_PATH_ENV", "DatasetSpec",
    "ModelVocabulary", "Registered", "RenderedSource", "TaskInfo", "add_mixture", "clear_cache",
    "default_vocabulary", "get_task_info", "lookup", "output_features", "register_dataset",
    "register_task", "register_task_id", "registered_names", "rendered_examples",
    "resolve_default_vocabulary", "run_model_path", "select_first_template",
    "select_random_template", "set_default_vocabulary", "task_id", "task_ids",
    "tokenize_prompted",
]
