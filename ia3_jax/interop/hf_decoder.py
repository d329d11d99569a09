"""HF Llama / Mistral / Qwen2 causal-LM directories <-> `decoder.DecoderOnly` param trees.

Reads `config.json` (transformers 5's `rope_parameters` or the older `rope_theta` +
`rope_scaling`) and the weights (`model.safetensors`, a sharded
`model.safetensors.index.json`, or torch `.bin` files read with `weights_only=True`)
one tensor at a time through `hf_checkpoints.iter_hf_tensors`; writes float32
safetensors plus a `config.json` that `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from ia3_jax.errors import CheckpointError
from ia3_jax.interop import hf_checkpoints
from ia3_jax.model.decoder_config import DecoderConfig

PathLike = str | os.PathLike
Params = dict[str, Any]

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
# Buffers older files carry that the model recomputes.
_IGNORED = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
_ATTENTION = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj"))
_MLP = (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj"))


# --------------------------------------------------------------------------- config


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _rope(hf: Mapping[str, Any], source: str) -> tuple[float, Optional[dict]]:
  """(rope_theta, rope_scaling or None) from either HF config layout."""
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping):
    theta, scaling = params.get("rope_theta", hf.get("rope_theta", 10000.0)), dict(params)
  else:
    theta, scaling = hf.get("rope_theta", 10000.0), dict(hf.get("rope_scaling") or {})
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
    raise CheckpointError(f"{source}: partial_rotary_factor "
                          f"{scaling['partial_rotary_factor']} is not supported")
  if kind == "default":
    return float(theta), None
  if kind not in ("llama3", "linear"):
    raise CheckpointError(f"{source}: rope_type {kind!r} is not supported (default, llama3, "
                          "linear)")
  return float(theta), {k: v for k, v in scaling.items() if k != "rope_theta"}


def config_from_hf(hf: Mapping[str, Any], *, dtype: Any = "float32",
                   source: str = "config.json") -> DecoderConfig:
  """DecoderConfig from an HF Llama / Mistral / Qwen2 `config.json` dict; errors name
  the file and field."""
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    raise CheckpointError(f"{source}: model_type {model_type!r} is not supported; decoder-only "
                          f"models: {', '.join(ARCHITECTURES)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
  if hf.get("mlp_bias"):
    raise CheckpointError(f"{source}: mlp_bias=true is not supported")
  sliding = _sliding_window(hf, model_type, source)
  theta, scaling = _rope(hf, source)
  bias = {"llama": bool(hf.get("attention_bias", False)), "mistral": False, "qwen2": True}
  try:
    heads = hf["num_attention_heads"]
    return DecoderConfig(
        vocab_size=hf["vocab_size"], emb_dim=hf["hidden_size"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bias[model_type], attention_out_bias=model_type == "llama"
        and bias["llama"], sliding_window=sliding,
        max_position_embeddings=hf.get("max_position_embeddings", 4096), dtype=dtype)
  except KeyError as e:
    raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from e
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from e


def _sliding_window(hf: Mapping[str, Any], model_type: str, source: str) -> Optional[int]:
  if model_type == "mistral":
    return hf.get("sliding_window")
  if model_type == "qwen2" and (hf.get("use_sliding_window")
                                or "sliding_attention" in (hf.get("layer_types") or [])):
    raise CheckpointError(f"{source}: use_sliding_window=true (per-layer sliding windows) is "
                          "not supported")
  return None


def model_type_of(config: DecoderConfig) -> str:
  """The HF model_type that represents `config`: qwen2 (q/k/v biases only), mistral (a
  sliding window) or llama."""
  if config.attention_bias and not config.attention_out_bias:
    return "qwen2"
  return "mistral" if config.sliding_window is not None else "llama"


def config_to_hf(config: DecoderConfig, model_type: Optional[str] = None) -> dict:
  """An HF `config.json` dict for `config` (rope in both the transformers 5 and 4 keys)."""
  model_type = model_type or model_type_of(config)
  _check_representable(config, model_type)
  rope = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling:
    rope = {**config.rope_scaling, "rope_theta": config.rope_theta}
  out = {
      "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
      "vocab_size": config.vocab_size, "hidden_size": config.emb_dim,
      "intermediate_size": config.mlp_dim, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings, "rope_parameters": rope,
      "rope_theta": config.rope_theta,
      "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
  }
  if model_type == "llama":
    out.update(attention_bias=config.attention_bias, mlp_bias=False)
  elif model_type == "mistral":
    out["sliding_window"] = config.sliding_window
  else:
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=config.num_layers)
  return out


def _check_representable(config: DecoderConfig, model_type: str) -> None:
  if model_type not in ARCHITECTURES:
    raise CheckpointError(f"model_type {model_type!r}: choose from {', '.join(ARCHITECTURES)}")
  ok = {"llama": config.attention_bias == config.attention_out_bias
                 and config.sliding_window is None,
        "mistral": not config.attention_bias and not config.attention_out_bias,
        "qwen2": config.attention_bias and not config.attention_out_bias
                 and config.sliding_window is None}[model_type]
  if not ok:
    raise CheckpointError(
        f"model_type {model_type!r} cannot represent attention_bias={config.attention_bias}, "
        f"attention_out_bias={config.attention_out_bias}, sliding_window="
        f"{config.sliding_window} (model_type_of(config) is {model_type_of(config)!r})")


def load_hf_config(path: PathLike, *, dtype: Any = "float32") -> DecoderConfig:
  """The DecoderConfig of an HF model directory."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a directory (expected an HF model directory)")
  cfg_path = path / "config.json"
  if not cfg_path.exists():
    raise CheckpointError(f"{path}: no config.json; expected an HF model directory")
  return config_from_hf(_read_json(cfg_path), dtype=dtype, source=str(cfg_path))


# --------------------------------------------------------------------------- names


def hf_name_map(config: DecoderConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
  """Our param path -> (HF tensor name, whether the HF tensor is transposed)."""
  m: dict[tuple[str, ...], tuple[str, bool]] = {
      ("token_embedder", "embedding"): ("model.embed_tokens.weight", False),
      ("decoder", "decoder_norm", "scale"): ("model.norm.weight", False),
  }
  if not config.tie_word_embeddings:
    m[("decoder", "logits_dense", "kernel")] = ("lm_head.weight", True)
  for i in range(config.num_layers):
    ours, hf = ("decoder", f"layers_{i}"), f"model.layers.{i}"
    m[ours + ("pre_self_attention_layer_norm", "scale")] = (f"{hf}.input_layernorm.weight", False)
    m[ours + ("pre_mlp_layer_norm", "scale")] = (f"{hf}.post_attention_layernorm.weight", False)
    for name, theirs in _ATTENTION:
      m[ours + ("self_attention", name, "kernel")] = (f"{hf}.self_attn.{theirs}.weight", True)
      biased = config.attention_out_bias if name == "out" else config.attention_bias
      if biased:
        m[ours + ("self_attention", name, "bias")] = (f"{hf}.self_attn.{theirs}.bias", False)
    for name, theirs in _MLP:
      m[ours + ("mlp", name, "kernel")] = (f"{hf}.mlp.{theirs}.weight", True)
  return m


def hf_module_map(config: DecoderConfig) -> dict[str, tuple[str, str]]:
  """HF module name -> (our block path, projection name), e.g. `model.layers.0.self_attn.k_proj`
  -> (`decoder/layers_0/self_attention`, `key`)."""
  out = {}
  for path, (hf, _) in hf_name_map(config).items():
    if path[-1] == "kernel" and path[-2] != "logits_dense":
      out[hf[:-len(".weight")]] = ("/".join(path[:-2]), path[-2])
  return out


# --------------------------------------------------------------------------- reading


def _host_copy(tensor: Any, dtype: Any) -> np.ndarray:
  if isinstance(tensor, hf_checkpoints.HostTensor):
    return tensor.astype(dtype)
  return np.array(tensor, dtype=dtype, order="C")


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_hf_decoder(path: PathLike, *, dtype: Any = jnp.float32,
                    activation_dtype: Any = "float32",
                    convert: Optional[Callable[[str, Any], Any]] = None
                    ) -> tuple[DecoderConfig, Params]:
  """Reads an HF Llama / Mistral / Qwen2 directory into (config, params).

  Tensors are read one at a time; each becomes a host array in `dtype`, or what
  `convert(path, float32 tensor in our layout)` returns (as `load_hf_checkpoint`).
  A tied model's file may also hold `lm_head.weight`; it is skipped.
  """
  convert = convert or (lambda _, value: _host_copy(value, dtype))
  path = pathlib.Path(path)
  config = load_hf_config(path, dtype=activation_dtype)
  by_hf = {hf: (ours, t) for ours, (hf, t) in hf_name_map(config).items()}
  expected = hf_checkpoints.expected_shapes(config)
  params: dict = {}
  seen, unexpected = set(), []
  for name, array in hf_checkpoints.iter_hf_tensors(path):
    if _IGNORED.fullmatch(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
      continue
    if name not in by_hf:
      unexpected.append(name)
      continue
    ours, transposed = by_hf[name]
    value = array.T if transposed else array
    if not isinstance(value, hf_checkpoints.HostTensor):
      value = np.asarray(value, np.float32)
    if tuple(value.shape) != expected[ours]:
      want = expected[ours][::-1] if transposed else expected[ours]
      raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(array.shape)}; "
                            f"expected {want} for {'/'.join(ours)}")
    _put(params, ours, convert("/".join(ours), value))
    seen.add(name)
    del value, array  # one tensor at a time
  if unexpected:
    raise CheckpointError(f"{path}: unexpected tensors (not part of a {model_type_of(config)} "
                          f"model): {', '.join(sorted(unexpected)[:10])}")
  missing = sorted(set(by_hf) - seen)
  if missing:
    raise CheckpointError(f"{path}: missing tensors: {', '.join(missing[:10])}"
                          + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
  return config, params


def load_initial_params(path: Optional[str | os.PathLike],
                        convert: Optional[Callable[[str, Any], Any]] = None
                        ) -> tuple[Optional[Params], Optional[DecoderConfig]]:
  """A decoder-only run's initial params: an HF directory (config.json; with its config) or
  orbax params (as `hf_checkpoints.load_initial_params` for T5)."""
  if path and (pathlib.Path(path) / "config.json").exists():
    config, params = load_hf_decoder(path, convert=convert)
    return params, config
  return hf_checkpoints.load_initial_params(path, convert=convert)


# --------------------------------------------------------------------------- writing


def export_hf_decoder(params: Params, config: DecoderConfig, path: PathLike, *,
                      model_type: Optional[str] = None,
                      max_shard_bytes: int = 4 << 30) -> pathlib.Path:
  """Writes base params as an HF directory (float32 safetensors, sharded with an index
  above `max_shard_bytes`) that `AutoModelForCausalLM.from_pretrained` loads."""
  hf_config = config_to_hf(config, model_type)  # checks the model type first
  hf_checkpoints.check_params_match(params, config)
  return hf_checkpoints.write_hf_directory(params, hf_name_map(config), path, hf_config,
                                           max_shard_bytes=max_shard_bytes)
