"""HF directories and peft adapters per model family (`model.families`), told apart in one place.

The peft importers and exporters (`lora_adapters`, `ia3_adapters`) and the `merge` /
`export-peft` commands ask `of(config)` (or `of_dir(hf_directory)`) for the family's HF
module names, peft `task_type`, and its HF directory reader and writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Optional

from ia3_jax.errors import CheckpointError
from ia3_jax.interop import adapter_files, hf_checkpoints, hf_decoder
from ia3_jax.model import families

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class HfFamily:
  """family: the `families.Family`; task_type: peft's; model_types: the HF `model_type`s it
  reads; module_map(config): HF module name -> (our block path, projection);
  load_config(path), load(path) -> (config, params), export(params, config, path,
  model_type=): its HF directories; default_model_type(config): what `export` writes;
  load_initial(path, convert=) -> (params, HF config or None): a run's base (HF directory or
  orbax params)."""

  family: families.Family
  task_type: str
  model_types: tuple[str, ...]
  module_map: Callable[[Any], dict[str, tuple[str, str]]]
  load_config: Callable[..., Any]
  load: Callable[..., tuple[Any, Any]]
  export: Callable[..., pathlib.Path]
  default_model_type: Callable[[Any], str]
  load_initial: Callable[..., tuple[Any, Any]]


T5 = HfFamily(families.T5, "SEQ_2_SEQ_LM", ("t5", "mt5"), adapter_files.hf_module_map,
              hf_checkpoints.load_hf_config, hf_checkpoints.load_hf_checkpoint,
              hf_checkpoints.export_hf_checkpoint, lambda _: "t5",
              hf_checkpoints.load_initial_params)
DECODER_ONLY = HfFamily(families.DECODER_ONLY, "CAUSAL_LM", tuple(hf_decoder.ARCHITECTURES),
                        hf_decoder.hf_module_map, hf_decoder.load_hf_config,
                        hf_decoder.load_hf_decoder, hf_decoder.export_hf_decoder,
                        hf_decoder.model_type_of, hf_decoder.load_initial_params)
HF_FAMILIES = (T5, DECODER_ONLY)


def of(config: Any) -> HfFamily:
  """The HF side of `config`'s (or a model's) family."""
  family = families.of(config)
  return next(f for f in HF_FAMILIES if f.family is family)


def of_dir(path: PathLike) -> HfFamily:
  """The family of the HF model directory `path`, from its config.json `model_type`."""
  cfg = pathlib.Path(path) / "config.json"
  if not cfg.is_file():
    raise CheckpointError(f"{path}: no config.json; expected an HF model directory")
  try:
    model_type = json.loads(cfg.read_text()).get("model_type")
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg}: not valid JSON ({e})") from e
  for f in HF_FAMILIES:
    if model_type in f.model_types:
      return f
  return T5  # its reader names the unsupported model_type


def model_type_for(config: Any, model_type: Optional[str]) -> str:
  """`model_type` (checked against `config`'s family), or the family's default for it."""
  hf = of(config)
  if model_type is None:
    return hf.default_model_type(config)
  if model_type not in hf.model_types:
    raise CheckpointError(f"--model_type {model_type}: not a {hf.family.name} model type "
                          f"(choose from {', '.join(hf.model_types)})")
  return model_type
