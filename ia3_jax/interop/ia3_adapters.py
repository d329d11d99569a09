"""(IA)^3 adapters: HF peft IA3 directories and T-Few state dicts <-> (IA)^3 banks.

peft's IA3 stores one vector `ia3_l` per module: shape `(out, 1)` scales the
module's output, `(1, in)` (a "feedforward module") its input. T-Few's
`multi_lora_b` (`[out, 1]`) scales the output, `multi_lora_a` (`[1, in]`) the
input. Both map onto our sites (`ia3.SITES`):

  k / v / q output        -> "k" / "v" / "q"
  o input / output        -> "o" / "attn_out"
  wo input / output       -> "ff" / "mlp_out"
  wi_1 output (gated MLP) -> "ff"  (the linear branch: scaling it scales the product)

Anything else (a wi/wi_0 output behind a nonlinearity, a q/k/v input, ...)
cannot be represented and raises `AdapterError` naming the module.
`load_adapter_bank` puts named adapters into the rows of a `peft.banks.AdapterBank`;
`merge_checkpoint` folds an adapter into a base model on disk. All of it serves both model
families (`model.families`): T5 and Llama / Mistral / Qwen2 (module names from `hf_families`).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax.errors import AdapterError
from ia3_jax.interop import hf_checkpoints, hf_families
from ia3_jax.interop.adapter_files import (ADAPTER_CONFIG, PEFT_PREFIX, load_state_dict,
                                           read_adapter_dir, strip_prefix,
                                           write_adapter_dir)
from ia3_jax.model import families, network
from ia3_jax.model import params as params_lib
from ia3_jax.model.config import T5Config
from ia3_jax.peft import banks, ia3

PathLike = str | os.PathLike
Params = dict[str, Any]

# Prefixes T-Few checkpoints may carry (plain `model.state_dict()` keys have none).
TFEW_PREFIXES = ("module.model.", "model.", PEFT_PREFIX)


# --------------------------------------------------------------------------- (IA)^3 sites


def hf_module_map(config: Any) -> dict[str, tuple[str, str]]:
  """HF module name -> (block path, projection) of `config`'s family."""
  return hf_families.of(config).module_map(config)


def _model_name(config: Any) -> str:
  if families.of(config) is families.DECODER_ONLY:
    return f"decoder-only model ({config.num_layers} layers)"
  return f"T5 model ({config.num_encoder_layers}+{config.num_decoder_layers} layers)"


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
  flat = {k: np.array(v) for k, v in params_lib.flatten(ia3.init_ia3(config, sites, 1)).items()}
  for (block, site), vecs in found.items():
    path = f"{block}/{ia3.PARAM_NAMES[site]}"
    for vec in vecs:
      if vec.shape != flat[path].shape[1:]:
        raise AdapterError(f"{source}: vector for {path} has {vec.size} entries, "
                           f"model expects {flat[path].shape[1]}")
      flat[path][0] *= vec.astype(np.float32)
  return params_lib.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def _module_site(config: T5Config, modules: Mapping[str, tuple[str, str]], module: str,
                 side: str, source: str) -> tuple[str, str]:
  if module not in modules:
    raise AdapterError(f"{source}: module {module!r} is not a projection of this "
                       f"{_model_name(config)}")
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
    raise AdapterError(f"{source}/{ADAPTER_CONFIG}: fan_in_fan_out=true is not a "
                       f"{families.of(config).name} layout")
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
  a full param tree, in either layer layout (scanned or not); only its (IA)^3 part is written.
  """
  if convention not in ("t5", "mt5", "tfew"):
    raise AdapterError(f"convention must be 't5', 'mt5' or 'tfew', got {convention!r}")
  bank, _ = ia3.extract_ia3(network.unscan_params(ia3_params))
  if not params_lib.flatten(bank):
    raise AdapterError("export_peft_adapter: no (IA)^3 params (ia3_*) given")
  vectors = params_lib.flatten(ia3.select_task(bank, task))
  by_target = {target: module for module, target in hf_module_map(config).items()}
  placed = []
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
    placed.append((path, module, side, vec))
  return write_peft_ia3(placed, out_dir, task_type=hf_families.of(config).task_type,
                        base_model_name_or_path=base_model_name_or_path,
                        safe_serialization=safe_serialization)


def write_peft_ia3(placed: Sequence[tuple[str, str, str, Any]], out_dir: PathLike, *,
                   task_type: str, base_model_name_or_path: Optional[str] = None,
                   safe_serialization: bool = True) -> pathlib.Path:
  """Writes a peft IA3 adapter directory from (param path, HF module, side, vector) rows: one
  `ia3_l` per module (an "in" side makes it a feedforward module), either model family."""
  tensors: dict[str, np.ndarray] = {}
  owner: dict[str, str] = {}
  targets, feedforward = set(), set()
  for path, module, side, vec in placed:
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
      "peft_type": "IA3", "task_type": task_type,
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

# Files read as state dicts (T-Few checkpoints) when listing a directory of adapters.
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
ORBAX_METADATA = "_METADATA"  # marks an orbax param checkpoint (`hf_checkpoints.save_params`)


def import_adapter(source: PathLike | Mapping[str, Any], config: T5Config, *,
                   sites: Optional[Sequence[str]] = None) -> Params:
  """One adapter as a one-task (IA)^3 tree: a peft adapter directory, a T-Few state dict
  file, an orbax param checkpoint (e.g. a training step's `trainable/`) or a param tree."""
  if not isinstance(source, (str, os.PathLike)):
    return _from_tree(source, config, sites, "param tree")
  path = pathlib.Path(source)
  if not path.is_dir():
    return import_tfew_state_dict(path, config, sites=sites)
  if (path / ADAPTER_CONFIG).exists():
    return import_peft_adapter(path, config, sites=sites)
  if (path / ORBAX_METADATA).exists():
    return _from_tree(hf_checkpoints.restore_params(path), config, sites, str(path))
  raise AdapterError(f"{path}: neither a peft adapter directory (no {ADAPTER_CONFIG}) nor orbax "
                     f"params (no {ORBAX_METADATA}); for a training checkpoint give its "
                     "<step>/trainable directory (runs.adapter_source finds it)")


def _from_tree(tree: Mapping[str, Any], config: T5Config, sites: Optional[Sequence[str]],
               source: str) -> Params:
  """The one-task (IA)^3 vectors of a param tree (either layer layout), checked for `config`."""
  vectors, _ = ia3.extract_ia3(network.unscan_params(dict(tree)))
  if not params_lib.flatten(vectors):
    raise AdapterError(f"{source}: holds no (IA)^3 vectors (params named ia3_*)")
  n = ia3.num_tasks_of(vectors)
  if n != 1:
    raise AdapterError(f"{source}: holds a bank of {n} tasks; give one adapter per task "
                       "(ia3.select_task picks one row)")
  expected = params_lib.flatten(ia3.init_ia3(config, ia3.sites_of(vectors), 1))
  for path, value in sorted(params_lib.flatten(vectors).items()):
    if path not in expected:
      raise AdapterError(f"{source}: {path} is not an (IA)^3 param of this "
                         f"{_model_name(config)}")
    if tuple(np.shape(value)) != tuple(expected[path].shape):
      raise AdapterError(f"{source}: {path} has shape {tuple(np.shape(value))}, the model expects "
                         f"{tuple(expected[path].shape)} (an adapter for another model shape?)")
  return with_sites(vectors, config, sites or ia3.sites_of(vectors), source)


def with_sites(vectors: Mapping[str, Any], config: T5Config, sites: Sequence[str],
               source: str = "adapter") -> Params:
  """A one-task tree at exactly `sites`: `vectors` where given, ones elsewhere."""
  sites = ia3.check_sites(sites)
  extra = sorted(set(ia3.sites_of(vectors)) - set(sites))
  if extra:
    raise AdapterError(f"{source}: has vectors at sites {extra}, not among the requested "
                       f"sites {list(sites)}")
  flat = params_lib.flatten(ia3.init_ia3(config, sites, 1))
  flat.update({p: jnp.asarray(v, jnp.float32) for p, v in params_lib.flatten(vectors).items()})
  return params_lib.unflatten(flat)


def adapter_sources(directory: PathLike) -> dict[str, str]:
  """{name: path} of a directory of adapters: every subdirectory (peft adapter, orbax
  params, training checkpoint) and state dict file (T-Few), named by its stem."""
  root = pathlib.Path(directory)
  if not root.is_dir():
    raise AdapterError(f"{root}: not a directory of adapters")
  found: dict[str, str] = {}
  for entry in sorted(root.iterdir()):
    if entry.name.startswith(".") or not (entry.is_dir() or entry.suffix in STATE_DICT_SUFFIXES):
      continue
    name = entry.name if entry.is_dir() else entry.stem
    if name in found:
      raise AdapterError(f"{root}: two adapters named {name!r} ({pathlib.Path(found[name]).name} "
                         f"and {entry.name}); rename one")
    found[name] = str(entry)
  if not found:
    raise AdapterError(f"{root}: no adapters (subdirectories or {', '.join(STATE_DICT_SUFFIXES)} "
                       "files)")
  return found


def load_adapter_bank(adapters: Mapping[str, PathLike | Mapping[str, Any]] | PathLike,
                      config: T5Config, *, capacity: Optional[int] = None,
                      sites: Optional[Sequence[str]] = None) -> banks.AdapterBank:
  """An `AdapterBank` of named adapters, rows in the order given, for mixed-task batches.

  `adapters`: {name: source} (any source `import_adapter` reads) or a directory of
  adapters (`adapter_sources`). `capacity` (default: the number of adapters) reserves
  rows for adapters added later without a new compilation. Sites default to the union
  of the adapters' sites; an adapter without a site gets ones there.
  """
  named = (adapter_sources(adapters) if isinstance(adapters, (str, os.PathLike))
           else dict(adapters))
  if not named:
    raise AdapterError("load_adapter_bank: no adapters given")
  if capacity is not None and capacity < len(named):
    raise AdapterError(f"{len(named)} adapters ({', '.join(named)}) do not fit a bank of "
                       f"capacity {capacity}")
  trees = {name: _named(name, lambda s=source: import_adapter(s, config))
           for name, source in named.items()}
  union = sites or [s for s in ia3.SITES if any(s in ia3.sites_of(t) for t in trees.values())]
  bank = banks.AdapterBank(ia3.init_ia3(config, union, 1), capacity or len(named))
  for name, tree in trees.items():
    _put(bank, name, tree, named[name], config)
  return bank


def add_adapter(bank: banks.AdapterBank, name: str, source: PathLike | Mapping[str, Any],
                config: T5Config, *, replace: bool = False) -> int:
  """Reads adapter `source` into a free row of `bank` (or its own row, `replace`) as
  `name`, at the bank's sites; returns the row. Only values change (no recompilation)."""
  return _put(bank, name, _named(name, lambda: import_adapter(source, config)), source, config,
              replace=replace)


def _put(bank: banks.AdapterBank, name: str, tree: Params, source: Any, config: T5Config, *,
         replace: bool = False) -> int:
  path = str(source) if isinstance(source, (str, os.PathLike)) else None
  sites = ia3.sites_of(bank.params())
  vectors = _named(name, lambda: with_sites(tree, config, sites, path or "param tree"))
  meta = {"source": path, "sites": ia3.sites_of(tree)}
  return bank.replace(name, vectors, meta) if replace else bank.add(name, vectors, meta)


def _named(name: str, fn: Callable[[], Any]) -> Any:
  """`fn()`, with an AdapterError's message prefixed by the adapter's name."""
  try:
    return fn()
  except AdapterError as e:
    raise AdapterError(f"adapter {name!r}: {e}") from e


def load_adapters_into_bank(sources: Sequence[PathLike], config: T5Config, *,
                            sites: Optional[Sequence[str]] = None) -> Params:
  """A bank tree with one task per adapter (task i = sources[i]), for mixed-task batches:
  `load_adapter_bank`'s values, rows named by position."""
  if not sources:
    raise AdapterError("load_adapters_into_bank: no adapters given")
  bank = load_adapter_bank({f"task_{i}": s for i, s in enumerate(sources)}, config, sites=sites)
  return jax.tree.map(jnp.asarray, bank.params())


# --------------------------------------------------------------------------- merging


def merge_checkpoint(base: Any, adapter: Any, out_dir: str | os.PathLike, *, task: int = 0,
                     config: Optional[Any] = None, output_format: str = "hf",
                     model_type: Optional[str] = None) -> str:
  """Writes base params with task `task`'s (IA)^3 vectors folded in.

  `base`: an HF model directory (T5, or Llama / Mistral / Qwen2), or a param tree (then
  pass `config`). `adapter`: a peft IA3 adapter directory, a T-Few state dict file
  (`*.pt`/`*.bin`/`*.safetensors`), an orbax checkpoint of the (IA)^3 params (or of a tree
  holding them), or a param tree. `output_format`: "hf" (an HF directory that
  `from_pretrained` loads; `model_type` default: t5, or the decoder's own) or "orbax".
  Returns the output path.
  """
  if isinstance(base, (str, os.PathLike)):
    config, base = hf_families.of_dir(base).load(base)
  elif config is None:
    raise ValueError("merge_checkpoint: pass `config` when `base` is a param tree")
  if isinstance(adapter, (str, os.PathLike)):
    if os.path.isdir(adapter) and os.path.exists(os.path.join(adapter, ADAPTER_CONFIG)):
      adapter = import_peft_adapter(adapter, config)
    elif os.path.isfile(adapter):
      adapter = import_tfew_state_dict(adapter, config)
    else:
      adapter = hf_checkpoints.restore_params(adapter)
  vectors, _ = ia3.extract_ia3(network.unscan_params(adapter))  # either layer layout
  hf = hf_families.of(config)
  merged, _ = ia3.merge(ia3.insert_ia3(base, vectors), task)  # biases too (Qwen2)
  if output_format == "hf":
    return str(hf.export(merged, config, out_dir,
                         model_type=hf_families.model_type_for(config, model_type)))
  if output_format == "orbax":
    return str(hf_checkpoints.save_params(out_dir, merged))
  raise ValueError(f"merge_checkpoint: output_format must be 'hf' or 'orbax', "
                   f"got {output_format!r}")
