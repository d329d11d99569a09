"""Entry points on bad input: one line naming the file / flag / field, an exit status, no
traceback (unless --verbose), no hang; Ctrl-C; no start-up noise; --help lists the gin macros."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from ia3_jax import cli, main
from ia3_jax.errors import CheckpointError, TrainingInterrupted
from tests import trainer_utils as tu

REPO = pathlib.Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "toy"
LAYERS = ["--gin_file=models/tiny.gin", "--gin_file=recipes/t_few.gin", "--gin_file=peft/ia3.gin"]
SMALL = ["--gin.INITIAL_CHECKPOINT_PATH=None", "--gin.BATCH_SIZE=4",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4, 'num_choices': 2}"]
NOISE = ("cuInit", "cuda drivers", "InitializeLog", "Metadata file does not exist")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  path = tu.compilation_cache_dir(tmp_path_factory)
  tu.enable_compilation_cache(path)
  return path


def _console_script() -> list[str]:
  script = pathlib.Path(sys.executable).parent / "ia3-jax"
  return [str(script)] if script.exists() else [sys.executable, "-m", "ia3_jax.cli"]


def _user_env(cache: pathlib.Path, task_dir: pathlib.Path) -> dict:
  """A subprocess environment like a user's shell: no TF log level or GPU hiding set for it."""
  env = tu.child_env(cache)
  for name in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES", "IA3_JAX_VERBOSE"):
    env.pop(name, None)
  env["PYTHONPATH"] = os.pathsep.join([str(task_dir), str(REPO)])
  return env


def _task_dir(root: pathlib.Path, *, drop_field_on_line: int | None = None,
              bad_json_on_line: int | None = None) -> pathlib.Path:
  """The toy task as a user's own module: `mine_fewshot_seed0` and `mine_train` (whole split)."""
  d = root / "task"
  d.mkdir()
  for f in ("spm.model", "toy.yaml", "validation.jsonl"):
    shutil.copy(TOY / f, d / f)
  lines = (TOY / "train.jsonl").read_text().splitlines()
  if drop_field_on_line is not None:
    row = json.loads(lines[drop_field_on_line - 1])
    del row["text"]
    lines[drop_field_on_line - 1] = json.dumps(row)
  if bad_json_on_line is not None:
    lines[bad_json_on_line - 1] = '{"text": "unterminated'
  (d / "train.jsonl").write_text("\n".join(lines) + "\n")
  (d / "mine_tasks.py").write_text(textwrap.dedent("""\
      import os
      import seqio
      from ia3_jax import data
      HERE = os.path.dirname(os.path.abspath(__file__))
      files = {"train": os.path.join(HERE, "train.jsonl"),
               "validation": os.path.join(HERE, "validation.jsonl")}
      vocab = seqio.SentencePieceVocabulary(os.path.join(HERE, "spm.model"))
      data.register_task("mine", files, os.path.join(HERE, "toy.yaml"), vocabulary=vocab,
                         num_shots=16, seeds=(0,), num_choices=2, replace=True)
      data.register_task("whole", files, os.path.join(HERE, "toy.yaml"), vocabulary=vocab,
                         num_shots=None, num_choices=2, replace=True)
      """))
  return d


def _train_args(model_dir, task, steps=2):
  return ["train", *LAYERS, *SMALL, f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.MIXTURE_OR_TASK_NAME='{task}'", "--gin.MIXTURE_OR_TASK_MODULES=['mine_tasks']",
          f"--gin.TRAIN_STEPS={steps}"]


def _error_lines(err: str) -> list[str]:
  return [l for l in err.splitlines() if l.startswith("error:")]


# --------------------------------------------------------------------------- subprocesses


def test_streamed_data_error_stops_at_once_with_one_line(tmp_path, compile_cache):
  """A missing field in a whole-split (streamed) training task: exit 1 at once, one line."""
  task = _task_dir(tmp_path, drop_field_on_line=6)
  start = time.time()
  proc = subprocess.run(_console_script() + _train_args(tmp_path / "run", "whole_train"),
                        env=_user_env(compile_cache, task), cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: whole_train: {task / 'train.jsonl'}, line 6: "
                         "template 'is it positive'"), last
  assert "missing field 'text'" in last
  assert _error_lines(proc.stderr) == [last]
  assert not [n for n in NOISE if n in proc.stderr], proc.stderr[-3000:]
  assert time.time() - start < 120


def test_train_and_export_print_no_start_up_noise(tmp_path, compile_cache):
  task = _task_dir(tmp_path)
  env = _user_env(compile_cache, task)
  run = tmp_path / "run"
  train = subprocess.run(_console_script() + _train_args(run, "mine_fewshot_seed0"), env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=400)
  assert train.returncode == 0, train.stderr[-3000:]
  export = subprocess.run(_console_script() + ["export-peft", "--checkpoint", str(run), "--out",
                                               str(tmp_path / "adapter")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=200)
  assert export.returncode == 0, export.stderr[-3000:]
  for proc in (train, export):
    assert not [n for n in NOISE if n in proc.stderr], proc.stderr[-3000:]
  assert (tmp_path / "adapter" / "adapter_config.json").exists()


def _signal_mid_run(args, env, cwd, sig) -> tuple[int, str]:
  """Starts a training command, sends `sig` once its progress bar moves; (status, stderr)."""
  proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
  seen = ""
  try:
    while "it/s" not in seen:  # training has started (the progress bar moves)
      chunk = proc.stderr.read(64)
      assert chunk, seen[-3000:]
      seen += chunk
    proc.send_signal(sig)
    err = seen + proc.communicate(timeout=120)[1]
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, err


def test_sigint_prints_one_line_and_exits_130(tmp_path, compile_cache):
  task = _task_dir(tmp_path)
  returncode, err = _signal_mid_run(
      _console_script() + _train_args(tmp_path / "run", "mine_fewshot_seed0", steps=100000),
      _user_env(compile_cache, task), tmp_path, signal.SIGINT)
  assert returncode == 130, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last == "interrupted" or (last.startswith("interrupted at step ")
                                   and last.endswith("; the same command resumes")), last


def test_sigterm_saves_exits_0_and_the_same_command_resumes_exactly(tmp_path, compile_cache):
  """A preemption notice (SIGTERM) mid-run: a checkpoint, one line, exit 0; the same command
  finishes the run with the params of an uninterrupted one, bit for bit."""
  from ia3_jax.train import checkpointer
  task = _task_dir(tmp_path)
  (task / "slow_steps.py").write_text(textwrap.dedent("""\
      import time
      from ia3_jax.train import trainer
      _step = trainer.Trainer.step
      def _slow(self, state, batch):  # time to send the signal mid-run
        time.sleep(0.3)
        return _step(self, state, batch)
      trainer.Trainer.step = _slow
      """))
  env = _user_env(compile_cache, task)
  steps = 8
  # The uninterrupted run needs no slow steps (they change the timing, not the numbers).
  whole = subprocess.run(_console_script() + _train_args(tmp_path / "whole", "mine_fewshot_seed0",
                                                         steps=steps),
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
  assert whole.returncode == 0, whole.stderr[-3000:]
  args = _console_script() + _train_args(tmp_path / "run", "mine_fewshot_seed0", steps=steps) + [
      "--gin.MIXTURE_OR_TASK_MODULES=['mine_tasks', 'slow_steps']"]
  returncode, err = _signal_mid_run(args, env, tmp_path, signal.SIGTERM)
  assert returncode == 0 and "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("preempted (SIGTERM) at step ") and last.endswith(
      ": checkpoint saved; the same command resumes"), last
  stopped = int(last.split("at step ")[1].split(":")[0])
  assert 0 < stopped < steps, last
  resumed = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=400)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr + resumed.stdout
  want, _ = checkpointer.restore_trainable(tmp_path / "whole")
  got, _ = checkpointer.restore_trainable(tmp_path / "run")
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- gin flags


def _run_main(argv, capsys, action="train"):
  rc = main.main(argv, action=action)
  out = capsys.readouterr()
  return rc, out.out, out.err


REQUIRED = ["--gin.MODEL_DIR='/tmp/unused'", "--gin.MIXTURE_OR_TASK_NAME='x'",
            "--gin.INITIAL_CHECKPOINT_PATH=None"]


def test_misspelt_macro_names_the_flag(capsys):
  rc, _, err = _run_main([*LAYERS, *REQUIRED, "--gin.TRAIN_STEP=5", "--print_config"], capsys)
  assert rc == 2
  assert _error_lines(err) == [err.strip()]
  assert "--gin.TRAIN_STEP=5" in err and "did you mean TRAIN_STEPS" in err


def test_macros_of_the_files_are_accepted(capsys):
  rc, out, err = _run_main([*LAYERS, *REQUIRED, "--gin.TRAIN_STEPS=5", "--gin.NUM_TASKS=2",
                            "--print_config"], capsys)
  assert rc == 0, err
  assert "TRAIN_STEPS = 5" in out and "NUM_TASKS = 2" in out


def test_unknown_configurable_parameter_still_rejected_by_gin(capsys):
  rc, _, err = _run_main([*LAYERS, *REQUIRED, "--gin.loop.TrainConfig.bogus=1",
                          "--print_config"], capsys)
  assert rc == 2 and "doesn't have a parameter named 'bogus'" in err


@pytest.mark.parametrize("value", ["runs/x", "/tmp/x"])
def test_unquoted_string_names_the_flag_and_the_quoting(value, capsys):
  rc, _, err = _run_main([*LAYERS, *REQUIRED[1:], f"--gin.MODEL_DIR={value}", "--print_config"],
                         capsys)
  assert rc == 2
  assert err.strip() == (f"error: --gin.MODEL_DIR={value}: unable to parse value {value!r}; "
                         f"a string needs inner quotes: --gin.MODEL_DIR=\"'{value}'\"")


# --------------------------------------------------------------------------- one line, exit 1


def _read_only_dir(tmp_path: pathlib.Path) -> str:
  """A directory no one can create: under a read-only directory, or in /sys for root."""
  if os.geteuid() == 0:
    return "/sys/ia3_jax_test_run"
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  return str(ro / "run")


def test_read_only_model_dir_fails_before_loading(tmp_path, capsys):
  model_dir = _read_only_dir(tmp_path)
  start = time.time()
  rc = cli.main(["train", *LAYERS, *SMALL, f"--gin.MODEL_DIR='{model_dir}'",
                 "--gin.MIXTURE_OR_TASK_NAME='toy_fewshot_seed0'"])
  out = capsys.readouterr()
  assert rc == 1
  assert out.err.strip().startswith(f"error: MODEL_DIR={model_dir!r} is not a writable directory")
  assert "--gin.MODEL_DIR" in out.err and len(out.err.strip().splitlines()) == 1
  assert "mesh" not in out.out + out.err  # nothing was built
  assert time.time() - start < 10


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_shows_the_traceback(how, tmp_path, capsys, monkeypatch):
  argv = ["train", *LAYERS, *SMALL, f"--gin.MODEL_DIR='{_read_only_dir(tmp_path)}'",
          "--gin.MIXTURE_OR_TASK_NAME='x'"]
  if how == "flag":
    argv.append("--verbose")
  else:
    monkeypatch.setenv("IA3_JAX_VERBOSE", "1")
  assert cli.main(argv) == 1
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and "ConfigError" in err
  assert err.strip().splitlines()[-1].startswith("error: MODEL_DIR=")


def test_unknown_task_name_is_one_line(tmp_path, capsys, compile_cache):
  rc = cli.main(["train", *LAYERS, *SMALL, f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                 "--gin.MIXTURE_OR_TASK_NAME='toy_fewshot_seed9'", "--gin.TRAIN_STEPS=2"])
  err = capsys.readouterr().err
  assert rc == 1
  assert "Traceback" not in err and "In call to configurable" not in err
  assert _error_lines(err) == [err.strip().splitlines()[-1]]
  assert "unknown task or mixture name 'toy_fewshot_seed9'" in err


def test_bad_jsonl_line_is_one_line(tmp_path, capsys, compile_cache, monkeypatch):
  task = _task_dir(tmp_path, bad_json_on_line=3)
  monkeypatch.syspath_prepend(str(task))
  monkeypatch.delitem(sys.modules, "mine_tasks", raising=False)
  rc = cli.main(_train_args(tmp_path / "run", "mine_fewshot_seed0"))
  err = capsys.readouterr().err
  assert rc == 1
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert _error_lines(err) == [last]
  assert f"{task / 'train.jsonl'}" in last and "line 3" in last


def test_convert_without_config_json(tmp_path, capsys):
  (tmp_path / "src").mkdir()
  assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
  err = capsys.readouterr().err
  assert err.strip() == (f"error: {tmp_path / 'src'}: no config.json (not an HF model directory) "
                         "and no _METADATA (not an orbax param checkpoint)")


@pytest.mark.parametrize("argv", [
    ["export-peft", "--checkpoint", "{d}", "--out", "{d}/out"],
    ["merge", "--base", "{d}", "--ia3", "{d}", "--out", "{d}/out"],
])
def test_checkpoint_errors_are_one_line(argv, tmp_path, capsys):
  rc = cli.main([a.format(d=tmp_path) for a in argv])
  err = capsys.readouterr().err
  assert rc == 1
  assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {tmp_path}")


@pytest.mark.parametrize("raised, line", [
    (KeyboardInterrupt(), "interrupted"),
    (TrainingInterrupted(step=7), "interrupted at step 7; the same command resumes"),
])
def test_interrupts_reaching_the_entry_point(raised, line, monkeypatch, capsys):
  def interrupted(argv):
    raise raised
  monkeypatch.setattr(cli, "convert", interrupted)
  assert cli.main(["convert", "a", "b"]) == 130
  assert capsys.readouterr().err == line + "\n"


def test_bugs_keep_their_traceback(monkeypatch):
  def broken(argv):
    raise ZeroDivisionError("a bug")
  monkeypatch.setattr(cli, "convert", broken)
  with pytest.raises(ZeroDivisionError):
    cli.main(["convert", "a", "b"])


def test_domain_error_in_a_command_is_one_line(monkeypatch, capsys):
  def failing(argv):
    raise CheckpointError("/x: no such checkpoint")
  monkeypatch.setattr(cli, "convert", failing)
  assert cli.main(["convert", "a", "b"]) == 1
  assert capsys.readouterr().err == "error: /x: no such checkpoint\n"


# --------------------------------------------------------------------------- help


def _help(argv, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 0
  return capsys.readouterr().out


def test_train_help_lists_the_macros(capsys):
  text = _help(["train", "--help"], capsys)
  for name in ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "INITIAL_CHECKPOINT_PATH", "TRAIN_STEPS",
               "BATCH_SIZE", "EVAL_MIXTURE_OR_TASK_NAME", "--verbose"):
    assert name in text
  assert "TRAIN_STEPS                = 1000  (recipes/t_few.gin)" in text
  assert "EVAL_PERIOD                = 0" in text


@pytest.mark.parametrize("cmd, names", [
    ("eval", ["CHECKPOINT_PATH", "EVAL_OUTPUT_DIR", "SPLIT"]),
    ("infer", ["INFER_OUTPUT_DIR"]),
    ("demo", ["DEMO_TRAIN_STEPS", "DEMO_SEEDS", "MODEL_DIR"]),
])
def test_run_help_lists_that_runs_macros(cmd, names, capsys):
  text = _help([cmd, "--help"], capsys)
  assert all(n in text for n in names)


@pytest.mark.parametrize("cmd, flags", [
    ("export-peft", ["--task", "--convention", "--base_model_name_or_path"]),
    ("convert", ["--model_type", "--to", "--model"]),
    ("merge", ["--task", "--format", "--model_type"]),
    ("combine", ["--method", "--adapters", "--weights", "--lambda", "--k", "--convention"]),
    ("raft-submission", ["--predictions", "--out", "--raft_dir"]),
])
def test_every_flag_has_help(cmd, flags, capsys):
  text = _help([cmd, "--help"], capsys)
  lines = text.splitlines()
  for flag in flags:
    i = next(i for i, l in enumerate(lines) if l.strip().startswith(flag + " "))
    described = lines[i].strip()[len(flag):].split(None, 1)  # "FLAG {choices}  help"
    assert len(described) > 1 or lines[i + 1].startswith(" " * 10), (flag, lines[i])


def test_streamed_data_error_is_clean_and_closes_the_stream(tmp_path, monkeypatch):
  """The library level of the streamed-data fix: the DataError's own message, stream closed."""
  import importlib
  from ia3_jax import data
  from ia3_jax.errors import DataError
  task = _task_dir(tmp_path, drop_field_on_line=6)
  monkeypatch.syspath_prepend(str(task))
  monkeypatch.delitem(sys.modules, "mine_tasks", raising=False)
  importlib.import_module("mine_tasks")
  it = data.get_batches("whole_train", None, 4, {"inputs": 32, "targets": 4, "num_choices": 2})
  with pytest.raises(DataError) as e:
    for _ in range(100):  # 40 examples per epoch: the bad row comes in the first epoch
      next(it)
  assert str(e.value).startswith(f"whole_train: {task / 'train.jsonl'}, line 6: template "
                                 "'is it positive'")
  assert "\n" not in str(e.value) and "function_node" not in str(e.value)
  with pytest.raises(StopIteration):
    next(it)
