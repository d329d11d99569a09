"""Registers the toy task for ia3-jax runs (MIXTURE_OR_TASK_MODULES)."""
import os
import seqio
from ia3_jax import data
HERE = os.path.dirname(os.path.abspath(__file__))
data.register_task("toy", {"train": os.path.join(HERE, "train.jsonl"),
                           "validation": os.path.join(HERE, "validation.jsonl")},
                   os.path.join(HERE, "toy.yaml"),
                   vocabulary=seqio.SentencePieceVocabulary(os.path.join(HERE, "spm.model")),
                   num_shots=16, seeds=(0,), num_choices=2)
