"""Partitioning: mesh from flags, logical rules, batch placement, and the same run on
8 fake CPU devices (2x4 data x model mesh) as on one device."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from ia3_jax.model import config, network
from ia3_jax.model import params as params_lib
from ia3_jax.peft import ia3
from ia3_jax.train import partitioning
from tests import trainer_utils as tu
from tests import tolerances

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6

EIGHT_DEVICES = """
import json, os, sys
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
import jax
from ia3_jax.model import params as params_lib
from ia3_jax.train import partitioning
from tests import trainer_utils as tu
res = tu.run_tiny(sys.argv[1], steps=int(sys.argv[2]), checkpoint_period=3,
                  partitioning=partitioning.PartitionConfig(data_parallel=2, model_parallel=4))
state = res["state"]
shard = lambda x: {"spec": str(x.sharding.spec),
                   "shard_shape": list(x.addressable_shards[0].data.shape),
                   "num_devices": len(x.sharding.device_set)}
frozen, trainable = params_lib.flatten(state.frozen), params_lib.flatten(state.trainable)
out = {"devices": jax.device_count(), "losses": [l for _, l in res["train_losses"]],
       "mesh": res["mesh"],
       "sharding": {k: shard(v) for k, v in {**frozen, **trainable}.items()},
       "trainable": {k: jax.device_get(v).tolist() for k, v in trainable.items()}}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """Shared persistent compilation cache (see trainer_utils.compilation_cache_dir)."""
  path = tu.compilation_cache_dir(tmp_path_factory)
  tu.enable_compilation_cache(path)
  return path


def test_make_mesh_from_flags():
  mesh = partitioning.make_mesh(-1, 1)
  assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (jax.device_count(), 1)
  with pytest.raises(ValueError, match="model_parallel=2 must be >= 1 and divide the 1 devices"):
    partitioning.make_mesh(-1, 2)
  with pytest.raises(ValueError, match="data_parallel=3 x model_parallel=1 = 3 does not match"):
    partitioning.make_mesh(3, 1)


def test_logical_rules_and_undivisible_dims():
  p = partitioning.Partitioner(partitioning.PartitionConfig())
  # On one device every axis has size 1, so the T5X rules apply unchanged.
  assert p.spec(("embed", "mlp"), (32, 64)) == PartitionSpec(None, "model")
  assert p.spec(("vocab", "embed"), (128, 32)) == PartitionSpec("model", None)
  assert p.spec(("tasks", "joined_kv"), (1, 32)) == PartitionSpec(None, "model")
  assert p.batch_sharding().spec == PartitionSpec("data")
  with pytest.raises(ValueError, match="logical axis 'nope' has no rule"):
    p.spec(("nope",), (4,))
  # A mesh axis may be used once per array; the second use is replicated.
  assert p.spec(("mlp", "joined_kv"), (4, 4)) == PartitionSpec("model", None)


def test_param_shardings_follow_logical_axes():
  model = network.Transformer(config.get_config("tiny"), ia3.ia3_blocks())
  p = partitioning.Partitioner()
  shardings = params_lib.flatten(p.shardings(network.abstract_params(model)))
  assert shardings["encoder/layers_0/attention/query/kernel"].spec == PartitionSpec(None, "model")
  assert shardings["encoder/layers_0/mlp/wo/kernel"].spec == PartitionSpec("model", None)
  assert shardings["decoder/layers_1/mlp/ia3_ff"].spec == PartitionSpec(None, "model")
  assert shardings["encoder/encoder_norm/scale"].spec == PartitionSpec(None)


def test_batch_size_must_split_over_data_axis():
  p = partitioning.Partitioner()
  assert p.local_batch_size(8) == 8 and p.data_shard_info() == (0, 1)
  batch = p.shard_batch({"label": np.arange(4, dtype=np.int32)}, 4)
  np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(4))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  res = tu.run_tiny(str(tmp_path_factory.mktemp("one")), steps=STEPS, checkpoint_period=3)
  return res


def test_eight_devices_2x4_mesh_match_one_device(tmp_path, one_device, compile_cache):
  env = tu.child_env(compile_cache)
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(tmp_path / "eight"), str(STEPS)],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert out["devices"] == 8 and out["mesh"] == {"data": 2, "model": 4, "processes": 1}

  want = [l for _, l in one_device["train_losses"]]
  print("max |loss diff| 8 vs 1 device:", np.max(np.abs(np.subtract(out["losses"], want))))
  tolerances.assert_close(out["losses"], want)
  for name, value in params_lib.flatten(jax.device_get(one_device["state"].trainable)).items():
    tolerances.assert_close(np.asarray(out["trainable"][name]), value, err_msg=name)

  sh = out["sharding"]
  # Kernels split over "model" (4 ways), replicated over "data": 8 devices hold them.
  assert sh["encoder/layers_0/mlp/wi_0/kernel"] == {
      "spec": "P(None, 'model')", "shard_shape": [32, 16], "num_devices": 8}
  assert sh["token_embedder/embedding"]["shard_shape"] == [32, 32]   # vocab 128 / 4
  assert sh["decoder/layers_0/self_attention/ia3_key"]["shard_shape"] == [1, 8]  # 32 / 4
  assert sh["decoder/layers_1/mlp/ia3_ff"]["shard_shape"] == [1, 16]
  assert sh["encoder/encoder_norm/scale"]["shard_shape"] == [32]     # embed: replicated
