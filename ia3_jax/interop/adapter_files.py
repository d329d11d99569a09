"""peft adapter directories on disk, for every method (IA)^3, LoRA, ...

A directory holds `adapter_config.json` and `adapter_model.safetensors` (or a
torch `adapter_model.bin`, read with `weights_only=True`), tensors named
`base_model.model.<HF module>.<param>`. `hf_module_map` maps HF module names
(`encoder.block.0.layer.0.SelfAttention.k`) to T5X projections
(`encoder/layers_0/attention`, `key`).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from ia3_jax import files
from ia3_jax.errors import AdapterError
from ia3_jax.interop import hf_checkpoints
from ia3_jax.model.config import T5Config

PathLike = str | os.PathLike

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
BIN_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


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
  return adapter_config, load_state_dict(weights_file(path))


def weights_file(path: pathlib.Path) -> pathlib.Path:
  for name in (SAFETENSORS_WEIGHTS, BIN_WEIGHTS):
    if (path / name).exists():
      return path / name
  raise AdapterError(f"{path}: no adapter weights ({SAFETENSORS_WEIGHTS} or {BIN_WEIGHTS})")


def load_state_dict(file: PathLike) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file or a torch pickle (read with weights_only=True)."""
  file = pathlib.Path(file)
  if not file.is_file():
    raise AdapterError(f"{file}: no such file")
  reader = (hf_checkpoints.iter_safetensors if file.suffix == ".safetensors"
            else hf_checkpoints.iter_torch_bin)
  return {name: np.asarray(t) for name, t in reader(file)}


def write_adapter_dir(path: PathLike, adapter_config: Mapping[str, Any],
                      tensors: Mapping[str, np.ndarray], *, safe_serialization: bool = True
                      ) -> pathlib.Path:
  """Writes `adapter_config.json` and the weights (safetensors, or a torch `.bin`)."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
  if safe_serialization:
    files.write_safetensors(path / SAFETENSORS_WEIGHTS, arrays, {"format": "pt"})
  else:
    import torch
    with files.atomic_open(path / BIN_WEIGHTS, "wb") as f:
      torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, f)
  files.write_text(path / ADAPTER_CONFIG,
                   json.dumps(dict(adapter_config), indent=2, sort_keys=True))
  return path


def hf_module_map(config: T5Config) -> dict[str, tuple[str, str]]:
  """HF module name -> (T5X block path, projection name) for every projection.

  E.g. `decoder.block.1.layer.1.EncDecAttention.v` ->
  (`decoder/layers_1/encoder_decoder_attention`, `value`).
  """
  out = {}
  for path, (hf, _) in hf_checkpoints.hf_name_map(config).items():
    if path[-1] == "kernel" and path[-2] != "logits_dense":
      out[hf[:-len(".weight")]] = ("/".join(path[:-2]), path[-2])
  return out


def strip_prefix(name: str, prefixes: Iterable[str]) -> str:
  for prefix in prefixes:
    if name.startswith(prefix):
      return name[len(prefix):]
  return name
