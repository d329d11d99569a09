"""Adapter banks (ADAPTERS, `runs.score(adapters=...)`) on a decoder-only model: one mixed-task
pass over two tiny tasks of a tiny random HF Llama, with a peft IA3 adapter and a training
checkpoint's vectors, equals each task run alone with its own adapter."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import seqio

from ia3_jax.train.assembly import ModelSpec
from ia3_jax import data, runs
from ia3_jax.interop import hf_checkpoints, hf_decoder, ia3_adapters
from ia3_jax.model import params as params_lib
from ia3_jax.peft import ia3
from tests import tolerances
from tests.test_decoder import make_hf

TOY = pathlib.Path(__file__).resolve().parents[1] / "examples" / "toy"
LENGTHS = {"inputs": 32, "targets": 4, "num_choices": 2}
KEYS = ("dbank_a", "dbank_b")  # dataset keys = adapter names
SIZES = (5, 3)  # validation examples per task (x 2 templates): batches of 4 mix tasks
MIXTURE = "dbank_mix_eval"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Two tasks and their mixture, a tiny HF Llama, a peft IA3 adapter and a checkpoint."""
  root = tmp_path_factory.mktemp("decoder_bank")
  vocab = seqio.SentencePieceVocabulary(str(TOY / "spm.model"))
  rows = [json.loads(l) for l in (TOY / "validation.jsonl").read_text().splitlines()]
  start = 0
  for key, n in zip(KEYS, SIZES):
    split = rows[start:start + n]
    data.register_task(key, {"train": split, "validation": split}, str(TOY / "toy.yaml"),
                       vocabulary=vocab, num_choices=2)
    start += n
  data.add_mixture(MIXTURE, [f"{k}_eval" for k in KEYS], kind="eval", default_split="validation")
  make_hf(root / "base", "llama")
  config = hf_decoder.load_hf_config(root / "base")
  rng = np.random.default_rng(0)
  vectors = [params_lib.unflatten({p: rng.uniform(0.2, 1.8, v.shape).astype(np.float32) for p, v
                                   in params_lib.flatten(ia3.init_ia3(config)).items()})
             for _ in KEYS]
  peft_dir = ia3_adapters.export_peft_adapter(vectors[0], config, root / "adapters" / "a")
  hf_checkpoints.save_params(root / "run" / "checkpoints" / "3" / "trainable", vectors[1])
  return {"root": root, "config": config, "adapters": {KEYS[0]: str(peft_dir),
                                                        KEYS[1]: str(root / "run")}}


def _score(out: pathlib.Path, env: dict, name: str, adapters) -> dict:
  result = runs.score(output_dir=str(out),
                      model=ModelSpec(env["config"], peft=ia3.IA3Config(),
                                      initial_checkpoint_path=str(env["root"] / "base")),
                      data=data.SeqioBatches(name, LENGTHS, shuffle=False, repeat=False),
                      batch_size=4, checkpoint_path=None, adapters=adapters)
  rows = [json.loads(l) for l in pathlib.Path(result["path"]).read_text().splitlines()]
  return {(r["task"], r["template_id"], r["example_id"]): r for r in rows}


def test_mixed_task_scores_equal_each_task_alone(env, tmp_path):
  alone = {}
  for key in KEYS:
    alone.update(_score(tmp_path / key, env, f"{key}_eval", {key: env["adapters"][key]}))
  mixed = _score(tmp_path / "mixed", env, MIXTURE, env["adapters"])
  assert len(mixed) == 2 * sum(SIZES) and sorted(mixed) == sorted(alone)
  for k, r in mixed.items():
    assert r["prediction"] == alone[k]["prediction"], k
    tolerances.assert_close(r["scores"], alone[k]["scores"], err_msg=str(k))
