"""`ia3-jax export-peft` and `ia3-jax merge` on a decoder-only (IA)^3 training run: a 2-step
`ia3-jax train` of a tiny random HF Llama, then the adapter in peft and the merged directory in
transformers give the adapted model's logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import peft
import pytest
import transformers

from ia3_jax import cli
from ia3_jax.interop import hf_decoder
from ia3_jax.model import params as params_lib
from ia3_jax.peft import ia3
from ia3_jax.train import checkpointer
from tests.test_decoder import assert_valid_close, make_hf, our_logits, padded_batch, torch_logits
from tests.test_decoder_cli import LENGTHS, REPO


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(base HF dir, MODEL_DIR, our adapted logits, tokens, mask) of a 2-step (IA)^3 run."""
  root = tmp_path_factory.mktemp("decoder_run")
  make_hf(root / "base", "llama")
  shutil.copytree(REPO / "examples" / "toy", root / "toy")
  mp = pytest.MonkeyPatch()
  mp.syspath_prepend(str(root / "toy"))
  try:
    assert cli.main(["train", "--gin_file=models/hf_decoder.gin", "--gin_file=recipes/t_few.gin",
                     "--gin_file=peft/ia3.gin", "--gin.MIXTURE_OR_TASK_MODULES=['toy_tasks']",
                     f"--gin.INITIAL_CHECKPOINT_PATH='{root / 'base'}'", "--gin.BATCH_SIZE=4",
                     LENGTHS, f"--gin.MODEL_DIR='{root / 'model'}'",
                     "--gin.MIXTURE_OR_TASK_NAME='toy_fewshot_seed0'", "--gin.TRAIN_STEPS=2",
                     "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=2",
                     "--gin.USE_TENSORBOARD=False"]) == 0
  finally:
    mp.undo()
  config, base = hf_decoder.load_hf_decoder(root / "base")
  trained, meta = checkpointer.restore_trainable(root / "model")
  assert meta.get("step") == 2
  vectors = ia3.extract_ia3(trained)[0]
  assert not np.allclose(params_lib.flatten(vectors)["decoder/layers_0/mlp/ia3_ff"], 1.0)
  tokens, mask = padded_batch(5, "left")
  logits = our_logits(ia3.ia3_model(config, ia3.sites_of(vectors)),
                      ia3.insert_ia3(base, vectors), tokens, mask)
  return dict(root=root, logits=logits, tokens=tokens, mask=mask)


def test_export_peft_of_a_decoder_run_loads_in_peft(run):
  out = run["root"] / "adapter"
  assert cli.main(["export-peft", "--checkpoint", str(run["root"] / "model"),
                   "--out", str(out)]) == 0  # the model shape from the checkpoint's meta
  saved = json.loads((out / "adapter_config.json").read_text())
  assert saved["task_type"] == "CAUSAL_LM" and saved["feedforward_modules"] == ["down_proj"]
  assert saved["target_modules"] == ["down_proj", "k_proj", "v_proj"]
  hf = transformers.AutoModelForCausalLM.from_pretrained(run["root"] / "base").eval()
  loaded = peft.PeftModel.from_pretrained(hf, out).eval()
  assert_valid_close(run["logits"], torch_logits(loaded, run["tokens"], run["mask"]),
                     run["mask"], "export-peft")


def test_merge_of_a_decoder_run_writes_an_hf_llama(run):
  out = run["root"] / "merged"
  assert cli.main(["merge", "--base", str(run["root"] / "base"), "--ia3", str(run["root"] / "model"),
                   "--out", str(out)]) == 0
  merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(merged).__name__ == "LlamaForCausalLM"
  assert_valid_close(run["logits"], torch_logits(merged, run["tokens"], run["mask"]),
                     run["mask"], "merge")


def test_merge_model_type_of_another_family_is_a_one_line_error(run, capsys):
  assert cli.main(["merge", "--base", str(run["root"] / "base"), "--ia3", str(run["root"] / "model"),
                   "--out", str(run["root"] / "bad"), "--model_type", "t5"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "--model_type t5: not a decoder_only model type" in err, err
  assert not (run["root"] / "bad").exists()
