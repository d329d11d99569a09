"""Decoder-only models through gin and the command line: models/tiny_llama.gin and
models/hf_decoder.gin with every PEFT file, `ia3-jax train` / `eval` / `infer` / `score` on a
tiny random HF Llama directory, and `ia3-jax peft-counts` on decoder presets against peft."""

from __future__ import annotations

import json
import pathlib
import shutil

import flax
import numpy as np
import pytest
import torch
import transformers

from ia3_jax import cli, gin_configurables
from ia3_jax.model import decoder, families
from ia3_jax.model import params as params_lib
from ia3_jax.model.decoder_config import get_decoder_config
from tests.test_decoder import make_hf

REPO = pathlib.Path(__file__).resolve().parents[1]
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4, 'num_choices': 2}"


_GOT: dict = {}


def _consumer(model):
  _GOT.update(model=model)


def _gin_model(model_file: str, peft: str, bindings=()):
  """The MODEL spec of models/<model_file> + recipes/t_few + peft/<peft>."""
  import gin
  gin.clear_config()
  gin.external_configurable(_consumer, "test_decoder_consumer")
  root = gin_configurables.gin_dir()
  try:
    gin.parse_config_files_and_bindings(
        [f"{root}/models/base.gin", f"{root}/models/{model_file}.gin", f"{root}/recipes/t_few.gin", f"{root}/peft/{peft}.gin"],
        ["INITIAL_CHECKPOINT_PATH = None", *bindings, "test_decoder_consumer.model = %MODEL"])
    gin.get_configurable("test_decoder_consumer")()
  finally:
    gin.clear_config()
  return _GOT["model"]


TRAINED = {"ia3": {"ia3_key", "ia3_value", "ia3_ff"}, "lora": None, "bitfit": None,
           "layernorm": {"scale"}, "full_finetune": None,
           "prefix_tuning": {"prefix_key", "prefix_value"}, "prompt_tuning": {"prompt_delta"}}


@pytest.mark.parametrize("peft", sorted(TRAINED))
def test_peft_gin_files_build_the_decoder_model(peft):
  spec = _gin_model("tiny_llama", peft)
  assert spec.config == get_decoder_config("tiny_llama")
  trainable = spec.trainable_patterns
  model = spec.model()
  assert isinstance(model, decoder.DecoderOnly)
  assert isinstance(model.blocks, decoder.DecoderBlocks)  # the PEFT blocks followed the model
  abstract = flax.linen.unbox(decoder.abstract_params(model))
  names = params_lib.flatten(abstract)
  chosen = params_lib.flatten(params_lib.partition(
      abstract, params_lib.trainable_mask(abstract, trainable))[0])
  assert chosen and set(chosen) <= set(names)
  if TRAINED[peft] is not None:
    assert {p.rsplit("/", 1)[-1] for p in chosen} == TRAINED[peft]
  if peft == "ia3":
    assert "decoder/layers_1/mlp/ia3_ff" in chosen


def test_blocks_of_another_family_are_a_one_line_error():
  """PEFT blocks are built on the model's family from the start (`ModelSpec.blocks`, or a
  method's `*_blocks(config)`); blocks built on T5's for a decoder-only model are refused."""
  from ia3_jax.peft import ia3, lora
  config = get_decoder_config("tiny_llama")
  on_t5 = lora.lora_blocks(targets=("q", "wo"), rank=2, base=ia3.ia3_blocks(num_tasks=2))
  with pytest.raises(ValueError, match=r"PEFT blocks built on the t5 blocks for a decoder_only "
                     r"model: build them with the model's config \(or base=DecoderBlocks\(\)\)"
                     ) as e:
    families.of(config).build(config, on_t5)
  assert "\n" not in str(e.value)
  on_decoder = lora.lora_blocks(config, targets=("q", "wo"), rank=2,
                                base=ia3.ia3_blocks(config, num_tasks=2))
  assert isinstance(on_decoder, decoder.DecoderBlocks)
  assert isinstance(families.of(config).build(config, on_decoder), decoder.DecoderOnly)


def test_train_eval_infer_score_commands_on_a_tiny_hf_llama(tmp_path, monkeypatch):
  make_hf(tmp_path / "base", "llama")
  shutil.copytree(REPO / "examples" / "toy", tmp_path / "toy")
  monkeypatch.syspath_prepend(str(tmp_path / "toy"))
  common = ["--gin_file=models/hf_decoder.gin", "--gin_file=recipes/t_few.gin",
            "--gin_file=peft/ia3.gin", "--gin.MIXTURE_OR_TASK_MODULES=['toy_tasks']",
            f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'base'}'", "--gin.BATCH_SIZE=4",
            LENGTHS]
  model_dir = tmp_path / "model"
  assert cli.main(["train", *common, f"--gin.MODEL_DIR='{model_dir}'",
                   "--gin.MIXTURE_OR_TASK_NAME='toy_fewshot_seed0'",
                   "--gin.EVAL_MIXTURE_OR_TASK_NAME='toy_eval'", "--gin.TRAIN_STEPS=2",
                   "--gin.CHECKPOINT_PERIOD=2", "--gin.USE_TENSORBOARD=False"]) == 0
  results = json.loads((model_dir / "results.json").read_text())
  assert results["step"] == 2 and results["params"]["trainable"] == 2 * (16 + 16 + 48)
  assert results["params"]["total"] == results["params"]["trainable"] + sum(
      p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(
          tmp_path / "base").parameters())
  trained = results["eval"]["2"]
  assert trained["num_examples"] == 48
  out = tmp_path / "eval"
  assert cli.main(["eval", *common, f"--gin.CHECKPOINT_PATH='{model_dir}'",
                   "--gin.MIXTURE_OR_TASK_NAME='toy_eval'", f"--gin.EVAL_OUTPUT_DIR='{out}'"]) == 0
  evaluated = json.loads((out / "eval_results.json").read_text())
  assert evaluated["step"] == 2 and evaluated["num_examples"] == 48
  assert evaluated["num_correct"] == trained["num_correct"]  # same checkpoint, same data
  infer = tmp_path / "infer"
  rest = [*common, f"--gin.CHECKPOINT_PATH='{model_dir}'",
          "--gin.MIXTURE_OR_TASK_NAME='toy_eval'", f"--gin.INFER_OUTPUT_DIR='{infer}'"]
  assert cli.main(["infer", *rest]) == 0 and cli.main(["score", *rest]) == 0
  rows = [json.loads(l) for l in (infer / "predictions.jsonl").read_text().splitlines()]
  scored = [json.loads(l) for l in (infer / "scores.jsonl").read_text().splitlines()]
  assert len(rows) == 48
  assert sum(r["prediction"] == r["label"] for r in rows) == trained["num_correct"]
  assert [int(np.argmax(r["scores"])) for r in scored] == [r["prediction"] for r in rows]


def _peft_trainable(name: str, peft_config) -> int:
  import peft
  from ia3_jax.interop import hf_decoder
  from tests.test_decoder import CLASSES
  d = hf_decoder.config_to_hf(get_decoder_config(name))
  config_cls, model_cls = CLASSES[d.pop("model_type")]
  with torch.device("meta"):
    model = peft.get_peft_model(model_cls(config_cls(**d)), peft_config)
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["llama_3_2_3b", "qwen2_0_5b"])
def test_peft_counts_of_decoder_presets_equal_peft(name, capsys):
  import peft
  assert cli.main(["peft-counts", "--model", name]) == 0  # every method
  rows = {line.split("|")[1].strip(): int(line.split("|")[3].replace(",", ""))
          for line in capsys.readouterr().out.splitlines()
          if line.startswith(("| ia3", "| lora", "| prefix_tuning", "| prompt_tuning"))}
  modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  assert rows["ia3"] == _peft_trainable(name, peft.IA3Config(
      task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
      feedforward_modules=["down_proj"]))
  assert rows["lora"] == _peft_trainable(name, peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=4, target_modules=modules))
  assert rows["prefix_tuning"] == _peft_trainable(name, peft.PrefixTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=10))  # one prefix per key/value head
  assert rows["prompt_tuning"] == _peft_trainable(name, peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=100))
  assert families.of(get_decoder_config(name)) is families.DECODER_ONLY


def test_convert_round_trips_a_qwen2_directory_through_orbax(tmp_path, capsys):
  """`ia3-jax convert` on a decoder-only HF directory: to orbax params (with its model
  config), and back to an HF Qwen2 directory that transformers loads with the same logits."""
  hf = make_hf(tmp_path / "hf", "qwen2")
  assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
  saved = json.loads((tmp_path / "orbax" / "model_config.json").read_text())
  assert saved["num_kv_heads"] == 2 and saved["attention_bias"] is True
  assert cli.main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
  assert type(back).__name__ == "Qwen2ForCausalLM"
  tokens = torch.tensor(np.random.RandomState(0).randint(1, 97, (2, 7)))
  with torch.no_grad():
    np.testing.assert_array_equal(back(tokens).logits.numpy(), hf(tokens).logits.numpy())
  capsys.readouterr()
  assert cli.main(["convert", str(tmp_path / "orbax"), str(tmp_path / "t5"),
                   "--model_type", "t5"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--model_type t5" in err[0] and "qwen2" in err[0]
  assert not (tmp_path / "t5").exists()
