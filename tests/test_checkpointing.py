"""Checkpoints: kill mid-run and resume == uninterrupted; trainable-only content; keep last K;
a checkpoint of another model shape names the param."""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ia3_jax.train.assembly import ModelSpec
from ia3_jax.interop import hf_checkpoints
from ia3_jax.model import config
from ia3_jax.model import params as params_lib
from ia3_jax.peft import ia3
from ia3_jax.train import checkpointer, loop
from tests import trainer_utils as tu

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, PERIOD = 8, 2

CHILD = """
import sys
from tests import trainer_utils as tu
res = tu.run_tiny(sys.argv[1], steps=int(sys.argv[2]), checkpoint_period=int(sys.argv[3]),
                  delay=float(sys.argv[4]))
print("FIRST_STEP", res["start_step"] + 1, flush=True)
"""


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """Shared persistent compilation cache (see trainer_utils.compilation_cache_dir)."""
  path = tu.compilation_cache_dir(tmp_path_factory)
  tu.enable_compilation_cache(path)
  return path


def _committed_steps(model_dir: pathlib.Path) -> list[int]:
  root = model_dir / "checkpoints"
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def _write_checkpoint(model_dir: pathlib.Path, cfg, step: int = 3) -> None:
  """A checkpoint as `loop.train` writes it, without training (no step to compile)."""
  from ia3_jax.model import network
  from ia3_jax.train import optimizers
  tr = tu.make_trainer(network.Transformer(cfg, ia3.ia3_blocks()), trainable=ia3.IA3_PATTERN,
                       optimizer=optimizers.OptimizerConfig(total_steps=10).build())
  state = tr.init_state(tu.random_base_params(cfg))
  ckpt = checkpointer.Checkpointer(model_dir / "checkpoints")
  ckpt.save(step, state, {"seed": 0, "batch_size": 8, "grad_accum_steps": 1,
                          "initial_checkpoint_path": None, "data_position": step})
  ckpt.close()


def test_kill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path, compile_cache):
  """A run SIGKILLed after a checkpoint, then resumed, ends with the same params (bit for bit,
  dropout on) as an uninterrupted run; checkpoints hold the trainable params only, the last
  KEEP of them."""
  reference_dir = tmp_path / "reference"
  reference = tu.run_tiny(str(reference_dir), steps=STEPS, checkpoint_period=PERIOD)
  want = jax.device_get(reference["state"].trainable)

  model_dir = tmp_path / "run"
  env = tu.child_env(compile_cache)
  args = [sys.executable, "-c", CHILD, str(model_dir), str(STEPS), str(PERIOD)]
  proc = subprocess.Popen(args + ["0.4"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  try:
    while not _committed_steps(model_dir) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    killed_at = _committed_steps(model_dir)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    out, _ = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  assert killed_at and max(killed_at) < STEPS, (killed_at, out[-3000:])

  resumed = subprocess.run(args + ["0"], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  first = int(resumed.stdout.split("FIRST_STEP")[1].split()[0])
  assert first > max(killed_at) >= PERIOD  # it continued, it did not start over
  got, meta = checkpointer.restore_trainable(model_dir)
  assert meta["step"] == STEPS and meta["data_position"] == STEPS
  for name, value in params_lib.flatten(want).items():
    np.testing.assert_array_equal(params_lib.flatten(got)[name], value, err_msg=name)

  # What a checkpoint holds, and how many are kept.
  assert _committed_steps(reference_dir) == [4, 6, 8]  # keep=3 of 2, 4, 6, 8
  step_dir = reference_dir / "checkpoints" / "8"
  assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == ["meta", "opt_state",
                                                                      "trainable"]
  saved, meta = checkpointer.restore_trainable(reference_dir)
  assert set(params_lib.flatten(saved)) == set(params_lib.flatten(want))
  assert all(p.rsplit("/", 1)[-1].startswith("ia3_") for p in params_lib.flatten(saved))
  assert meta["trainable_params"] == sorted(params_lib.flatten(want))
  assert meta["seed"] == 0 and meta["batch_size"] == 8
  assert reference["checkpoint"] == str(step_dir)


def test_resume_with_another_model_shape_names_the_param(tmp_path):
  _write_checkpoint(tmp_path, config.get_config("tiny"))
  wide = config.get_config("tiny").replace(mlp_dim=96)
  with pytest.raises(hf_checkpoints.CheckpointError,
                     match=r"checkpoints/3/trainable: param decoder/layers_0/mlp/ia3_ff has shape "
                           r"\(1, 64\) in the checkpoint; this model expects \(1, 96\)"):
    loop.train(model_dir=str(tmp_path), model=ModelSpec(wide, peft=ia3.IA3Config()),
                  train_data=tu.SyntheticBatches(8),
                  train_config=loop.TrainConfig(train_steps=10, seed=0, tensorboard=False,
                                                   progress=False),
                  initial_params=tu.random_base_params(wide))


def test_resume_with_another_batch_size_is_refused(tmp_path):
  tiny = config.get_config("tiny")
  _write_checkpoint(tmp_path, tiny)
  with pytest.raises(hf_checkpoints.CheckpointError, match="batch_size=8, this run has batch_size=4"):
    loop.train(model_dir=str(tmp_path), model=ModelSpec(tiny, peft=ia3.IA3Config()),
                  train_data=tu.SyntheticBatches(4),
                  train_config=loop.TrainConfig(train_steps=10, batch_size=4, seed=0,
                                                   tensorboard=False, progress=False),
                  initial_params=tu.random_base_params(tiny))


def test_sigint_saves_then_resume_matches_uninterrupted_and_rerun_is_a_no_op(tmp_path,
                                                                              compile_cache):
  """SIGINT mid-run: a checkpoint at the step it stopped, TrainingInterrupted's message; the
  resumed run's params equal an uninterrupted run's bit for bit and its results.json holds
  the whole loss history; running the finished run again rewrites nothing."""
  reference = tu.run_tiny(str(tmp_path / "reference"), steps=STEPS, checkpoint_period=PERIOD)
  want = jax.device_get(reference["state"].trainable)
  want_losses = json.loads((tmp_path / "reference" / "results.json").read_text())["train_losses"]

  model_dir = tmp_path / "run"
  env = tu.child_env(compile_cache)
  args = [sys.executable, "-c", CHILD, str(model_dir), str(STEPS), str(PERIOD)]
  proc = subprocess.Popen(args + ["0.4"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  try:  # the first checkpoint: the run is stepping
    while not _committed_steps(model_dir) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
  finally:
    out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 1, out[-3000:]
  stopped = int(out.split("interrupted at step ")[1].split(";")[0])
  assert "; the same command resumes" in out
  assert PERIOD < stopped < STEPS and max(_committed_steps(model_dir)) == stopped, out[-3000:]
  assert not (model_dir / "results.json").exists()

  resumed = subprocess.run(args + ["0"], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert int(resumed.stdout.split("FIRST_STEP")[1].split()[0]) == stopped + 1
  got, _ = checkpointer.restore_trainable(model_dir)
  for name, value in params_lib.flatten(want).items():
    np.testing.assert_array_equal(params_lib.flatten(got)[name], value, err_msg=name)
  results_file = model_dir / "results.json"
  saved = json.loads(results_file.read_text())
  assert saved["train_losses"] == want_losses and len(want_losses) == STEPS
  assert saved["first_loss"] == want_losses[0][1]

  before = results_file.read_bytes(), results_file.stat().st_mtime_ns
  again = subprocess.run(args + ["0"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert f"already trained to step {STEPS}" in again.stdout + again.stderr
  assert (results_file.read_bytes(), results_file.stat().st_mtime_ns) == before


def test_stop_on_signal_restores_the_previous_handlers():
  from ia3_jax.train import preemption
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop.requested == signal.SIGTERM and stop.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is previous


def test_preemption_sync_point_saves_and_stops_every_host_at_the_same_step(tmp_path,
                                                                         monkeypatch):
  """Multi-host runs stop where the coordination service's sync point says (here: step 3)."""
  from jax.experimental import multihost_utils
  from ia3_jax.errors import TrainingInterrupted
  from ia3_jax.train import preemption
  asked = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: asked.append(step) or step == 3)
  monkeypatch.setattr(preemption.StopOnSignal, "__init__",
                      functools.partialmethod(preemption.StopOnSignal.__init__,
                                              preemption_sync=True))
  with pytest.raises(TrainingInterrupted) as err:
    tu.run_tiny(str(tmp_path), steps=6, dropout=0.0)
  assert err.value.step == 3 and asked[:3] == [1, 2, 3]  # (orbax asks too, when it saves)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
  stop = preemption.StopOnSignal(preemption_sync=True)
  assert signal.SIGTERM not in stop.signals  # left to JAX's preemption notifier
