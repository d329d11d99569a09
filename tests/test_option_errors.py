"""Every option a user sets through gin or a flag is checked where it is read, and a bad value
is one `error:` line naming the option (its gin macro), not a traceback (the assembly issue's
error contract)."""

from __future__ import annotations

import pathlib

import pytest

from ia3_jax import cli
from ia3_jax.peft import registry
from tests.test_cli_errors import LAYERS, SMALL, _error_lines

REPO = pathlib.Path(__file__).resolve().parents[1]
TOY = ["--gin.MIXTURE_OR_TASK_MODULES=['toy_tasks']", "--gin.MIXTURE_OR_TASK_NAME='toy_fewshot_seed0'"]


@pytest.mark.parametrize("flags, message", [
    (["--gin.TRAIN_STEPS=0"], "TRAIN_STEPS=0: must be a positive int"),
    (["--gin.TRAIN_STEPS=-5"], "TRAIN_STEPS=-5: must be a positive int"),
    (["--gin.BATCH_SIZE=0"], "BATCH_SIZE=0: must be a positive int"),
    (["--gin.BATCH_SIZE=-1"], "BATCH_SIZE=-1: must be a positive int"),
    (["--gin.BATCH_SIZE=6", "--gin.GRAD_ACCUM_STEPS=4"],
     "BATCH_SIZE=6 must be divisible by GRAD_ACCUM_STEPS=4"),
    (["--gin.LEARNING_RATE='nan'"], "LEARNING_RATE='nan': must be a finite number >= 0"),
    (["--gin.LEARNING_RATE=1e999"], "LEARNING_RATE=inf: must be a finite number >= 0"),
    (["--gin.TASK_FEATURE_LENGTHS={'inputs': 32}"],
     "TASK_FEATURE_LENGTHS={'inputs': 32}: a dict with 'inputs', 'targets'"),
    (["--gin.TASK_FEATURE_LENGTHS={'inputs': -3, 'targets': 4}"],
     "TASK_FEATURE_LENGTHS={'inputs': -3, 'targets': 4}: feature_lengths['inputs'] must be an "
     "int >= 2, got -3"),
    (["--gin.MIXTURE_OR_TASK_MODULES=['no_such_tasks']"],
     "MIXTURE_OR_TASK_MODULES: no module named 'no_such_tasks'"),
    (["--gin.DROPOUT_RATE=1.5"], "DROPOUT_RATE=1.5: must be a number in [0, 1)"),
    (["--gin_file=peft/lora.gin", "--gin.lora.LoraConfig.rank=0"],
     "lora.LoraConfig.rank=0: must be a positive int"),
    (["--gin_file=peft/lora.gin", "--gin.lora.LoraConfig.dropout=1.0"],
     "lora.LoraConfig.dropout=1.0: must be in [0, 1)"),
    (["--gin.ia3.IA3Config.sites=('k', 'x')"], "ia3.IA3Config.sites=('k', 'x'): "),
    (["--gin_file=peft/method.gin", "--gin.PEFT_METHOD='lorra'"],
     "PEFT_METHOD='lorra': unknown PEFT method; known: " + ", ".join(registry.method_names())),
    (["--gin_file=peft/method.gin", "--gin.PEFT_METHOD='lora'", "--gin.registry.make.rnak=2"],
     "PEFT_OPTIONS: lora has no hyper-parameter 'rnak'"),
    (["--gin_file=peft/lora.gin", "--gin.NUM_TASKS=2"],
     "NUM_TASKS=2: lora does not support mixed-task batches"),
    (["--gin.NUM_TASKS=0"], "NUM_TASKS=0: must be a positive int"),
    (["--gin.NUM_TASKS=2"], "is out of range: the ia3 bank has 2 rows (NUM_TASKS=2)"),
    (["--gin.FROZEN_DTYPE='int3'"], "FROZEN_DTYPE='int3' is not one of float32, bfloat16"),
    (["--gin.SCAN_LAYERS='yes'"], "SCAN_LAYERS='yes': must be True or False"),
    (["--gin.REMAT='some'"], "REMAT='some': choose from"),
    (["--gin.MAX_CHOICES_PER_STEP=0"], "MAX_CHOICES_PER_STEP=0: must be a positive int or None"),
    (["--gin.TRAINABLE_PARAMS=['nope_.*']"],
     "TRAINABLE_PARAMS: trainable pattern 'nope_.*' matches no param"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_option_is_one_line_naming_it(flags, message, tmp_path, capsys, monkeypatch):
  monkeypatch.syspath_prepend(str(REPO / "examples" / "toy"))
  argv = ["train", *LAYERS, *SMALL, *TOY, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", *flags]
  assert cli.main(argv) == 1
  err = capsys.readouterr().err
  assert "Traceback" not in err and "In call to configurable" not in err, err[-3000:]
  assert _error_lines(err) == [err.strip().splitlines()[-1]], err[-3000:]
  assert message in err.strip().splitlines()[-1]
  assert not (tmp_path / "run").exists()  # nothing left behind


def test_an_unknown_demo_task_is_one_line(tmp_path, capsys):
  assert cli.main(["demo", "--gin.DEMO_TASKS=('nope',)",
                   f"--gin.MODEL_DIR='{tmp_path / 'demo'}'"]) == 1
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert "families ['nope'] (DEMO_TASKS, --families) are not held-out demo families" in err
  assert not (tmp_path / "demo").exists()
