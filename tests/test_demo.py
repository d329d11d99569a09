"""The bundled demo model, the demo tasks, and a small run of the demo (ia3_jax.demo)."""

import json
import os

import jax
import numpy as np
import pytest

from ia3_jax import demo
from ia3_jax.data import synthetic

ASSETS = demo.BUNDLED_MODEL_DIR


@pytest.fixture(scope="module")
def bundled():
  return demo.load_model()


def test_bundled_model_files(bundled):
  names = set(os.listdir(ASSETS))
  assert {"config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"} <= names
  total = sum(os.path.getsize(os.path.join(ASSETS, n)) for n in names)
  assert total <= 10 * 2**20
  config, params, vocabulary = bundled
  assert config == demo.demo_model_config(vocabulary.vocab_size)
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=os.path.join(ASSETS, "spiece.model"))
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  # Every word of the suite tokenizes without unknown pieces.
  for word in synthetic.vocabulary_words():
    assert sp.unk_id() not in sp.encode(word), word


def test_bundled_model_loads_in_transformers(bundled, tmp_path):
  """The HF export is a real T5: transformers gives the same logits as ia3-jax."""
  import jax.numpy as jnp
  import torch
  import transformers
  from ia3_jax.model import network
  config, params, _ = bundled
  hf = transformers.T5ForConditionalGeneration.from_pretrained(ASSETS).eval()
  rng = np.random.RandomState(0)
  enc = rng.randint(3, config.vocab_size, (2, 9))
  dec = rng.randint(3, config.vocab_size, (2, 4))
  ours = network.Transformer(config).apply({"params": params}, jnp.asarray(enc),
                                           network.shift_right(jnp.asarray(dec)), jnp.asarray(dec))
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(enc), labels=torch.tensor(dec)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4, rtol=2e-4)


def test_summarize_against_numpy():
  zs = {"a": {"t1": 0.5, "t2": 0.6, "t3": 0.4}}
  tfew = {"a": {0: {"t1": 0.9, "t2": 0.7, "t3": 0.8}, 1: {"t1": 0.6, "t2": 1.0, "t3": 0.9}}}
  s = demo.summarize(zs, tfew)["tasks"]["a"]
  assert s["zero_shot"] == pytest.approx(0.5)
  assert s["tfew_per_seed"] == {0: pytest.approx(0.8), 1: pytest.approx(0.9)}
  assert s["tfew"] == pytest.approx(0.85) and s["gain"] == pytest.approx(0.35)
  assert s["tfew_pooled_median"] == pytest.approx(np.median([0.9, 0.7, 0.8, 0.6, 1.0, 0.9]))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """The README's main job (`ia3-jax demo`, gin/demo.gin) with small settings."""
  from ia3_jax import cli
  out = tmp_path_factory.mktemp("demo")
  assert cli.main(["demo", f"--gin.MODEL_DIR='{out}'", "--gin.DEMO_TASKS=('edible',)",
                   "--gin.DEMO_SEEDS=(1,)", "--gin.DEMO_EVAL_SIZE=100"]) == 0
  return out, json.loads((out / "results.json").read_text())


def test_run_demo_outputs(small_run, bundled):
  from ia3_jax.peft import ia3
  out, results = small_run
  config = bundled[0]
  saved = results
  assert saved["settings"]["families"] == ["edible"] and saved["settings"]["seeds"] == [1]  # flags
  assert saved["settings"]["train_steps"] == demo.DEMO_RECIPE["train_steps"]
  assert saved["settings"]["loss_weights"] == [1.0, 1.0, 1.0]  # demo.gin: the T-Few loss
  assert saved["num_trainable"] == ia3.count_ia3(config)
  assert set(saved["zero_shot"]["edible"]) == {t for t in saved["tfew"]["edible"]["1"]}
  assert len(saved["zero_shot"]["edible"]) == 4
  assert (out / "results.png").stat().st_size > 5000
  events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
  assert len(events) >= 2
  adapter = out / "adapters" / "edible_seed1"
  assert (adapter / "adapter_config.json").exists()
  assert saved["adapter_bytes"] == sum(f.stat().st_size for f in adapter.iterdir())
  assert "| edible |" in saved["table"] and "Trainable (IA)^3 params" in saved["table"]
  losses = saved["train_losses"]["edible"]["1"]
  assert len(losses) == demo.DEMO_RECIPE["train_steps"] and all(np.isfinite(losses))


def test_tfew_beats_zero_shot_by_20_points(small_run):
  """The demo's claim on one held-out task and seed: (IA)^3 with the T-Few recipe on 32
  examples lifts the median accuracy over templates by at least 20 points."""
  _, saved = small_run
  task = saved["summary"]["tasks"]["edible"]
  assert task["zero_shot"] < 0.65
  assert task["tfew"] - task["zero_shot"] >= 0.20, task


def test_zero_shot_is_the_base_model(bundled):
  """(IA)^3 at ones scores exactly like the plain model (checked on the same eval task)."""
  config, params, vocabulary = bundled
  demo.register_tasks(vocabulary, families=("edible",), seeds=(0,), num_shots=4, eval_size=24)
  with_ia3 = demo.FewShotRunner(config, params, method="ia3", train_steps=1)
  plain = demo.FewShotRunner(config, params, method="full", train_steps=1)
  a = with_ia3.evaluate(with_ia3.initial_params(), "edible")
  b = plain.evaluate(plain.initial_params(), "edible")
  assert a == b and len(a) == 4


def test_demo_tasks_through_seqio(bundled):
  """Registered tasks give rank-classification batches whose labelled choice is the template's target."""
  from ia3_jax import data
  from ia3_jax.data.templates import load_templates
  from ia3_jax.tasks import demo as demo_tasks
  _, _, vocabulary = bundled
  demo.register_tasks(vocabulary, families=("alive",), seeds=(5,), num_shots=6, eval_size=16)
  lengths = demo.feature_lengths("alive")
  batch = next(iter(data.get_batches("demo_alive_eval_is_it_alive", None, 16, lengths)))
  assert batch["choice_tokens"].shape == (16, 2, lengths["targets"])
  rows = synthetic.generate_splits("alive", {"validation": 16, "train": demo_tasks.HELDOUT_POOL_SIZE})
  template = load_templates(demo_tasks.template_path("alive")).get("is it alive")
  for i in range(16):
    r = template.render(rows["validation"][i])
    assert vocabulary.decode(batch["encoder_input_tokens"][i].tolist()) == r.inputs
    correct = batch["choice_tokens"][i, batch["label"][i]].tolist()
    assert vocabulary.decode(correct) == r.target
  shots = data.get_batches("demo_alive_fewshot_seed5", "train", 6, lengths, seed=0)
  ids = {i for _ in range(6) for i in next(shots)["example_id"].tolist()}  # a repeated stream
  from ia3_jax.data import fewshot
  assert ids == set(fewshot.sample_indices(demo_tasks.HELDOUT_POOL_SIZE, 6, 5).tolist())


def test_regeneration_script_makes_a_loadable_model(tmp_path):
  """scripts/train_demo_model.py end to end, tiny: vocabulary, multitask full fine-tuning with
  ia3-jax's trainer, HF export, training.json -- and the result loads like the bundled model."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "train_demo_model.py")
  spec = importlib.util.spec_from_file_location("train_demo_model", path)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  out = tmp_path / "model"
  assert script.main(["--out", str(out), "--work_dir", str(tmp_path / "work"), "--steps", "1",
                      "--batch_size", "4", "--vocab_size", "160", "--corpus_size", "60",
                      "--eval_size", "8", "--eval_families", "topic,alive"]) == 0
  config, params, vocabulary = demo.load_model(out)
  assert vocabulary.vocab_size == 160 and config == demo.demo_model_config(160)
  record = json.loads((out / "training.json").read_text())
  assert record["settings"]["steps"] == 1 and "out" not in record["settings"]
  assert record["num_params"] == sum(np.size(x) for x in jax.tree.leaves(params))
  assert np.isfinite(record["first_loss"]) and np.isfinite(record["last_loss"])
  assert set(record["zero_shot_accuracy"]) == {"topic", "alive"}  # a training, a held-out family


def test_runner_over_an_int8_base_stores_it_so_and_evaluates(bundled):
  from ia3_jax.model import storage
  config, params, vocabulary = bundled
  demo.register_tasks(vocabulary, families=("edible",), seeds=(0,), num_shots=4, eval_size=24)
  runner = demo.FewShotRunner(config, params, method="ia3", train_steps=1, frozen_dtype="int8")
  initial = runner.initial_params()
  kernels = [x for x in jax.tree.leaves(initial, is_leaf=lambda x: isinstance(x, storage.QArray))
             if isinstance(x, storage.QArray)]
  assert kernels and runner.trainer.layout.num_params()["frozen_bytes"] < 0.3 * 4 * runner.num_total
  accuracies = runner.evaluate(initial, "edible")
  assert len(accuracies) == 4 and all(0 <= a <= 1 for a in accuracies.values())
