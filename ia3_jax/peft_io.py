"""HF peft adapter directories and T-Few state dicts <-> ia3-jax param trees.

Generic part (reused by other peft methods): reading and writing adapter
directories (`adapter_config.json` + `adapter_model.safetensors` or `.bin`,
tensors named `base_model.model.<HF module>.<param>`), and the map between HF
module names (`encoder.block.0.layer.0.SelfAttention.k`) and T5X projections
(`encoder/layers_0/attention`, `key`).

(IA)^3 part. peft's IA3 stores one vector `ia3_l` per module: shape `(out, 1)`
scales the module's output, `(1, in)` (a "feedforward module") its input.
T-Few's `multi_lora_b` (`[out, 1]`) scales the output, `multi_lora_a`
(`[1, in]`) the input. Both map onto our sites (`ia3.SITES`):

  k / v / q output        -> "k" / "v" / "q"
  o input / output        -> "o" / "attn_out"
  wo input / output       -> "ff" / "mlp_out"
  wi_1 output (gated MLP) -> "ff"  (the linear branch: scaling it scales the product)

Anything else (a wi/wi_0 output behind a nonlinearity, a q/k/v input, ...)
cannot be represented and raises `AdapterError` naming the module.
"""

from __future__ import annotations

from ia3_jax.errors import AdapterError  # re-exported: ia3_jax.errors is its home

import json
import os
import pathlib
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from ia3_jax import checkpoints, ia3
from ia3_jax import params as P
from ia3_jax.config import T5Config

PathLike = str | os.PathLike
Params = dict[str, Any]

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
BIN_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# Prefixes T-Few checkpoints may carry (plain `model.state_dict()` keys have none).
TFEW_PREFIXES = ("module.model.", "model.", PEFT_PREFIX)




# --------------------------------------------------------------------------- generic


def read_adapter_dir(path: PathLike, peft_type: Optional[str] = None
                     ) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config dict, {tensor name: array}) of a peft adapter directory."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise AdapterError(f"{path}: not a directory (expected a peft adapter directory with "
                       f"{ADAPTER_CONFIG} and {SAFETENSORS_WEIGHTS} or {BIN_WEIGHTS})")
  cfg_file = path / ADAPTER_CONFIG
  if not cfg_file.exists():
    raise AdapterError(f"{path}: no {ADAPTER_CONFIG}; not a peft adapter directory")
  try:
    adapter_config = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from e
  if peft_type is not None and adapter_config.get("peft_type") != peft_type:
    raise AdapterError(f"{cfg_file}: peft_type is {adapter_config.get('peft_type')!r}, "
                       f"expected {peft_type!r}")
  return adapter_config, load_state_dict(_weights_file(path))


def _weights_file(path: pathlib.Path) -> pathlib.Path:
  for name in (SAFETENSORS_WEIGHTS, BIN_WEIGHTS):
    if (path / name).exists():
      return path / name
  raise AdapterError(f"{path}: no adapter weights ({SAFETENSORS_WEIGHTS} or {BIN_WEIGHTS})")


def load_state_dict(file: PathLike) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file or a torch pickle (read with weights_only=True)."""
  file = pathlib.Path(file)
  if not file.is_file():
    raise AdapterError(f"{file}: no such file")
  reader = (checkpoints.iter_safetensors if file.suffix == ".safetensors"
            else checkpoints.iter_torch_bin)
  return {name: np.asarray(t) for name, t in reader(file)}


def write_adapter_dir(path: PathLike, adapter_config: Mapping[str, Any],
                      tensors: Mapping[str, np.ndarray], *, safe_serialization: bool = True
                      ) -> pathlib.Path:
  """Writes `adapter_config.json` and the weights (safetensors, or a torch `.bin`)."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
  if safe_serialization:
    from safetensors.numpy import save_file
    save_file(arrays, str(path / SAFETENSORS_WEIGHTS), metadata={"format": "pt"})
  else:
    import torch
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path / BIN_WEIGHTS)
  (path / ADAPTER_CONFIG).write_text(json.dumps(dict(adapter_config), indent=2, sort_keys=True))
  return path


def hf_module_map(config: T5Config) -> dict[str, tuple[str, str]]:
  """HF module name -> (T5X block path, projection name) for every projection.

  E.g. `decoder.block.1.layer.1.EncDecAttention.v` ->
  (`decoder/layers_1/encoder_decoder_attention`, `value`).
  """
  out = {}
  for path, (hf, _) in checkpoints.hf_name_map(config).items():
    if path[-1] == "kernel" and path[-2] != "logits_dense":
      out[hf[:-len(".weight")]] = ("/".join(path[:-2]), path[-2])
  return out


def strip_prefix(name: str, prefixes: Iterable[str]) -> str:
  for prefix in prefixes:
    if name.startswith(prefix):
      return name[len(prefix):]
  return name


# --------------------------------------------------------------------------- (IA)^3 sites


def _linear_branch(config: T5Config) -> Optional[str]:
  """Name of the gated MLP's linear `wi_i` (scaling its output scales wo's input)."""
  acts = config.mlp_activations
  if len(acts) < 2:
    return None
  linear = [i for i, a in enumerate(acts) if a == "linear"]
  return f"wi_{linear[0]}" if linear else None


def site_for(config: T5Config, projection: str, side: str) -> Optional[str]:
  """Our site for a vector scaling `side` ("in"/"out") of `projection`, or None."""
  site = ia3.SITE_BY_PROJECTION.get((projection, side))
  if site is None and side == "out" and projection == _linear_branch(config):
    site = "ff"
  return site


def _unrepresentable(source: str, module: str, projection: str, side: str) -> AdapterError:
  what = "output" if side == "out" else "input"
  return AdapterError(
      f"{source}: module {module!r} scales the {what} of {projection!r}, which ia3-jax cannot "
      "represent. Representable: outputs of q, k, v, o and wo, inputs of o and wo, and the "
      "output of the linear wi_1 branch of a gated MLP.")


def _assemble(found: Mapping[tuple[str, str], list[np.ndarray]], config: T5Config,
              sites: Optional[Sequence[str]], source: str) -> Params:
  """One-task (IA)^3 tree: ones everywhere, times the vectors found per (block, site)."""
  present = {site for _, site in found}
  if sites is None:
    sites = [s for s in ia3.SITES if s in present]
  sites = ia3.check_sites(sites)
  missing = sorted(present - set(sites))
  if missing:
    raise AdapterError(f"{source}: has vectors at sites {missing}, not among the requested "
                       f"sites {list(sites)}")
  flat = {k: np.array(v) for k, v in P.flatten(ia3.init_ia3(config, sites, 1)).items()}
  for (block, site), vecs in found.items():
    path = f"{block}/{ia3.PARAM_NAMES[site]}"
    for vec in vecs:
      if vec.shape != flat[path].shape[1:]:
        raise AdapterError(f"{source}: vector for {path} has {vec.size} entries, "
                           f"model expects {flat[path].shape[1]}")
      flat[path][0] *= vec.astype(np.float32)
  return P.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def _module_site(config: T5Config, modules: Mapping[str, tuple[str, str]], module: str,
                 side: str, source: str) -> tuple[str, str]:
  if module not in modules:
    raise AdapterError(f"{source}: module {module!r} is not a projection of this T5 model "
                       f"({config.num_encoder_layers}+{config.num_decoder_layers} layers)")
  block, projection = modules[module]
  site = site_for(config, projection, side)
  if site is None:
    raise _unrepresentable(source, module, projection, side)
  return block, site


# --------------------------------------------------------------------------- peft import


def _is_feedforward(adapter_config: Mapping[str, Any], module: str) -> bool:
  ff = adapter_config.get("feedforward_modules") or []
  if isinstance(ff, str):
    return re.fullmatch(ff, module) is not None
  return any(module == f or module.endswith("." + f) for f in ff)


def import_peft_adapter(path: PathLike, config: T5Config, *,
                        sites: Optional[Sequence[str]] = None) -> Params:
  """(IA)^3 params (one-task banks `[1, n]`) from a peft IA3 adapter directory.

  `sites` defaults to the sites the adapter uses; a larger set gets ones
  where the adapter has no vector (as do layers the adapter leaves out).
  """
  adapter_config, tensors = read_adapter_dir(path, peft_type="IA3")
  source = str(path)
  if adapter_config.get("fan_in_fan_out"):
    raise AdapterError(f"{source}/{ADAPTER_CONFIG}: fan_in_fan_out=true is not a T5 layout")
  modules = hf_module_map(config)
  found: dict[tuple[str, str], list[np.ndarray]] = {}
  others = [k for k in tensors if not k.endswith(".ia3_l")]
  if others:
    raise AdapterError(f"{source}: tensors that are not (IA)^3 vectors (e.g. modules_to_save): "
                       f"{', '.join(sorted(others)[:5])}")
  for key, value in tensors.items():
    module = strip_prefix(key[:-len(".ia3_l")], (PEFT_PREFIX,))
    if value.ndim != 2 or 1 not in value.shape:
      raise AdapterError(f"{source}: {key} has shape {value.shape}; expected (n, 1) or (1, n)")
    if value.shape == (1, 1):
      side = "in" if _is_feedforward(adapter_config, module) else "out"
    else:
      side = "in" if value.shape[0] == 1 else "out"
    found.setdefault(_module_site(config, modules, module, side, source), []).append(
        value.reshape(-1))
  if not found:
    raise AdapterError(f"{source}: adapter holds no ia3_l tensors")
  return _assemble(found, config, sites, source)


# --------------------------------------------------------------------------- peft export


def export_peft_adapter(ia3_params: Mapping[str, Any], config: T5Config, out_dir: PathLike, *,
                        task: int = 0, convention: str = "t5",
                        base_model_name_or_path: Optional[str] = None,
                        safe_serialization: bool = True) -> pathlib.Path:
  """Writes task `task`'s vectors as a peft IA3 adapter (`PeftModel.from_pretrained` loads it).

  `convention`: "t5" puts l_ff on `wo` as a feedforward module (peft's T5
  default); "mt5" (= "tfew") puts it on the output of the linear `wi_1` branch
  (peft's mT5 default, T-Few), which needs a gated MLP. `ia3_params` may be
  a full param tree; only its (IA)^3 part is written.
  """
  if convention not in ("t5", "mt5", "tfew"):
    raise AdapterError(f"convention must be 't5', 'mt5' or 'tfew', got {convention!r}")
  bank, _ = ia3.extract_ia3(ia3_params)
  if not P.flatten(bank):
    raise AdapterError("export_peft_adapter: no (IA)^3 params (ia3_*) given")
  vectors = P.flatten(ia3.select_task(bank, task))
  by_target = {target: module for module, target in hf_module_map(config).items()}
  tensors: dict[str, np.ndarray] = {}
  owner: dict[str, str] = {}
  targets, feedforward = set(), set()
  for path, vec in sorted(vectors.items()):
    block, leaf = path.rsplit("/", 1)
    site = ia3.SITE_OF_PARAM[leaf]
    projection, side = ia3.SITE_TARGETS[site]
    if site == "ff" and convention != "t5":
      projection, side = _linear_branch(config), "out"
      if projection is None:
        raise AdapterError(f"convention {convention!r} scales the linear wi_1 branch, but this "
                           f"model's MLP {config.mlp_activations} has none; use convention='t5'")
    module = by_target.get((block, projection))
    if module is None:
      raise AdapterError(f"{path}: no HF module for {block}/{projection}")
    if module in owner:
      raise AdapterError(f"sites {owner[module]!r} and {path!r} both map to peft module "
                         f"{module!r}; "
                         "peft holds one vector per module (export them separately or merge first)")
    owner[module] = path
    short = module.rsplit(".", 1)[-1]
    targets.add(short)
    if side == "in":
      feedforward.add(short)
    v = np.asarray(vec, np.float32).reshape(-1)
    tensors[f"{PEFT_PREFIX}{module}.ia3_l"] = v[None, :] if side == "in" else v[:, None]
  adapter_config = {
      "peft_type": "IA3", "task_type": "SEQ_2_SEQ_LM",
      "target_modules": sorted(targets), "feedforward_modules": sorted(feedforward),
      "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None,
      "exclude_modules": None, "revision": None, "auto_mapping": None,
  }
  return write_adapter_dir(out_dir, adapter_config, tensors, safe_serialization=safe_serialization)


# --------------------------------------------------------------------------- T-Few


def import_tfew_state_dict(path: PathLike, config: T5Config, *,
                           sites: Optional[Sequence[str]] = None) -> Params:
  """(IA)^3 params from a T-Few checkpoint (e.g. its pre-trained T0 vectors).

  Reads `multi_lora_b` ([out, 1], scales the output: k, v, wi_1 in T-Few's
  (IA)^3 config) and `multi_lora_a` ([1, in], scales the input; accepted where
  representable, or when all ones as T-Few leaves it). LoRA weights
  (`lora_a`/`lora_b`) or other params raise.
  """
  source = str(path)
  tensors = load_state_dict(path)
  modules = hf_module_map(config)
  found: dict[tuple[str, str], list[np.ndarray]] = {}
  others = []
  for key, value in tensors.items():
    name = strip_prefix(key, TFEW_PREFIXES)
    module, _, param = name.rpartition(".")
    if param not in ("multi_lora_a", "multi_lora_b"):
      others.append(key)
      continue
    side = "out" if param == "multi_lora_b" else "in"
    want = (1, None) if side == "in" else (None, 1)
    if value.ndim != 2 or value.shape[want.index(1)] != 1:
      raise AdapterError(f"{source}: {key} has shape {value.shape}; (IA)^3 needs scaling rank 1 "
                         f"({'[1, in]' if side == 'in' else '[out, 1]'})")
    if side == "in" and module in modules and site_for(config, modules[module][1], "in") is None:
      if np.all(value == 1):
        continue  # T-Few's untrained input scaling: identity
    found.setdefault(_module_site(config, modules, module, side, source), []).append(
        value.reshape(-1))
  if others:
    lora = [k for k in others if re.search(r"\.lora_[ab]$", k)]
    hint = " (LoRA weights, not (IA)^3)" if lora else ""
    raise AdapterError(f"{source}: unexpected tensors{hint}: {', '.join(sorted(others)[:5])}")
  if not found:
    raise AdapterError(f"{source}: no multi_lora_b / multi_lora_a tensors found")
  return _assemble(found, config, sites, source)


# --------------------------------------------------------------------------- banks


def import_adapter(source: PathLike, config: T5Config, *,
                   sites: Optional[Sequence[str]] = None) -> Params:
  """A peft adapter directory or a T-Few state dict file, as a one-task (IA)^3 tree."""
  if pathlib.Path(source).is_dir():
    return import_peft_adapter(source, config, sites=sites)
  return import_tfew_state_dict(source, config, sites=sites)


def load_adapters_into_bank(sources: Sequence[PathLike], config: T5Config, *,
                            sites: Optional[Sequence[str]] = None) -> Params:
  """A bank with one task per adapter (task i = sources[i]), for mixed-task batches.

  Sites default to the union of the adapters' sites; an adapter without a
  site gets ones there (it is unchanged by it).
  """
  if not sources:
    raise AdapterError("load_adapters_into_bank: no adapters given")
  single = [import_adapter(s, config, sites=sites) for s in sources]
  union = sites or [s for s in ia3.SITES if any(s in ia3.sites_of(t) for t in single)]
  single = [t if set(ia3.sites_of(t)) == set(union) else import_adapter(s, config, sites=union)
            for s, t in zip(sources, single)]
  return ia3.stack_tasks(single)
