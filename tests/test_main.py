"""Entry points: gin layering and error messages, and the README's command lines end to end
(ia3-jax train on a JSONL task from an HF base, then eval / infer / score / export-peft /
merge / convert)."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ia3_jax import cli, gin_configurables, main
from tests import trainer_utils as tu

REPO = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ["--gin_file=models/tiny.gin", "--gin_file=recipes/t_few.gin", "--gin_file=peft/ia3.gin"]
REQUIRED = ["--gin.MODEL_DIR='/tmp/unused'", "--gin.MIXTURE_OR_TASK_NAME='toy_fewshot_seed0'",
            "--gin.INITIAL_CHECKPOINT_PATH=None"]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """Shared persistent compilation cache (see trainer_utils.compilation_cache_dir)."""
  path = tu.compilation_cache_dir(tmp_path_factory)
  tu.enable_compilation_cache(path)
  return path


def _run_main(argv, capsys, action=None):
  rc = main.main(argv, action=action)
  out = capsys.readouterr()
  return rc, out.out, out.err


# --------------------------------------------------------------------------- gin


def test_shipped_gin_files_are_package_data():
  root = pathlib.Path(gin_configurables.gin_dir())
  assert (root / "runs" / "finetune.gin").exists() and (root / "peft" / "ia3.gin").exists()
  shipped = main.shipped_gin_files()
  for name in ("models/tiny.gin", "models/t0_3b.gin", "models/t0_11b.gin", "recipes/t_few.gin",
               "peft/full_finetune.gin", "runs/finetune.gin", "runs/eval.gin",
               "runs/score.gin", "runs/infer.gin"):
    assert name in shipped


@pytest.mark.parametrize("model", ["tiny", "t5_1_1_small", "t0_3b", "t0_11b", "mt5_base"])
def test_layered_config_parses_from_another_directory(model, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # files resolve through the package's gin directory
  rc, out, err = _run_main([f"--gin_file=models/{model}.gin", *LAYERS[1:], *REQUIRED,
                            "--model_parallel=1", "--print_config"], capsys, action="train")
  assert rc == 0, err
  assert "partitioning.PartitionConfig.model_parallel = 1" in out  # the mesh flag
  assert f"config.get_config.name = '{model}'" in out
  assert "optimizers.OptimizerConfig.learning_rate = %LEARNING_RATE" in out
  assert "LEARNING_RATE = 0.003" in out and "TRAIN_STEPS = 1000" in out


@pytest.mark.parametrize("peft", sorted(p.stem for p in (
    pathlib.Path(gin_configurables.gin_dir()) / "peft").glob("*.gin")))
@pytest.mark.parametrize("run", ["train", "eval"])
def test_every_peft_file_fits_the_run_files(peft, run, capsys):
  """Each method's gin file provides what runs/*.gin consume (PEFT, through MODEL)."""
  extra = REQUIRED if run == "train" else [
      "--gin.CHECKPOINT_PATH=None", "--gin.EVAL_OUTPUT_DIR='/tmp/unused'",
      "--gin.MIXTURE_OR_TASK_NAME='x'", "--gin.INITIAL_CHECKPOINT_PATH=None"]
  if peft == "method":  # any registered method by name
    extra = [*extra, "--gin.PEFT_METHOD='lora'"]
  rc, out, err = _run_main([*LAYERS[:2], f"--gin_file=peft/{peft}.gin", *extra,
                            "--print_config"], capsys, action=run)
  assert rc == 0, err
  assert "PEFT = @" in out and "model = %MODEL" in out


def test_full_finetune_overrides_the_recipe(capsys):
  rc, out, err = _run_main([*LAYERS[:2], "--gin_file=peft/full_finetune.gin", *REQUIRED,
                            "--gin_file=runs/finetune.gin", "--print_config"], capsys)
  assert rc == 0, err
  assert "LEARNING_RATE = 0.0003" in out and "TRAIN_STEPS = 300" in out
  assert "PEFT = @full.FullConfig()" in out


def test_explicit_trainable_params_override_the_method(capsys):
  """--gin.TRAINABLE_PARAMS wins over the method's registry patterns."""
  rc, out, err = _run_main([*LAYERS, *REQUIRED, "--gin_file=runs/finetune.gin",
                            "--gin.TRAINABLE_PARAMS=['.*ia3_key']", "--print_config"], capsys)
  assert rc == 0, err
  assert "TRAINABLE_PARAMS = ['.*ia3_key']" in out


def test_missing_macro_names_the_file_that_needs_it(capsys):
  rc, _, err = _run_main(["--gin_file=models/tiny.gin", "--gin_file=peft/ia3.gin", *REQUIRED,
                          "--print_config"], capsys, action="train")  # no recipe
  assert rc == 2
  assert "No bindings specified for '" in err  # gin's own message
  assert "is not defined; it is used by:" in err
  assert os.path.join("runs", "finetune.gin") + ":" in err
  assert "--gin." in err


def test_required_macro_names_the_file(capsys):
  rc, _, err = _run_main([*LAYERS, "--gin.MIXTURE_OR_TASK_NAME='x'",
                          "--gin.INITIAL_CHECKPOINT_PATH=None", "--print_config"],
                         capsys, action="train")
  assert rc == 2
  assert "MODEL_DIR/macro.value set to `%gin.REQUIRED`" in err
  assert "macro MODEL_DIR is required by:" in err and "finetune.gin" in err


def test_unknown_binding_in_a_file_names_file_and_line(capsys, tmp_path):
  (tmp_path / "mine.gin").write_text("from __gin__ import dynamic_registration\n"
                                     "from ia3_jax.train import loop\n\n"
                                     "loop.TrainConfig.bogus = 1\n")
  rc, _, err = _run_main([*LAYERS, "--gin_file=mine.gin", f"--gin_search_paths={tmp_path}",
                          *REQUIRED, "--print_config"], capsys, action="train")
  assert rc == 2
  assert "Configurable 'loop.TrainConfig' doesn't have a parameter named 'bogus'" in err
  assert f'In file "{tmp_path / "mine.gin"}", line 4' in err


def test_unknown_gin_file_lists_the_shipped_ones(capsys):
  rc, _, err = _run_main(["--gin_file=models/nope.gin"], capsys)
  assert rc == 2 and "models/nope.gin" in err and "models/t0_3b.gin" in err


def test_cli_rejects_another_runs_file(capsys):
  rc, _, err = _run_main([*LAYERS, "--gin_file=runs/finetune.gin"], capsys, action="eval")
  assert rc == 2 and "eval uses runs/eval.gin" in err


@pytest.mark.parametrize("mode", ["reuse", "system"])
def test_host_memory_flag(mode, capsys, caplog):
  import jax
  jax.devices()  # started, as in every test process: an in-process run can only say so
  with caplog.at_level(logging.INFO, logger="ia3_jax"):
    rc, _, err = _run_main([*LAYERS, *REQUIRED, f"--host_memory={mode}", "--print_config"],
                           capsys, action="train")
  assert rc == 0, err
  said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("host memory")]
  assert said == (["host memory: left to the system (the JAX backend has already started)"]
                  if mode == "reuse" else [])


def test_host_memory_flag_names_its_choices(capsys):
  with pytest.raises(SystemExit) as e:
    main.main([*LAYERS, *REQUIRED, "--host_memory=pool"], action="train")
  assert e.value.code == 2
  assert "--host_memory: invalid choice: 'pool' (choose from" in capsys.readouterr().err


def test_gin_flag_splitting():
  rest, bindings = main.split_gin_flags(["--gin.A=1", "--gin_file=x.gin", "--gin.B", "'v'"])
  assert rest == ["--gin_file=x.gin"] and bindings == ["A = 1", "B = 'v'"]


# --------------------------------------------------------------------------- end to end

TOY_TASK = REPO / "examples" / "toy"  # JSONL splits, templates, a 64-piece vocabulary, task module


def make_toy_task(root: pathlib.Path) -> None:
  """A copy of the bundled toy task (examples/toy, the README's own-data example) in `root`."""
  shutil.copytree(TOY_TASK, root)


def _console_script() -> list[str]:
  script = pathlib.Path(sys.executable).parent / "ia3-jax"
  return [str(script)] if script.exists() else [sys.executable, "-m", "ia3_jax.cli"]


def _train_from_the_command_line(root: pathlib.Path, cache: pathlib.Path):
  """`ia3-jax train` as the README shows, from an HF base directory (a subprocess)."""
  model_dir = root / "model"
  args = _console_script() + [
      "train", *LAYERS,
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.MIXTURE_OR_TASK_NAME='toy_fewshot_seed0'",
      "--gin.EVAL_MIXTURE_OR_TASK_NAME='toy_eval'",
      "--gin.MIXTURE_OR_TASK_MODULES=['toy_tasks']",
      f"--gin.INITIAL_CHECKPOINT_PATH='{root / 'base'}'",
      "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=4", "--gin.CHECKPOINT_PERIOD=3",
      "--gin.EVAL_PERIOD=3",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4, 'num_choices': 2}",
      "--gin.loop.TrainConfig.log_period=3"]
  env = tu.child_env(cache)
  env["PYTHONPATH"] = os.pathsep.join([str(root / "toy"), str(REPO)])
  proc = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  results = json.loads((model_dir / "results.json").read_text())
  assert results["step"] == 6 and len(results["train_losses"]) == 6
  assert results["params"]["trainable"] == 640
  assert sorted(os.listdir(model_dir / "checkpoints")) == ["3", "6"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(model_dir / "train"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(model_dir / "eval"))
  logs = proc.stdout + proc.stderr
  assert "[6] train/accuracy=" in logs and "train/loss=" in logs  # metrics on stdout
  assert "steps_per_s=" in logs  # the progress bar
  assert sorted(results["eval"]) == ["3", "6"]  # every EVAL_PERIOD steps, and at the end
  final_eval = results["eval"]["6"]
  assert final_eval["num_examples"] == 48
  assert set(final_eval["per_template"]) == {"is it positive", "review sentiment"}
  return model_dir, final_eval


def _eval_infer_score(root: pathlib.Path, model_dir: pathlib.Path, trained_eval: dict):
  common = [*LAYERS, f"--gin.CHECKPOINT_PATH='{model_dir}'",
            "--gin.MIXTURE_OR_TASK_NAME='toy_eval'", "--gin.MIXTURE_OR_TASK_MODULES=['toy_tasks']",
            f"--gin.INITIAL_CHECKPOINT_PATH='{root / 'base'}'", "--gin.BATCH_SIZE=4",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4, 'num_choices': 2}"]
  out_dir = root / "eval_out"
  assert cli.main(["eval", *common, f"--gin.EVAL_OUTPUT_DIR='{out_dir}'"]) == 0
  evaluated = json.loads((out_dir / "eval_results.json").read_text())
  assert evaluated["step"] == 6 and evaluated["num_examples"] == 48
  assert evaluated["num_correct"] == trained_eval["num_correct"]  # same checkpoint, same data
  # The same checkpoint in the scanned layout (SCAN_LAYERS): the same predictions.
  assert cli.main(["eval", *common, "--gin.SCAN_LAYERS=True",
                   f"--gin.EVAL_OUTPUT_DIR='{root / 'eval_scan'}'"]) == 0
  scanned = json.loads((root / "eval_scan" / "eval_results.json").read_text())
  assert scanned["num_correct"] == evaluated["num_correct"]
  # The same checkpoint over an int8 base (FROZEN_DTYPE): every example, close accuracy.
  assert cli.main(["eval", *common, "--gin.FROZEN_DTYPE='int8'",
                   f"--gin.EVAL_OUTPUT_DIR='{root / 'eval_int8'}'"]) == 0
  int8 = json.loads((root / "eval_int8" / "eval_results.json").read_text())
  assert int8["num_examples"] == 48 and abs(int8["num_correct"] - evaluated["num_correct"]) <= 6

  infer_dir = root / "infer_out"
  assert cli.main(["infer", *common, f"--gin.INFER_OUTPUT_DIR='{infer_dir}'"]) == 0
  rows = [json.loads(l) for l in (infer_dir / "predictions.jsonl").read_text().splitlines()]
  assert len(rows) == 48
  choices = {0: ["yes", "no"], 1: ["good", "bad"]}  # the two templates' answer choices
  for r in rows:
    assert r["prediction_text"] == choices[r["template_id"]][r["prediction"]]
  assert sum(r["prediction"] == r["label"] for r in rows) == evaluated["num_correct"]

  assert cli.main(["score", *common, f"--gin.INFER_OUTPUT_DIR='{infer_dir}'"]) == 0
  scored = [json.loads(l) for l in (infer_dir / "scores.jsonl").read_text().splitlines()]
  assert [int(np.argmax(r["scores"])) for r in scored] == [r["prediction"] for r in rows]


def _export_merge_convert(root: pathlib.Path, model_dir: pathlib.Path):
  adapter = root / "adapter"
  assert cli.main(["export-peft", "--checkpoint", str(model_dir), "--out", str(adapter)]) == 0
  config = json.loads((adapter / "adapter_config.json").read_text())
  assert config["peft_type"] == "IA3" and set(config["target_modules"]) == {"k", "v", "wo"}
  merged = root / "merged"
  assert cli.main(["merge", "--base", str(root / "base"), "--ia3", str(model_dir),
                   "--out", str(merged)]) == 0
  assert (merged / "config.json").exists() and (merged / "model.safetensors").exists()
  orbax_dir = root / "base_orbax"
  assert cli.main(["convert", str(root / "base"), str(orbax_dir)]) == 0
  from ia3_jax.interop import hf_checkpoints
  _, want = hf_checkpoints.load_hf_checkpoint(root / "base")
  got = hf_checkpoints.restore_params(orbax_dir)
  np.testing.assert_array_equal(np.asarray(got["encoder"]["layers_0"]["mlp"]["wo"]["kernel"]),
                                want["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])


def test_readme_command_lines_end_to_end(tmp_path, compile_cache, monkeypatch):
  """train (console script, subprocess) on a JSONL task from an HF base; then eval, infer,
  score, export-peft, merge and convert the result (one test: training is the expensive part)."""
  from tests import hf_utils
  make_toy_task(tmp_path / "toy")
  hf_utils.make_hf_model(tmp_path / "base", "t5_1_1", "small")  # the tiny preset's shape
  model_dir, trained_eval = _train_from_the_command_line(tmp_path, compile_cache)
  monkeypatch.syspath_prepend(str(tmp_path / "toy"))
  _eval_infer_score(tmp_path, model_dir, trained_eval)
  _export_merge_convert(tmp_path, model_dir)


def test_costs_subcommand(capsys):
  assert cli.main(["costs"]) == 0
  assert "FLOPs" in capsys.readouterr().out


def test_unknown_subcommand(capsys):
  assert cli.main(["frobnicate"]) == 2
  assert "unknown command" in capsys.readouterr().err
