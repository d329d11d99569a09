"""Helpers for the trainer tests: a deterministic, learnable rank-classification stream.

Importable from subprocesses (`from tests import trainer_utils`), so the
multi-device, multi-process and kill/resume tests train on exactly the same
batches as the in-process reference runs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Iterator

import numpy as np

VOCAB = 128  # the tiny preset's vocabulary
REPO = pathlib.Path(__file__).resolve().parents[1]
SCHEDULE_STEPS = 100  # run_tiny's lr schedule length: the same step program for any run length


def compilation_cache_dir(tmp_path_factory) -> pathlib.Path:
  """A persistent XLA compilation cache shared by this test run's workers and subprocesses.

  The trainer tests compile the same tiny-model programs in many processes; with the
  cache each is compiled once per run (a 10-20 s compile becomes a < 1 s load).
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  return base / "jax_compilation_cache"


def enable_compilation_cache(path: pathlib.Path) -> None:
  import jax
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def child_env(cache_dir: pathlib.Path, **extra: str) -> dict:
  """Environment of a subprocess: the repo importable, CPU only, the shared compile cache."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
  # The session's XLA flags (conftest) without a fake device count: a script sets its own.
  env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  return env


@dataclasses.dataclass(frozen=True)
class SyntheticBatches:
  """Global batch i is a pure function of (seed, i); a host takes its block of rows.

  The label is the parity of the first input token; choice n is the tokens
  (10 + 2n, 11 + 2n, EOS). Choice 1 of some rows is one token shorter, and
  the last row of every batch is padding (example_mask 0), so every masking
  path of the loss is exercised. `delay` sleeps before each batch (to give a
  test time to kill a run).
  """

  global_batch_size: int
  length: int = 8
  num_choices: int = 2
  target_length: int = 3
  seed: int = 0
  delay: float = 0.0
  num_distinct: int = 0  # > 0: cycle over this many batches (a few-shot training set)

  def global_batch(self, index: int) -> dict[str, np.ndarray]:
    if self.num_distinct:
      index %= self.num_distinct
    rng = np.random.RandomState(self.seed * 100003 + index)
    b, c, t = self.global_batch_size, self.num_choices, self.target_length
    enc = rng.randint(3, VOCAB, size=(b, self.length)).astype(np.int32)
    enc[:, -1] = 1
    label = (enc[:, 0] % c).astype(np.int32)
    choices = np.zeros((b, c, t), np.int32)
    for n in range(c):
      choices[:, n, :] = [10 + 2 * n, 11 + 2 * n, 1][:t]
    short = rng.rand(b) < 0.3
    choices[short, c - 1, t - 2:] = [1, 0]
    example_mask = np.ones((b,), np.int32)
    example_mask[-1] = 0
    return {"encoder_input_tokens": enc, "choice_tokens": choices,
            "choice_mask": np.ones((b, c), np.int32), "label": label,
            "example_mask": example_mask, "task_id": np.zeros((b,), np.int32),
            "template_id": (np.arange(b) % 2).astype(np.int32)}

  def __call__(self, *, batch_size: int, start_step: int = 0, shard_id: int = 0,
               num_shards: int = 1) -> Iterator[dict[str, np.ndarray]]:
    assert batch_size * num_shards == self.global_batch_size, (batch_size, num_shards)

    def gen():
      index = start_step
      while True:
        if self.delay:
          time.sleep(self.delay)
        full = self.global_batch(index)
        yield {k: v[shard_id * batch_size:(shard_id + 1) * batch_size] for k, v in full.items()}
        index += 1
    return gen()


@dataclasses.dataclass(frozen=True)
class SyntheticEval:
  """A finite eval stream: `num_batches` batches of SyntheticBatches with another seed."""

  global_batch_size: int
  num_batches: int = 2
  seed: int = 7

  def __call__(self, *, batch_size: int, start_step: int = 0, shard_id: int = 0,
               num_shards: int = 1):
    source = SyntheticBatches(self.global_batch_size, seed=self.seed)
    it = source(batch_size=batch_size, start_step=start_step, shard_id=shard_id,
                num_shards=num_shards)
    return (next(it) for _ in range(self.num_batches))


def random_base_params(config, seed: int = 0) -> dict:
  """Host (NumPy) params for the base network of `config`, drawn without compiling an init."""
  import flax
  from ia3_jax.model import network
  abstract = flax.linen.unbox(network.abstract_params(network.Transformer(config)))
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    if path[-1].key == "scale":
      return np.ones(leaf.shape, np.float32)
    return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)
  import jax
  return jax.tree_util.tree_map_with_path(draw, abstract)


def make_trainer(model, *, trainable, optimizer, partitioner=None, seed: int = 42,
                 use_task_id: bool = False, max_choices_per_step=None,
                 frozen_storage=None, **trainer_kw):
  """A `trainer.Trainer` on the `ParamLayout` of `model` (a built network)."""
  from ia3_jax.model import storage
  from ia3_jax.train import param_layout, trainer
  lay = param_layout.ParamLayout(model, trainable=trainable, partitioner=partitioner, seed=seed,
                                 use_task_id=use_task_id,
                                 max_choices_per_step=max_choices_per_step,
                                 frozen_storage=frozen_storage or storage.FrozenStorage())
  return trainer.Trainer(lay, optimizer=optimizer, **trainer_kw)


def run_tiny(model_dir: str, *, steps: int, batch_size: int = 8, dropout: float = 0.1,
           learning_rate: float = 3e-3, partitioning=None, checkpoint_period: int = 0,
           keep: int = 3, delay: float = 0.0, grad_accum_steps: int = 1, num_distinct: int = 0,
           trainable: str = "ia3", optimizer=None, eval_batches: int = 0, seed: int = 0,
           schedule_steps: int = SCHEDULE_STEPS, post_load=None, frozen_dtype: str = "float32"):
  """`loop.train` on the tiny preset with the T-Few loss and optimizer (Adafactor, clip 1.0,
  warmup over 6% of `schedule_steps`, then linear decay to 0 at `schedule_steps`)."""
  from ia3_jax.model import config
  from ia3_jax.objectives import losses
  from ia3_jax.peft import ia3
  from ia3_jax.train import assembly, checkpointer, optimizers, partitioning as part
  from ia3_jax.train import loop
  cfg = config.get_config("tiny")
  spec = assembly.ModelSpec(cfg, peft=ia3.IA3Config() if trainable == "ia3" else None,
                            dropout_rate=dropout, frozen_dtype=frozen_dtype)
  return loop.train(
      model_dir=model_dir, model=spec,
      train_data=SyntheticBatches(batch_size, delay=delay, num_distinct=num_distinct, seed=seed),
      eval_data=SyntheticEval(batch_size, num_batches=eval_batches) if eval_batches else None,
      train_config=loop.TrainConfig(train_steps=steps, batch_size=batch_size,
                                       grad_accum_steps=grad_accum_steps, log_period=5,
                                       tensorboard=False, progress=False, seed=seed),
      loss=losses.LossConfig(),
      optimizer=optimizer or optimizers.OptimizerConfig(learning_rate=learning_rate,
                                                        total_steps=schedule_steps),
      partitioning=partitioning or part.PartitionConfig(),
      checkpoint=checkpointer.CheckpointConfig(period=checkpoint_period, keep=keep),
      initial_params=random_base_params(cfg), post_load=post_load)
