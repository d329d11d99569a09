"""README "Decoder-only models (Llama, Mistral, Qwen2)": its snippet and commands as written,
offline (commands get extra `--gin.` flags for a short run in a temporary folder)."""

from __future__ import annotations

import json
import shutil

import numpy as np

from tests.test_readme import REPO, SMALL, readme_block, run_commands


def test_decoder_python_snippet_ranks_the_choices(capsys):
  scope: dict = {}
  code = compile(readme_block("decoder-python"), "README.md", "exec")
  exec(code, scope)  # pylint: disable=exec-used
  scores, predictions = np.asarray(scope["out"]["scores"]), np.asarray(scope["out"]["predictions"])
  assert scores.shape == (1, 2) and np.all(np.isfinite(scores)) and np.all(scores < 0)
  np.testing.assert_array_equal(predictions, np.argmax(scores, axis=-1))
  assert str(predictions) in capsys.readouterr().out


def test_decoder_train_and_export_commands_on_a_tiny_hf_llama(tmp_path):
  """The blocks as a reader runs them from a fresh clone: the first line makes the model."""
  shutil.copytree(REPO / "examples" / "toy", tmp_path / "examples" / "toy")
  model_dir = tmp_path / "runs" / "toy-llama"  # the block's MODEL_DIR, relative to tmp_path
  run_commands(readme_block("decoder-train"), tmp_path, SMALL, tmp_path / "bin")
  results = json.loads((model_dir / "results.json").read_text())
  assert results["step"] == 2 and results["params"]["trainable"] == 2 * (16 + 16 + 48)
  assert results["eval"]["2"]["num_examples"] == 48  # 24 validation examples x 2 templates
  run_commands(readme_block("decoder-export"), tmp_path, [], tmp_path / "bin",
               command="ia3-jax merge")
  adapter = json.loads((tmp_path / "adapters" / "toy-llama" / "adapter_config.json").read_text())
  assert adapter["peft_type"] == "IA3" and adapter["task_type"] == "CAUSAL_LM"
  merged = json.loads((tmp_path / "models" / "toy-llama-merged" / "config.json").read_text())
  assert merged["architectures"] == ["LlamaForCausalLM"]  # logits: test_decoder_cli_adapters


def test_decoder_counts_command(tmp_path):
  proc = run_commands(readme_block("decoder-counts"), tmp_path, [], tmp_path / "bin",
                      command="ia3-jax peft-counts")
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
  assert [r.split("|")[1].strip() for r in rows[2:]] == ["ia3", "lora", "bitfit", "layernorm"]
  assert "| ia3 | sites=k,v,ff | 286,720 |" in proc.stdout  # 28 x (2 x 1024 + 8192)
