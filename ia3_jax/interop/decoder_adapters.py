"""peft IA3 adapters of Llama / Mistral / Qwen2 models <-> (IA)^3 banks of `decoder.DecoderOnly`.

peft's default (IA)^3 for these models targets `k_proj`, `v_proj` and `down_proj`
(a feedforward module: its `(1, in)` vector scales down_proj's input), which are our
sites "k", "v" and "ff" (`decoder/layers_i/self_attention/ia3_key`, ..., `mlp/ia3_ff`).
A vector on the output of `up_proj` (the linear branch of SwiGLU) is also "ff"; q_proj and
o_proj map to "q", "o" / "attn_out", down_proj's output to "mlp_out". Anything else
(gate_proj, a q/k/v input) cannot be represented and raises `AdapterError` naming it.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax.errors import AdapterError
from ia3_jax.interop import hf_decoder, ia3_adapters
from ia3_jax.interop.adapter_files import ADAPTER_CONFIG, PEFT_PREFIX, read_adapter_dir, strip_prefix
from ia3_jax.model import decoder
from ia3_jax.model import params as params_lib
from ia3_jax.model.decoder_config import DecoderConfig
from ia3_jax.peft import ia3

PathLike = str | os.PathLike
Params = dict[str, Any]


def ia3_model(config: DecoderConfig, sites: Sequence[str] = ia3.DEFAULT_SITES,
              num_tasks: int = 1) -> decoder.DecoderOnly:
  """The decoder with (IA)^3 on its attention and MLP blocks."""
  return decoder.DecoderOnly(config, ia3.ia3_blocks(sites, num_tasks,
                                                    base=decoder.DecoderBlocks()))


def init_ia3(config: DecoderConfig, sites: Sequence[str] = ia3.DEFAULT_SITES,
             num_tasks: int = 1) -> Params:
  """(IA)^3 params of the decoder at their initial value (ones), shapes from eval_shape."""
  abstract = decoder.abstract_params(ia3_model(config, sites, num_tasks),
                                     with_task_id=num_tasks > 1)
  vectors = nn.unbox(ia3.extract_ia3(abstract)[0])
  return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), vectors)


def _is_feedforward(adapter_config: Mapping[str, Any], module: str) -> bool:
  ff = adapter_config.get("feedforward_modules") or []
  if isinstance(ff, str):
    return re.fullmatch(ff, module) is not None
  return any(module == f or module.endswith("." + f) for f in ff)


def _side(adapter_config: Mapping[str, Any], module: str, value: np.ndarray, key: str,
          source: str) -> str:
  if value.ndim != 2 or 1 not in value.shape:
    raise AdapterError(f"{source}: {key} has shape {value.shape}; expected (n, 1) or (1, n)")
  if value.shape == (1, 1):
    return "in" if _is_feedforward(adapter_config, module) else "out"
  return "in" if value.shape[0] == 1 else "out"


def import_peft_ia3(path: PathLike, config: DecoderConfig, *,
                    sites: Optional[Sequence[str]] = None) -> Params:
  """One-task (IA)^3 params (`[1, n]` banks) from a peft IA3 adapter of an HF decoder.

  `sites` defaults to the sites the adapter uses; a larger set gets ones where the
  adapter has no vector.
  """
  adapter_config, tensors = read_adapter_dir(path, peft_type="IA3")
  source = str(path)
  if adapter_config.get("fan_in_fan_out"):
    raise AdapterError(f"{source}/{ADAPTER_CONFIG}: fan_in_fan_out=true is not a Llama layout")
  others = sorted(k for k in tensors if not k.endswith(".ia3_l"))
  if others:
    raise AdapterError(f"{source}: tensors that are not (IA)^3 vectors (e.g. modules_to_save): "
                       f"{', '.join(others[:5])}")
  modules = hf_decoder.hf_module_map(config)
  found: dict[str, np.ndarray] = {}
  for key, value in sorted(tensors.items()):
    module = strip_prefix(key[:-len(".ia3_l")], (PEFT_PREFIX,))
    if module not in modules:
      raise AdapterError(f"{source}: module {module!r} is not a projection of this model "
                         f"({config.num_layers} layers)")
    block, projection = modules[module]
    side = _side(adapter_config, module, value, key, source)
    site = ia3_adapters.site_for(config, projection, side)
    if site is None:
      raise AdapterError(f"{source}: module {module!r} scales the "
                         f"{'input' if side == 'in' else 'output'} of {projection!r}, which "
                         "(IA)^3 here cannot represent (k, v, q outputs, o and down_proj "
                         "inputs/outputs, the up_proj output)")
    path_ = f"{block}/{ia3.PARAM_NAMES[site]}"
    found[path_] = found.get(path_, 1.0) * np.asarray(value, np.float32).reshape(-1)
  if not found:
    raise AdapterError(f"{source}: adapter holds no ia3_l tensors")
  present = {ia3.SITE_OF_PARAM[p.rsplit("/", 1)[-1]] for p in found}
  sites = ia3.check_sites(sites if sites is not None
                          else [s for s in ia3.SITES if s in present])
  if present - set(sites):
    raise AdapterError(f"{source}: has vectors at sites {sorted(present - set(sites))}, not "
                       f"among the requested sites {list(sites)}")
  flat = params_lib.flatten(init_ia3(config, sites, 1))
  for p, vec in found.items():
    if vec.shape != tuple(flat[p].shape[1:]):
      raise AdapterError(f"{source}: vector for {p} has {vec.size} entries, model expects "
                         f"{flat[p].shape[1]}")
    flat[p] = jnp.asarray(vec[None])
  return params_lib.unflatten(flat)


def export_peft_ia3(ia3_params: Mapping[str, Any], config: DecoderConfig, out_dir: PathLike, *,
                    task: int = 0, base_model_name_or_path: Optional[str] = None
                    ) -> pathlib.Path:
  """Writes task `task`'s vectors as a peft IA3 adapter (`PeftModel.from_pretrained` loads it
  onto the HF model): "ff" on down_proj as a feedforward module, peft's Llama default.
  `ia3_params` may be the full param tree; only its (IA)^3 part is written."""
  bank, _ = ia3.extract_ia3(dict(ia3_params))
  if not params_lib.flatten(bank):
    raise AdapterError("export_peft_ia3: no (IA)^3 params (ia3_*) given")
  by_target = {target: module for module, target in hf_decoder.hf_module_map(config).items()}
  placed = []
  for path, vec in sorted(params_lib.flatten(ia3.select_task(bank, task)).items()):
    block, leaf = path.rsplit("/", 1)
    projection, side = ia3.SITE_TARGETS[ia3.SITE_OF_PARAM[leaf]]
    module = by_target.get((block, projection))
    if module is None:
      raise AdapterError(f"{path}: no HF module for {block}/{projection}")
    placed.append((path, module, side, vec))
  return ia3_adapters.write_peft_ia3(placed, out_dir, task_type="CAUSAL_LM",
                                     base_model_name_or_path=base_model_name_or_path)


def merge_ia3(params: Mapping[str, Any], task: int = 0) -> tuple[Params, Params]:
  """`ia3.merge` for the decoder: also scales the bias of a projection whose output a
  vector scales (Qwen2's k/v biases: `l * (x W + b)`). Returns (merged base params,
  originals); `ia3.unmerge` restores the params exactly (original biases included)."""
  merged, originals = ia3.merge(params, task)
  flat, kept = params_lib.flatten(merged), params_lib.flatten(originals["kernels"])
  for path, bank in params_lib.flatten(originals["ia3"]).items():
    block, leaf = path.rsplit("/", 1)
    projection, side = ia3.SITE_TARGETS[ia3.SITE_OF_PARAM[leaf]]
    bias = f"{block}/{projection}/bias"
    if side == "out" and bias in flat:
      kept.setdefault(bias, flat[bias])
      flat[bias] = jnp.asarray(flat[bias]) * jnp.asarray(bank)[task].astype(jnp.float32)
  return params_lib.unflatten(flat), {**originals, "kernels": params_lib.unflatten(kept)}
