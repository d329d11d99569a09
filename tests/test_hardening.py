"""Nothing lost, no traceback, one line for every bad input (the hardening issue).

Regression tests of the defects found by probing every command (merge into its own base,
merge over an existing output, two runs on one MODEL_DIR, a task named twice in ADAPTERS,
an old-format `pytorch_model.bin`, the demo tasks' vocabulary, the README's decoder block:
`tests/test_decoder_readme.py`), then a table that feeds each expected failure through the
console script in a subprocess: one `error:` line, its exit status, no traceback, no start-up
noise, and nothing new left on disk.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch

from ia3_jax import demo, files, main
from ia3_jax.errors import CheckpointError, ConfigError, DataError, FileSystemError
from ia3_jax.interop import hf_checkpoints, hf_families, ia3_adapters
from ia3_jax.peft import ia3
from ia3_jax.train import checkpointer, run_lock
from tests import trainer_utils as tu
from tests.test_cli_errors import (LAYERS, NOISE, SMALL, _console_script, _read_only_dir,
                                   _task_dir, _user_env)

T5_BASE = pathlib.Path(demo.BUNDLED_MODELS["t5"])
LLAMA_BASE = pathlib.Path(demo.BUNDLED_MODELS["llama"])


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  path = tu.compilation_cache_dir(tmp_path_factory)
  tu.enable_compilation_cache(path)
  return path


def _adapter(config, out: pathlib.Path, scale: float = 1.5) -> pathlib.Path:
  """A peft IA3 adapter for `config` whose vectors are all `scale` (merging changes weights)."""
  vectors = jax.tree.map(lambda x: np.asarray(x) * scale, ia3.init_ia3(config))
  return pathlib.Path(ia3_adapters.export_peft_adapter(vectors, config, out))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  """A copy of the bundled T5 (to write over), adapters of both bundled models, a training
  checkpoint directory whose newest step is damaged, and prediction rows."""
  root = tmp_path_factory.mktemp("hardening")
  shutil.copytree(T5_BASE, root / "base")
  t5 = hf_families.of_dir(T5_BASE).load_config(T5_BASE)
  llama = hf_families.of_dir(LLAMA_BASE).load_config(LLAMA_BASE)
  _adapter(t5, root / "adapter_t5")
  _adapter(llama, root / "adapter_llama")
  cut = root / "adapter_cut"
  shutil.copytree(root / "adapter_t5", cut)
  data = (cut / "adapter_model.safetensors").read_bytes()
  (cut / "adapter_model.safetensors").write_bytes(data[:100])
  for name, content in (("base_cut", (T5_BASE / "model.safetensors").read_bytes()[:1000]),
                        ("base_random", np.random.default_rng(0).bytes(5000))):
    shutil.copytree(T5_BASE, root / name)
    (root / name / "model.safetensors").write_bytes(content)
  _damaged_checkpoint(root / "run", t5)
  (root / "exists").mkdir()
  (root / "exists" / "keep.txt").write_text("mine")
  (root / "a_file").write_text("not a folder")
  rows = {"pred_str_id": {"task": "raft_overruling", "example_id": "7", "prediction": 0},
          "pred_no_id": {"task": "raft_overruling", "prediction": 0},
          "pred_bool": {"task": "raft_overruling", "example_id": 0, "prediction": True}}
  for name, row in rows.items():
    (root / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
  (root / "pred_bad_json.jsonl").write_text('{"task": "raft_overruling", "example_id": 0,}\n')
  return root


def _damaged_checkpoint(model_dir: pathlib.Path, config) -> None:
  """Steps 2 and 4 of (IA)^3 vectors as a training run writes them; step 4's data cut."""
  class State:  # what Checkpointer.save reads of a TrainState
    def __init__(self, scale):
      self.trainable = jax.tree.map(lambda x: x * scale, ia3.init_ia3(config))
      self.opt_state, self.frozen = {"count": np.zeros((), np.int32)}, {}
  ckpt = checkpointer.Checkpointer(model_dir / "checkpoints",
                                   checkpointer.CheckpointConfig(async_save=False))
  for step in (2, 4):
    ckpt.save(step, State(1.0 + step), {"model_config": config.to_dict()})
  ckpt.close()
  for f in (model_dir / "checkpoints" / "4").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\0" * 20)


def _tree_state(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"")
          for p in sorted(root.rglob("*"))}


def _run_cli(args, cwd, env=None, timeout=180) -> subprocess.CompletedProcess:
  return subprocess.run(_console_script() + args, cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env=env)


def _assert_one_line(proc, status: int, *fragments: str) -> str:
  err = proc.stderr
  assert proc.returncode == status, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
  assert not [n for n in NOISE + ("Event loop is closed",) if n in err], err[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


# --------------------------------------------------------------------------- defects 1-6


def test_merge_onto_its_own_base_is_refused_and_the_base_is_unchanged(work, tmp_path):
  base = tmp_path / "b"
  shutil.copytree(T5_BASE, base)
  before = _tree_state(base)
  for out in (base, tmp_path):  # the base itself, or a folder that --overwrite would replace
    proc = _run_cli(["merge", "--base", str(base), "--ia3", str(work / "adapter_t5"),
                     "--out", str(out), "--overwrite"], tmp_path)
    _assert_one_line(proc, 1, f"--out {out}: is or holds --base {base}")
    assert _tree_state(base) == before


def test_merge_refuses_an_existing_out_unless_overwrite_then_replaces_it_whole(work, tmp_path):
  out = tmp_path / "merged"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  args = ["merge", "--base", str(T5_BASE), "--ia3", str(work / "adapter_t5"), "--out", str(out)]
  _assert_one_line(_run_cli(args, tmp_path), 1, "already exists; pass --overwrite")
  assert (out / "keep.txt").read_text() == "mine"
  proc = _run_cli(args + ["--overwrite"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                    "spiece.model", "tokenizer_config.json"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary left
  # The merged kernels are the base's scaled by the vectors (1.5 on k, v and the MLP input).
  config, base = hf_checkpoints.load_hf_checkpoint(T5_BASE)
  _, merged = hf_checkpoints.load_hf_checkpoint(out)
  k = ("encoder", "layers_0", "attention", "key", "kernel")
  got, want = merged, base
  for key in k:
    got, want = got[key], want[key]
  np.testing.assert_allclose(np.asarray(got), 1.5 * np.asarray(want), rtol=1e-6, atol=0)
  del config


def _hold(model_dir: pathlib.Path) -> subprocess.Popen:
  """A process that holds MODEL_DIR's lock until it is killed."""
  code = ("import sys, time; from ia3_jax.train import run_lock; "
          "run_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(model_dir)], stdout=subprocess.PIPE,
                          text=True, env=tu.child_env(pathlib.Path("/nonexistent")))
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_two_runs_on_one_model_dir_the_second_is_refused_the_first_intact(tmp_path,
                                                                         compile_cache):
  task = _task_dir(tmp_path)
  env = _user_env(compile_cache, task)
  run = tmp_path / "run"
  args = ["train", *LAYERS, *SMALL, f"--gin.MODEL_DIR='{run}'",
          "--gin.MIXTURE_OR_TASK_NAME='mine_fewshot_seed0'",
          "--gin.MIXTURE_OR_TASK_MODULES=['mine_tasks']", "--gin.TRAIN_STEPS=3"]
  first = subprocess.Popen(_console_script() + args, cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  lock = run / run_lock.LOCK_NAME
  deadline = time.time() + 120
  while not lock.exists() and first.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  first.send_signal(signal.SIGSTOP)  # it holds the lock, paused, while the second starts
  try:
    start = time.time()
    second = _run_cli(args + ["--gin.RANDOM_SEED=7"], tmp_path, env)
    line = _assert_one_line(second, 1, f"MODEL_DIR='{run}' is in use by another training run",
                            f"pid {first.pid} on host {socket.gethostname()}")
    assert time.time() - start < 60, line
  finally:
    first.send_signal(signal.SIGCONT)
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  results = json.loads((run / "results.json").read_text())
  assert results["step"] == 3
  _, meta = checkpointer.read_checkpoint_meta(run)
  assert meta["seed"] == 42  # the first run's (the recipe's RANDOM_SEED), not the second's 7
  assert not lock.exists()  # released at the end
  assert len(list((run / "train").iterdir())) == 1  # one TensorBoard file: one writer


def test_lock_of_a_dead_run_is_stale_and_taken_over(tmp_path):
  holder = _hold(tmp_path)
  with pytest.raises(ConfigError, match=f"pid {holder.pid} on host"):
    run_lock.acquire(str(tmp_path))
  holder.kill()  # kill -9: the kernel drops its flock; its lock file stays behind
  holder.wait()
  assert (tmp_path / run_lock.LOCK_NAME).exists()
  with run_lock.hold(str(tmp_path)) as lock:
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lock is not None
  assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_lock_written_by_another_host_counts_until_it_goes_stale(tmp_path):
  path = tmp_path / run_lock.LOCK_NAME
  path.write_text(json.dumps({"host": "other-host", "pid": 123, "started": time.time()}))
  with pytest.raises(ConfigError, match="pid 123 on host other-host.*remove .*ia3_jax.lock"):
    run_lock.acquire(str(tmp_path))
  old = time.time() - run_lock.STALE_S - 1
  os.utime(path, (old, old))
  run_lock.acquire(str(tmp_path)).release()


def test_a_task_named_twice_in_adapters_is_refused(tmp_path):
  proc = _run_cli(["eval", "--gin_file=models/demo.gin", "--gin_file=recipes/t_few.gin",
                   "--gin_file=peft/ia3.gin", "--gin.CHECKPOINT_PATH=None",
                   "--gin.ADAPTERS={'demo_alive': 'a', 'demo_edible': 'b', 'demo_alive': 'c'}"],
                  tmp_path)
  _assert_one_line(proc, 2, "--gin.ADAPTERS=", "key 'demo_alive' is given twice")
  with pytest.raises(main.GinConfigError, match="key 'x' is given twice"):
    main.parse_gin(["runs/eval.gin"], ["ADAPTERS = {'x': 1, 'x': 2}"])


def test_old_format_pytorch_bin_loads_and_a_pickle_with_objects_is_still_refused(tmp_path):
  tensors = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
             "b.bias": torch.tensor([1.5], dtype=torch.bfloat16)}
  torch.save(tensors, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
  got = dict(hf_checkpoints.iter_torch_bin(tmp_path / "old.bin"))
  assert sorted(got) == ["a.weight", "b.bias"]
  np.testing.assert_array_equal(got["a.weight"], tensors["a.weight"].numpy())
  assert float(got["b.bias"][0]) == 1.5
  torch.save({"x": torch.zeros(1), "evil": slice(1, 2)}, tmp_path / "objects.bin",
             _use_new_zipfile_serialization=False)
  with pytest.raises(CheckpointError, match="weights_only=True"):
    list(hf_checkpoints.iter_torch_bin(tmp_path / "objects.bin"))


def test_demo_tasks_register_with_the_bundled_vocabulary():
  from ia3_jax.tasks import demo as demo_tasks
  assert pathlib.Path(demo_tasks.VOCAB_PATH) == T5_BASE / "spiece.model"
  names = demo_tasks.register()
  assert "demo_heldout_eval" in names and any(n.startswith("demo_alive") for n in names)


# --------------------------------------------------------------------------- library pieces


def test_written_adapters_and_models_follow_the_umask(work, tmp_path):
  old = os.umask(0o027)
  try:
    out = _adapter(hf_families.of_dir(T5_BASE).load_config(T5_BASE), tmp_path / "a")
    with files.output_dir(tmp_path / "whole") as tmp:
      files.write_safetensors(tmp / "x.safetensors", {"x": np.zeros(2, np.float32)})
  finally:
    os.umask(old)
  assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o640
  assert stat.S_IMODE((tmp_path / "whole").stat().st_mode) == 0o750
  assert stat.S_IMODE((tmp_path / "whole" / "x.safetensors").stat().st_mode) == 0o640


def test_output_dir_leaves_nothing_when_the_writer_fails(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "old.txt").write_text("old")
  with pytest.raises(FileSystemError, match="no space left on the device"):
    with files.output_dir(tmp_path / "out", overwrite=True) as tmp:
      tmp.mkdir()
      (tmp / "half").write_text("x")
      pathlib.Path(str(tmp) + ".orbax-checkpoint-tmp").mkdir()  # a writer's own temporary
      raise OSError(28, "No space left on device")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert (tmp_path / "out" / "old.txt").read_text() == "old"  # replaced only on success


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(files.shutil, "disk_usage", lambda _: usage._replace(free=500_000))
  with pytest.raises(FileSystemError, match=r"needs about 2.0 MB and only 500 kB are free"):
    files.check_free_space(tmp_path / "x", 2_000_000, "the merged model")
  files.check_free_space(tmp_path / "x", 400_000, "the merged model")


@pytest.mark.parametrize("line, message", [
    ('{"text": "a", "label": 0,}', "not valid JSON (Expecting property name enclosed in double "
                                   "quotes at column 26, at '}')"),
    ('{"text": "unterminated', "not valid JSON (Unterminated string starting at column 10, "
                               "at '\"unterminated')"),
    ('["a"]', "expected a JSON object, got list"),
])
def test_json_lines_errors_name_the_column_and_the_text_there(tmp_path, line, message):
  from ia3_jax.data.sources import JsonlSource
  path = tmp_path / "x.jsonl"
  path.write_text('{"text": "ok", "label": 1}\n' + line + "\n")
  with pytest.raises(DataError) as e:
    list(JsonlSource({"train": str(path)}).iterate("train"))
  assert str(e.value) == f"{path}, line 2: {message}"


@pytest.mark.parametrize("value, label, message", [
    (None, 0, "renders a null value (None) as text"),
    (["a", "b"], 0, "renders a list (['a', 'b']) as text"),
    ({"a": 1}, 0, "renders a dict ({'a': 1}) as text"),
    (True, 0, "renders a bool (True) as text"),
    ("fine", True, "a boolean label is not the index of an answer choice"),
])
def test_templates_refuse_silent_coercion(value, label, message):
  from ia3_jax.data import templates
  template = templates.parse_templates(
      "templates:\n  - name: t\n    jinja: '{{text}} ? ||| {{ answer_choices[label] }}'\n"
      "    answer_choices: 'yes ||| no'\n").get("t")
  with pytest.raises(DataError, match=__import__("re").escape(message)):
    template.render({"text": value, "label": label}, where="f.jsonl, line 3")
  assert template.render({"text": 3, "label": 1}).inputs == "3 ?"  # numbers still print


# --------------------------------------------------------------------------- the CLI table

# (name, argv with {w} = the work folder and {o} = a fresh output path, exit status, fragments
# of the one error line). Each runs `ia3-jax` in a subprocess; `{o}` must not exist after.
CASES = [
    ("safetensors cut (convert)", ["convert", "{w}/base_cut", "{o}"], 1,
     ["base_cut/model.safetensors: not a readable safetensors file"]),
    ("safetensors random bytes (merge)",
     ["merge", "--base", "{w}/base_random", "--ia3", "{w}/adapter_t5", "--out", "{o}"], 1,
     ["base_random/model.safetensors: not a readable safetensors file"]),
    ("adapter safetensors cut (merge)",
     ["merge", "--base", "{w}/base", "--ia3", "{w}/adapter_cut", "--out", "{o}"], 1,
     ["adapter_cut/adapter_model.safetensors: not a readable safetensors file"]),
    ("adapter safetensors cut (combine)",
     ["combine", "--method", "multiplicative", "--adapters", "{w}/adapter_cut", "{w}/adapter_t5",
      "--base", "{w}/base", "--out", "{o}"], 1,
     ["adapter_cut/adapter_model.safetensors: not a readable safetensors file"]),
    ("damaged newest checkpoint (export-peft)", ["export-peft", "--checkpoint", "{w}/run",
                                                 "--out", "{o}"], 1,
     ["checkpoints/4: checkpoint step 4 is unreadable", "left as it is", "checkpoints/2"]),
    ("convert onto an existing folder", ["convert", "{w}/base", "{w}/exists"], 1,
     ["DST {w}/exists: already exists; pass --overwrite"]),
    ("merge --task beyond a bank of 1",
     ["merge", "--base", "{w}/base", "--ia3", "{w}/adapter_t5", "--task", "5", "--out", "{o}"], 1,
     ["task 5 out of range (--task): the adapter bank holds 1 task (rows 0..0)"]),
    ("Llama adapter into a T5 base",
     ["merge", "--base", "{w}/base", "--ia3", "{w}/adapter_llama", "--out", "{o}"], 1,
     ["adapter_llama: module 'model.layers.0", "is not a projection of this T5 model"]),
    ("T5 adapter into a Llama base",
     ["merge", "--base", str(LLAMA_BASE), "--ia3", "{w}/adapter_t5", "--out", "{o}"], 1,
     ["adapter_t5: module 'decoder.block.0", "is not a projection of this decoder-only model"]),
    ("read-only --out (export-peft)",
     ["export-peft", "--checkpoint", "{w}/run/checkpoints/2", "--out", "{ro}"], 1,
     ["--out {ro}: cannot write in"]),
    ("read-only --out (merge)",
     ["merge", "--base", "{w}/base", "--ia3", "{w}/adapter_t5", "--out", "{ro}"], 1,
     ["--out {ro}: cannot write in"]),
    ("read-only --out (combine)",
     ["combine", "--method", "multiplicative", "--adapters", "{w}/adapter_t5", "--base",
      "{w}/base", "--out", "{ro}"], 1, ["--out {ro}: cannot write in"]),
    ("raft: no predictions file", ["raft-submission", "--predictions", "{w}/none.jsonl",
                                   "--out", "{o}"], 1,
     ["--predictions {w}/none.jsonl: cannot read it (No such file or directory)"]),
    ("raft: --out is a file", ["raft-submission", "--predictions", "{w}/pred_str_id.jsonl",
                               "--out", "{w}/a_file"], 1, ["--out {w}/a_file: is a file"]),
    ("raft: example_id a string", ["raft-submission", "--predictions", "{w}/pred_str_id.jsonl",
                                   "--out", "{o}"], 1,
     ["pred_str_id.jsonl, row 1: field 'example_id' is '7' (str), not the integer index"]),
    ("raft: example_id missing", ["raft-submission", "--predictions", "{w}/pred_no_id.jsonl",
                                  "--out", "{o}"], 1,
     ["pred_no_id.jsonl, row 1: field 'example_id' is missing"]),
    ("raft: prediction true", ["raft-submission", "--predictions", "{w}/pred_bool.jsonl",
                               "--out", "{o}"], 1,
     ["pred_bool.jsonl, row 1: prediction True is not a label index"]),
    ("raft: a line that is not JSON", ["raft-submission", "--predictions",
                                       "{w}/pred_bad_json.jsonl", "--out", "{o}"], 1,
     ["pred_bad_json.jsonl, line 1: not valid JSON", "at column 45"]),
]


@pytest.mark.parametrize("name, argv, status, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_its_status_and_leaves_nothing(name, argv, status, fragments,
                                                                  work, tmp_path,
                                                                  compile_cache):
  ro = _read_only_dir(tmp_path)
  fill = lambda s: s.format(w=work, o=tmp_path / "out", ro=ro)
  before = _tree_state(work)
  start = time.time()
  proc = _run_cli([fill(a) for a in argv], tmp_path, _user_env(compile_cache, tmp_path))
  _assert_one_line(proc, status, *map(fill, fragments))
  assert time.time() - start < 60
  assert _tree_state(work) == before, name  # inputs untouched, nothing added beside them
  assert not (tmp_path / "out").exists() and not os.path.exists(ro)
  assert [p.name for p in tmp_path.iterdir()] in ([], ["ro"])


# Loaded by the CLI subprocess (PYTHONPATH): the file system under $FULL_DISK reports only
# $FULL_DISK_FREE bytes free, as a nearly full disk does; everything else is untouched.
_FULL_DISK = """\
import os, shutil
_usage = shutil.disk_usage
def disk_usage(path):
  usage = _usage(path)
  if os.path.abspath(path).startswith(os.environ["FULL_DISK"]):
    return usage._replace(free=int(os.environ["FULL_DISK_FREE"]))
  return usage
shutil.disk_usage = disk_usage
"""


def _full_disk_env(tmp_path: pathlib.Path, cache, disk: pathlib.Path, free: int,
                   task_dir: pathlib.Path) -> dict:
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(_FULL_DISK)
  disk.mkdir()
  env = _user_env(cache, task_dir)
  env.update(PYTHONPATH=os.pathsep.join([str(site), env["PYTHONPATH"]]), FULL_DISK=str(disk),
             FULL_DISK_FREE=str(free))
  return env


@pytest.mark.parametrize("argv", [["convert", str(T5_BASE), "{d}/c"],
                                  ["convert", str(T5_BASE), "{d}/c", "--to", "hf"],
                                  ["merge", "--base", str(T5_BASE), "--ia3", "{w}/adapter_t5",
                                   "--out", "{d}/m"]], ids=["orbax", "hf", "merge"])
def test_a_full_disk_is_one_line_and_leaves_nothing(argv, work, tmp_path, compile_cache):
  disk = tmp_path / "disk"
  env = _full_disk_env(tmp_path, compile_cache, disk, 2_000_000, tmp_path)
  proc = _run_cli([a.format(d=disk, w=work) for a in argv], tmp_path, env)
  _assert_one_line(proc, 1, f"{disk}/", "needs about 8.7 MB and only 2.0 MB are free there")
  assert list(disk.iterdir()) == []


def test_training_onto_a_full_disk_stops_with_one_line_before_its_checkpoint(tmp_path,
                                                                            compile_cache):
  disk = tmp_path / "disk"
  task = _task_dir(tmp_path)
  env = _full_disk_env(tmp_path, compile_cache, disk, 32_000, task)
  run = disk / "run"
  proc = _run_cli(["train", *LAYERS, *SMALL, f"--gin.MODEL_DIR='{run}'",
                   "--gin.MIXTURE_OR_TASK_NAME='mine_fewshot_seed0'",
                   "--gin.MIXTURE_OR_TASK_MODULES=['mine_tasks']", "--gin.TRAIN_STEPS=2"],
                  tmp_path, env)
  _assert_one_line(proc, 1, f"{run}/checkpoints/2: checkpoint 2 needs about",
                   "only 32 kB are free there")
  assert not (run / "checkpoints").exists() and not (run / run_lock.LOCK_NAME).exists()


@pytest.mark.parametrize("edit, fragments", [
    ("utf8", ["train.jsonl, line 41: not valid UTF-8 (byte 0xff at column 15)"]),
    ("null", ["train.jsonl, line 3: template 'is it positive'", "renders a null value (None)"]),
    ("true", ["train.jsonl, line 3: template 'is it positive'", "a boolean label"]),
    ("eval", ["validation.jsonl, line 3: template 'is it positive'", "label outside the choices"]),
])
def test_bad_data_fails_before_the_first_step(edit, fragments, tmp_path, compile_cache):
  """Bad training rows, and a bad evaluation row (found by rendering the evaluation split
  before training, not after it), are one line; the run leaves no checkpoint behind."""
  task = _task_dir(tmp_path)
  train, valid = task / "train.jsonl", task / "validation.jsonl"
  lines = train.read_text().splitlines()
  if edit == "utf8":
    train.write_bytes(train.read_bytes() + b'{"text": "bad \xff\xfe byte", "label": 0}\n')
  elif edit in ("null", "true"):
    lines[2] = json.dumps({"text": None, "label": 0} if edit == "null"
                          else {"text": "a b", "label": True})
    train.write_text("\n".join(lines) + "\n")
  else:
    rows = valid.read_text().splitlines()
    rows[2] = json.dumps({"text": "a b", "label": 7})
    valid.write_text("\n".join(rows) + "\n")
  run = tmp_path / "run"
  args = ["train", *LAYERS, *SMALL, f"--gin.MODEL_DIR='{run}'",
          "--gin.MIXTURE_OR_TASK_NAME='mine_fewshot_seed0'",
          "--gin.MIXTURE_OR_TASK_MODULES=['mine_tasks']", "--gin.TRAIN_STEPS=50",
          "--gin.EVAL_MIXTURE_OR_TASK_NAME='mine_eval'"]
  proc = _run_cli(args, tmp_path, _user_env(compile_cache, task))
  _assert_one_line(proc, 1, *fragments)
  assert "train/loss" not in proc.stdout + proc.stderr  # no step was taken
  assert not run.exists()  # nothing left behind


def test_python_m_demo_names_itself(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "ia3_jax.demo", "--help"], capture_output=True,
                        text=True, timeout=120, cwd=tmp_path)
  assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m ia3_jax.demo")
