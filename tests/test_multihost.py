"""Two processes joined by jax.distributed over loopback (CPU, gloo) train together and
match the single-process run: losses, final params, eval accuracy, checkpoints."""

import json
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ia3_jax.model import params as params_lib
from ia3_jax.train import checkpointer
from tests import trainer_utils as tu
from tests import tolerances

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4

PROCESS = """
import json, os, sys
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")
from ia3_jax.train import partitioning
process_id, port, model_dir, steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
partitioning.initialize_distributed(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=120)
import jax
from jax.experimental import multihost_utils
from ia3_jax.model import params as params_lib
from tests import trainer_utils as tu
config = partitioning.PartitionConfig(data_parallel=2, model_parallel=2)
shard = partitioning.Partitioner(config).data_shard_info()
res = tu.run_tiny(model_dir, steps=steps, checkpoint_period=2, eval_batches=2, partitioning=config)
trainable = {k: multihost_utils.process_allgather(v, tiled=True).tolist()
             for k, v in params_lib.flatten(res["state"].trainable).items()}
last_eval = res["eval"][steps]
out = {"process": jax.process_index(), "processes": jax.process_count(),
       "devices": jax.device_count(), "local_devices": jax.local_device_count(), "shard": shard,
       "losses": [l for _, l in res["train_losses"]], "trainable": trainable,
       "eval": {k: last_eval[k] for k in ("accuracy", "num_correct", "num_examples")}}
print("RESULT" + json.dumps(out), flush=True)
jax.distributed.shutdown()
"""


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """Shared persistent compilation cache (see trainer_utils.compilation_cache_dir)."""
  path = tu.compilation_cache_dir(tmp_path_factory)
  tu.enable_compilation_cache(path)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
  return tu.run_tiny(str(tmp_path_factory.mktemp("single")), steps=STEPS, checkpoint_period=2,
                     eval_batches=2)


def test_two_processes_train_together_and_match_single_process(tmp_path, single_process,
                                                             compile_cache):
  env = tu.child_env(compile_cache)
  port = _free_port()
  model_dir = tmp_path / "run"
  procs = [subprocess.Popen([sys.executable, "-c", PROCESS, str(i), str(port), str(model_dir),
                             str(STEPS)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=400)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  results = [json.loads(out.split("RESULT", 1)[1].splitlines()[0]) for out in outputs]

  want_losses = [l for _, l in single_process["train_losses"]]
  want = params_lib.flatten(jax.device_get(single_process["state"].trainable))
  want_eval = single_process["eval"][STEPS]
  for i, r in enumerate(results):
    assert (r["process"], r["processes"], r["devices"], r["local_devices"]) == (i, 2, 4, 2)
    assert r["shard"] == [i, 2]  # each host reads its own half of every batch
    tolerances.assert_close(r["losses"], want_losses)
    for name, value in want.items():
      tolerances.assert_close(np.asarray(r["trainable"][name]), value, err_msg=name)
    assert r["eval"]["num_examples"] == want_eval["num_examples"] == 14
    assert r["eval"]["num_correct"] == want_eval["num_correct"]

  # One checkpoint directory written jointly, readable by a single process.
  saved, meta = checkpointer.restore_trainable(model_dir)
  assert meta["step"] == STEPS
  for name, value in want.items():
    tolerances.assert_close(params_lib.flatten(saved)[name], value, err_msg=name)
