"""HF peft LoRA adapter directories <-> our LoRA params, for T5 and decoder-only models.

peft stores, per adapted `nn.Linear` (weight `[out, in]`),
`base_model.model.<HF module>.lora_A.weight [r, in]` and `.lora_B.weight
[out, r]`, and computes `W x + scaling * B A x`. Ours (T5X layout, `y = x @ K`,
`K [in, out]`) is `x @ A' @ B'` with `A' = lora_A.T [in, r]`,
`B' = lora_B.T [r, out]`, stored as `<block>/<proj>_lora_a` / `_lora_b`.
Scaling (`alpha / r`, or `alpha / sqrt(r)` with `use_rslora`) comes from
`adapter_config.json`. Directory reading/writing reuses `ia3_jax.interop.adapter_files`;
the HF module names and peft `task_type` come from the model family (`hf_families`):
T5 `encoder.block.0.layer.0.SelfAttention.q`, Llama / Mistral / Qwen2
`model.layers.0.self_attn.q_proj` (gate_proj, up_proj, down_proj: wi_0, wi_1, wo).

Not representable (raise `AdapterError`): per-module `rank_pattern` /
`alpha_pattern`, DoRA, LoRA biases, `modules_to_save`, adapters on the LM head
or embeddings, and adapters that skip some layers of a targeted projection
(our module puts LoRA on a projection name in every layer).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from ia3_jax.errors import AdapterError
from ia3_jax.interop import adapter_files, hf_families
from ia3_jax.model import params as params_lib
from ia3_jax.model import families
from ia3_jax.peft import lora

PathLike = str | os.PathLike
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """The hyper-parameters of an imported adapter; `blocks_kwargs()` feeds `lora.lora_blocks`."""

  rank: int
  alpha: float
  targets: tuple[str, ...]
  use_rslora: bool = False
  dropout: float = 0.0

  def blocks_kwargs(self) -> dict:
    return dict(rank=self.rank, alpha=self.alpha, targets=self.targets,
                use_rslora=self.use_rslora, dropout=self.dropout)

  @property
  def scaling(self) -> float:
    return lora.scaling(self.rank, self.alpha, self.use_rslora)


_UNSUPPORTED = {  # adapter_config field -> value that we can represent
    "use_dora": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
    "fan_in_fan_out": False, "layer_replication": None, "trainable_token_indices": None,
    "target_parameters": None,
}


def _check_config(cfg: dict, source: str) -> None:
  for field, ok in _UNSUPPORTED.items():
    value = cfg.get(field, ok)
    if value not in (ok, None) and not (ok is None and not value):
      raise AdapterError(f"{source}: {field}={value!r} is not supported by ia3-jax LoRA "
                         f"(supported: {ok!r})")
  for field in ("rank_pattern", "alpha_pattern"):
    if cfg.get(field):
      raise AdapterError(f"{source}: per-module {field} {cfg[field]!r} is not supported "
                         "(ia3-jax LoRA uses one rank and alpha for every module)")
  for field in ("r", "lora_alpha"):
    if not isinstance(cfg.get(field), (int, float)) or cfg[field] <= 0:
      raise AdapterError(f"{source}: {field} must be a positive number, got {cfg.get(field)!r}")


def lora_model(config: Any, settings: LoraSettings) -> Any:
  """The network of `config`'s family (T5 or decoder-only) with LoRA as `settings` say."""
  return families.of(config).build(config, lora.lora_blocks(config, **settings.blocks_kwargs()))


def import_peft_lora(path: PathLike, config: Any) -> tuple[Params, LoraSettings]:
  """(LoRA params as a sparse tree, settings) from a peft LoRA adapter directory of a T5
  (`T5Config`) or Llama / Mistral / Qwen2 (`DecoderConfig`) model.

  Combine with base params (`params.combine(base, lora_tree)`) and run with
  `lora_model(config, settings)`.
  """
  cfg, tensors = adapter_files.read_adapter_dir(path, peft_type="LORA")
  source = str(path)
  _check_config(cfg, f"{source}/{adapter_files.ADAPTER_CONFIG}")
  rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
  modules = hf_families.of(config).module_map(config)
  flat: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    name = adapter_files.strip_prefix(key, (adapter_files.PEFT_PREFIX,))
    for hf_suffix, ours, want in ((".lora_A.weight", lora.SUFFIX_A, (rank, None)),
                                  (".lora_B.weight", lora.SUFFIX_B, (None, rank))):
      if name.endswith(hf_suffix):
        module = name[:-len(hf_suffix)]
        break
    else:
      raise AdapterError(f"{source}: tensor {key!r} is not a LoRA A/B weight of a projection")
    if module not in modules:
      raise AdapterError(f"{source}: module {module!r} is not a projection of this "
                         f"{families.of(config).name} model; LoRA on embeddings or the LM "
                         "head is not supported")
    if value.ndim != 2 or any(w is not None and s != w for s, w in zip(value.shape, want)):
      raise AdapterError(f"{source}: {key} has shape {value.shape}; expected rank {rank} "
                         f"({'[r, in]' if ours == lora.SUFFIX_A else '[out, r]'})")
    block, proj = modules[module]
    flat[f"{block}/{proj}{ours}"] = np.asarray(value, np.float32).T
  if not flat:
    raise AdapterError(f"{source}: adapter holds no lora_A / lora_B tensors")
  targets = lora.lora_targets_in(params_lib.unflatten(flat))
  _check_complete(flat, config, targets, source)
  settings = LoraSettings(rank=rank, alpha=alpha, targets=targets,
                          use_rslora=bool(cfg.get("use_rslora", False)),
                          dropout=float(cfg.get("lora_dropout", 0.0) or 0.0))
  return params_lib.unflatten({k: jnp.asarray(v) for k, v in flat.items()}), settings


def _check_complete(flat: dict, config: Any, targets: tuple[str, ...], source: str) -> None:
  """Every targeted projection in every layer needs both A and B, with matching shapes."""
  want = {f"{block}/{proj}{suffix}"
          for block, proj in hf_families.of(config).module_map(config).values()
          if proj in targets
          for suffix in (lora.SUFFIX_A, lora.SUFFIX_B)}
  missing = sorted(want - set(flat))
  if missing:
    raise AdapterError(f"{source}: LoRA targets {list(targets)} but {len(missing)} sites lack "
                       f"weights (e.g. {', '.join(missing[:3])}); adapters that skip layers "
                       "(layers_to_transform) are not supported")


def export_peft_lora(lora_params: Params, config: Any, out_dir: PathLike, *, alpha: float,
                     use_rslora: bool = False, dropout: float = 0.0,
                     base_model_name_or_path: Optional[str] = None,
                     safe_serialization: bool = True) -> pathlib.Path:
  """Writes the LoRA params (a full or sparse tree) as a peft LoRA adapter directory.

  `PeftModel.from_pretrained(hf_model, out_dir)` then computes what our LoRA
  model computes. `alpha` (and `use_rslora`) must be the values used in
  training: the tree does not record them.
  """
  flat = {k: v for k, v in params_lib.flatten(lora_params).items()
          if k.endswith(lora.SUFFIX_A) or k.endswith(lora.SUFFIX_B)}
  if not flat:
    raise AdapterError("export_peft_lora: no LoRA params (*_lora_a / *_lora_b) given")
  hf = hf_families.of(config)
  by_target = {target: module for module, target in hf.module_map(config).items()}
  ranks = {int(np.shape(v)[1]) for k, v in flat.items() if k.endswith(lora.SUFFIX_A)}
  if len(ranks) != 1:
    raise AdapterError(f"export_peft_lora: LoRA params have several ranks {sorted(ranks)}")
  tensors, short_names = {}, set()
  for path, value in sorted(flat.items()):
    suffix = lora.SUFFIX_A if path.endswith(lora.SUFFIX_A) else lora.SUFFIX_B
    block, leaf = path.rsplit("/", 1)
    proj = leaf[:-len(suffix)]
    module = by_target.get((block, proj))
    if module is None:
      raise AdapterError(f"export_peft_lora: {path} is not a LoRA param of a projection of "
                         "this model")
    hf_suffix = ".lora_A.weight" if suffix == lora.SUFFIX_A else ".lora_B.weight"
    tensors[f"{adapter_files.PEFT_PREFIX}{module}{hf_suffix}"] = np.asarray(value, np.float32).T
    short_names.add(module.rsplit(".", 1)[-1])  # q (T5), q_proj (Llama), ...
  adapter_config = {
      "peft_type": "LORA", "task_type": hf.task_type, "r": ranks.pop(),
      "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
      "target_modules": sorted(short_names), "bias": "none", "fan_in_fan_out": False,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
      "alpha_pattern": {}, "use_dora": False, "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
  }
  return adapter_files.write_adapter_dir(out_dir, adapter_config, tensors,
                                   safe_serialization=safe_serialization)
