"""Tests for ia3_jax.costs: parameter counts vs HF transformers / peft, and the paper's figures."""

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ia3_jax import costs
from ia3_jax.model.config import get_config


def _round_sig(x, digits=2):
  return float(f"{x:.{digits - 1}e}")


# ---------------------------------------------------------------------------
# Parameter counts against independent implementations (built on the meta
# device: no memory, no download).
# ---------------------------------------------------------------------------


def _hf_model(preset):
  import torch
  import transformers

  cfg = get_config(preset)
  gated = cfg.mlp_activations == ("gelu", "linear")
  assert gated or cfg.mlp_activations == ("relu",), cfg.mlp_activations
  hf_cfg = transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
      num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
      num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
      relative_attention_max_distance=cfg.relative_attention_max_distance,
      feed_forward_proj="gated-gelu" if gated else "relu",
      tie_word_embeddings=cfg.logits_via_embedding,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  cls = transformers.MT5ForConditionalGeneration if preset.startswith("mt5") else (
      transformers.T5ForConditionalGeneration)
  with torch.device("meta"), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return cls(hf_cfg)


PRESETS_TO_CHECK = ["tiny", "t5_1_1_small", "t5_1_0_small", "mt5_small", "t0_3b", "t0_11b"]


@pytest.fixture(scope="module")
def hf_models():
  return {name: _hf_model(name) for name in PRESETS_TO_CHECK}


@pytest.mark.parametrize("preset", PRESETS_TO_CHECK)
def test_count_params_matches_hf(hf_models, preset):
  model = hf_models[preset]
  config = get_config(preset)
  hf_count = sum(p.numel() for p in model.parameters())  # shared weights counted once
  assert costs.count_params(config, include_lm_head=False) == hf_count
  # Our T5X tree: the untied lm_head is a separate kernel; tied models have none.
  lm_head = 0 if config.logits_via_embedding else model.lm_head.weight.numel()
  assert costs.count_params(config, include_lm_head=True) == hf_count + lm_head


def test_count_params_known_figures():
  assert costs.count_params(get_config("t0_3b"), include_lm_head=False) == 2_783_959_040
  assert costs.count_params(get_config("t0_11b"), include_lm_head=False) == 11_003_736_064
  assert costs.count_params(get_config("t0_3b"), include_lm_head=True) == 2_849_757_184
  tied = get_config("t5_1_0_small")
  assert costs.count_params(tied, include_lm_head=True) == costs.count_params(
      tied, include_lm_head=False)
  parts = costs.param_breakdown(get_config("t0_3b"))
  assert parts["decoder/logits_dense"] == parts["token_embedder"] == 32128 * 2048


@pytest.mark.parametrize("preset", ["tiny", "t5_1_1_small", "mt5_small", "t0_3b", "t0_11b"])
def test_count_ia3_params_matches_peft(hf_models, preset):
  from peft import IA3Config, get_peft_model

  # peft's default T5/mT5 targets (k, v and wo's input or wi_1's output) are the paper's sites.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft_model = get_peft_model(hf_models[preset], IA3Config(task_type="SEQ_2_SEQ_LM"))
  trainable, _ = peft_model.get_nb_trainable_parameters()
  assert costs.count_ia3_params(get_config(preset)) == trainable
  peft_model.unload()  # leave the shared fixture model as it was


def test_count_ia3_params_known_figures():
  assert costs.count_ia3_params(get_config("t0_3b")) == 540_672
  assert costs.count_ia3_params(get_config("t0_11b")) == 1_081_344


def test_count_tree_params():
  module = nn.Dense(7)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((3, 5)))
  assert costs.count_tree_params(abstract) == 5 * 7 + 7
  boxed = nn.Partitioned(jnp.zeros((4, 6)), names=("embed", "mlp"))
  tree = {"a": {"kernel": np.zeros((2, 3)), "boxed": boxed},
          "b": [jax.ShapeDtypeStruct((10,), jnp.float32), jnp.zeros(())]}
  assert costs.count_tree_params(tree) == 6 + 24 + 10 + 1
  assert costs.count_tree_params(abstract["params"]) == 42


# ---------------------------------------------------------------------------
# The paper's figures (Liu et al. 2022, Table 1 / section 4.2).
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper():
  return costs.compare()  # defaults = the paper's setting


def test_paper_inference_flops(paper):
  n = costs.count_params(get_config("t0_11b"), include_lm_head=False)
  assert paper.num_params == n
  assert paper.tfew_inference_flops == n * 103
  assert _round_sig(paper.tfew_inference_flops) == 1.1e12
  (icl,) = paper.icl_inference_flops
  assert icl == 2 * 175e9 * 41 * 98
  assert _round_sig(icl) == 1.4e15
  assert icl / paper.tfew_inference_flops > 1000  # "over 1,000x fewer FLOPs"


def test_paper_training_flops(paper):
  assert paper.tfew_training_flops == 3 * paper.num_params * 1000 * 8 * 103
  assert _round_sig(paper.tfew_training_flops) == 2.7e16
  np.testing.assert_allclose(paper.tfew_training_flops, 3 * 11e9 * 1000 * 8 * 103, rtol=1e-3)
  # With the untied lm_head counted, the figure would no longer round to the paper's.
  with_head = costs.compare(include_lm_head=True)
  assert _round_sig(with_head.tfew_training_flops) == 2.8e16


def test_paper_storage(paper):
  assert paper.tfew_storage_bytes == 1_081_344 * 4 == 4_325_376
  assert round(paper.tfew_storage_bytes / 1e6, 2) == 4.33
  assert paper.tfew_storage_bytes / 2**20 == 4.125
  # The paper's "4.2 MB" lies between the decimal and binary readings, within 3% of each.
  for megabyte in (1e6, 2**20):
    assert abs(4.2 - paper.tfew_storage_bytes / megabyte) / 4.2 < 0.03
  assert paper.icl_storage_bytes == 41 * 98 * 4 == 16_072
  assert round(paper.icl_storage_bytes / 1e3) == 16


def test_architecture_rule():
  assert costs.flops_per_token(10.0, costs.DECODER_ONLY) == 2 * costs.flops_per_token(10.0)
  with pytest.raises(ValueError, match="architecture"):
    costs.flops_per_token(10.0, "encoder_only")


def test_format_sci():
  assert costs.format_sci(1.1334e12) == "1.1e12"
  assert costs.format_sci(1.4063e15, 5) == "1.4063e15"
  assert costs.format_sci(9.96e11) == "1.0e12"
  assert costs.format_sci(0) == "0"


# ---------------------------------------------------------------------------
# `ia3-jax costs`.
# ---------------------------------------------------------------------------


def test_main_prints_paper_figures(capsys):
  assert costs.main(["--model", "t0_11b"]) == 0
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| ")]
  tfew = next(r for r in rows if r.startswith("| T-Few (t0_11b"))
  icl = next(r for r in rows if r.startswith("| Few-shot ICL"))
  for figure in ("1.1e12", "2.7e16", "4.33 MB", "4.125 MiB", "4,325,376 B", "1,081,344"):
    assert figure in tfew, figure
  for figure in ("1.4e15", "16.07 kB", "16,072 B"):
    assert figure in icl, figure
  assert any(r.startswith("| Paper, Table 1: T-Few") and "4.2 MB" in r for r in rows)
  assert "11,003,736,064" in out and "1.1334e12" in out and "2.7201e16" in out


def test_main_other_settings(capsys):
  assert costs.main(["--model", "t0_3b", "--icl_params", "6.7e9", "13e9", "--shots", "20",
                     "--train_steps", "300", "--batch_size", "16"]) == 0
  out = capsys.readouterr().out
  n = 2_783_959_040
  assert costs.format_sci(n * 103) in out
  assert costs.format_sci(3 * n * 300 * 16 * 103) in out
  assert costs.format_sci(2 * 6.7e9 * 20 * 98) in out
  assert costs.format_sci(2 * 13e9 * 20 * 98) in out
  assert "540,672" in out and f"{20 * 98 * 4:,} B" in out
  assert "Paper, Table 1" not in out  # paper figures only for the paper's setting


def test_main_json(capsys):
  assert costs.main(["--model", "tiny", "--json"]) == 0
  data = json.loads(capsys.readouterr().out)
  assert data["num_params"] == costs.count_params(get_config("tiny"), include_lm_head=False)
  assert data["ia3_params"] == costs.count_ia3_params(get_config("tiny"))
  assert data["icl_inference_flops"] == [2 * 175e9 * 41 * 98]


@pytest.mark.parametrize("argv,flag", [(["--model", "t0_12b"], "--model"),
                                       (["--train_steps", "0"], "--train_steps"),
                                       (["--batch_size", "2.5"], "--batch_size"),
                                       (["--icl_params", "-1"], "--icl_params"),
                                       (["--tokens_per_example", "abc"], "--tokens_per_example")])
def test_main_rejects_bad_flags(capsys, argv, flag):
  with pytest.raises(SystemExit) as exc:
    costs.main(argv)
  assert exc.value.code == 2
  assert flag in capsys.readouterr().err
