"""The bundled tiny Llama (decoder-only) demo model and the demo on it (`DEMO_MODEL="llama"`)."""

import json
import os

import jax
import numpy as np
import pytest

from ia3_jax import demo
from ia3_jax.data import synthetic
from tests import tolerances

ASSETS = demo.BUNDLED_MODELS["llama"]
T5_SPM = os.path.join(demo.BUNDLED_MODELS["t5"], "spiece.model")


@pytest.fixture(scope="module")
def bundled():
  return demo.load_model(ASSETS)


def test_bundled_llama_files_and_shape(bundled):
  names = set(os.listdir(ASSETS))
  assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
          "training.json"} <= names
  assert sum(os.path.getsize(os.path.join(ASSETS, n)) for n in names) <= 10 * 2**20
  config, params, vocabulary = bundled
  assert config == demo.demo_model_config(vocabulary.vocab_size, "llama")
  assert config.num_kv_heads < config.num_heads  # grouped-query attention
  with open(os.path.join(ASSETS, "tokenizer.model"), "rb") as a, open(T5_SPM, "rb") as b:
    assert a.read() == b.read()  # one vocabulary: the same seqio tasks feed both models
  record = json.loads(open(os.path.join(ASSETS, "training.json")).read())
  assert record["train_wall_time_s"] < 40 * 60
  assert record["num_params"] == sum(np.size(x) for x in jax.tree.leaves(params))
  assert record["last_loss"] < 0.2 * record["first_loss"]
  trained = [a for f in synthetic.TRAINING_FAMILIES
             for a in record["zero_shot_accuracy"][f].values()]
  assert np.median(trained) >= 0.9  # it learned its training tasks


def test_bundled_llama_loads_in_transformers(bundled):
  """The HF directory is a real Llama: `LlamaForCausalLM` gives ia3-jax's logits."""
  import torch
  import transformers
  from ia3_jax.model import decoder
  config, params, _ = bundled
  hf = transformers.LlamaForCausalLM.from_pretrained(ASSETS).eval()
  tokens = np.random.RandomState(0).randint(3, config.vocab_size, (2, 11))
  ours = decoder.forward(decoder.DecoderOnly(config), params, tokens)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(tokens)).logits.numpy()
  tolerances.assert_close(np.asarray(ours), theirs)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """The README's `ia3-jax demo --gin.DEMO_MODEL="'llama'"`, its words as written (in this
  process), on one task and seed."""
  import shlex
  from ia3_jax import cli
  from tests.test_readme import readme_block
  argv = shlex.split(readme_block("demo-llama"))
  assert argv[:2] == ["ia3-jax", "demo"]
  out = tmp_path_factory.mktemp("demo_llama")
  assert cli.main(argv[1:] + [f"--gin.MODEL_DIR='{out}'", "--gin.DEMO_TASKS=('edible',)",
                              "--gin.DEMO_SEEDS=(1,)", "--gin.DEMO_EVAL_SIZE=100"]) == 0
  return out, json.loads((out / "results.json").read_text())


def test_llama_demo_trains_the_vectors_and_beats_zero_shot(small_run, bundled):
  """The demo's claim for the decoder-only model: T-Few on 32 examples of a held-out task
  lifts the median accuracy over templates by at least 20 points."""
  from ia3_jax.peft import ia3
  out, saved = small_run
  assert saved["model_path"].endswith(os.path.join("assets", "demo_llama"))
  assert saved["model_config"]["num_kv_heads"] == 2
  assert saved["num_trainable"] == ia3.count_ia3(bundled[0])
  adapter = json.loads((out / "adapters" / "edible_seed1" / "adapter_config.json").read_text())
  assert adapter["task_type"] == "CAUSAL_LM" and adapter["peft_type"] == "IA3"
  task = saved["summary"]["tasks"]["edible"]
  assert task["zero_shot"] < 0.65
  assert task["tfew"] - task["zero_shot"] >= 0.20, task


def test_unknown_demo_model_is_a_one_line_error(capsys):
  from ia3_jax import cli
  assert cli.main(["demo", "--gin.DEMO_MODEL='gpt'", "--gin.DEMO_TASKS=('edible',)"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "DEMO_MODEL='gpt'" in err[0] and "llama" in err[0]
