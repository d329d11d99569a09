"""(IA)^3 (Liu et al. 2022) as module overrides, with per-example task vector banks.

A *site* is an activation that an (IA)^3 vector rescales elementwise:

  site        block      scales                               param name            width
  "k"         attention  output of `key`                      ia3_key               joined_kv
  "v"         attention  output of `value`                    ia3_value             joined_kv
  "ff"        mlp        input of `wo` (intermediate act.)    ia3_ff                mlp
  "q"         attention  output of `query`                    ia3_query             joined_kv
  "o"         attention  input of `out` (per-head outputs)    ia3_out_input         joined_kv
  "attn_out"  attention  output of `out` (block output)       ia3_attention_output  embed
  "mlp_out"   mlp        output of `wo` (block output)        ia3_mlp_output        embed

The paper's (IA)^3 is ("k", "v", "ff"), applied in encoder self-attention,
decoder self-attention and encoder-decoder attention. Each vector is a bank
`[num_tasks, width]` (logical axes ("tasks", width axis); "tasks" is not
sharded by the default rules), initialised to ones, living next to the
projections it scales, e.g. `encoder/layers_0/attention/ia3_key`,
`decoder/layers_3/encoder_decoder_attention/ia3_value`,
`decoder/layers_3/mlp/ia3_ff`. Example b uses row `task_id[b]`; without a
`task_id` a bank of one row is used as is (the paper's case).

Merging folds one task's vectors into the kernels they multiply (output sites
scale kernel columns, input sites kernel rows: `key[:, j] * l_k[j]`,
`wo[i, :] * l_ff[i]`), keeping the original kernels for an exact unmerge.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax.errors import ConfigError
from ia3_jax.model import families, layers, network, storage
from ia3_jax.model import params as params_lib
from ia3_jax.model.config import T5Config
from ia3_jax.peft import banks, registry

Array = jax.Array
Params = dict[str, Any]

DEFAULT_SITES = ("k", "v", "ff")
PARAM_NAMES = {"q": "ia3_query", "k": "ia3_key", "v": "ia3_value", "o": "ia3_out_input",
               "attn_out": "ia3_attention_output", "ff": "ia3_ff", "mlp_out": "ia3_mlp_output"}
SITES = tuple(PARAM_NAMES)
SITE_OF_PARAM = {v: k for k, v in PARAM_NAMES.items()}
# site -> (projection name, "in" | "out"): which side of which projection it scales.
SITE_TARGETS = {"q": ("query", "out"), "k": ("key", "out"), "v": ("value", "out"),
                "o": ("out", "in"), "attn_out": ("out", "out"),
                "ff": ("wo", "in"), "mlp_out": ("wo", "out")}
SITE_BY_PROJECTION = {(proj, side): site for site, (proj, side) in SITE_TARGETS.items()}
# Matches every (IA)^3 param path (`re.fullmatch`, see `params.trainable_mask`).
IA3_PATTERN = r"(.*/)?ia3_[a-z_]+"
TRAINABLE_PATTERNS = (IA3_PATTERN,)
TASKS_AXIS = banks.TASKS_AXIS


def check_sites(sites: Sequence[str]) -> tuple[str, ...]:
  sites = tuple(sites)
  unknown = [s for s in sites if s not in PARAM_NAMES]
  if unknown or not sites:
    raise ValueError(f"(IA)^3 sites {list(sites)}: unknown {unknown or 'empty'}; "
                     f"choose from {list(SITES)} (the paper uses {list(DEFAULT_SITES)})")
  if len(set(sites)) != len(sites):
    raise ValueError(f"(IA)^3 sites {list(sites)} contain duplicates")
  return sites


class IA3(layers.Projecting):
  """Mixin: (IA)^3 vectors on the `project` calls of an attention or MLP block (any network
  built from `network.Blocks`; `Blocks.override` puts it in front of the block's class)."""

  sites: tuple[str, ...] = DEFAULT_SITES
  num_tasks: int = 1

  def _scale(self, x: Array, site: str, axis: str, task_id: Optional[Array]) -> Array:
    bank = self.param(PARAM_NAMES[site], layers.logical(nn.initializers.ones, (TASKS_AXIS, axis)),
                      (self.num_tasks, x.shape[-1]), jnp.float32)
    rows = banks.task_rows(bank, task_id, x.shape[0], "(IA)^3")
    scale = rows.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))
    return (x.astype(jnp.float32) * scale).astype(x.dtype)

  def project(self, x: Array, name: str, features: int, kernel_axes: tuple[str, str],
              task_id: Optional[Array], kernel_init: Optional[layers.Initializer] = None) -> Array:
    in_site, out_site = SITE_BY_PROJECTION.get((name, "in")), SITE_BY_PROJECTION.get((name, "out"))
    if in_site in self.sites:
      x = self._scale(x, in_site, kernel_axes[0], task_id)
    y = super().project(x, name, features, kernel_axes, task_id, kernel_init)
    if out_site in self.sites:
      y = self._scale(y, out_site, kernel_axes[1], task_id)
    return y


IA3Attention = network.extend(IA3, layers.MultiHeadDotProductAttention)  # the T5 blocks
IA3Mlp = network.extend(IA3, layers.MlpBlock)


@registry.register
@dataclasses.dataclass(frozen=True)
class IA3Config(registry.PeftMethod):
  """(IA)^3: `sites` are the activations rescaled (the paper: k, v, ff; see the table
  above); with NUM_TASKS > 1 each vector is a bank of one row per task."""

  name = "ia3"
  trainable_patterns = TRAINABLE_PATTERNS
  supports_mixed_tasks = True
  description = "(IA)^3: learned rescaling of keys, values and FFN activations"

  sites: tuple[str, ...] = DEFAULT_SITES

  def validate(self) -> None:
    try:
      check_sites(self.sites)
    except ValueError as e:
      raise self.invalid("sites", str(e)) from None

  def blocks(self, config: Optional[Any], base: network.Blocks,
             num_tasks: int = 1) -> network.Blocks:
    del config
    self.check_num_tasks(num_tasks)
    kw = dict(sites=tuple(self.sites), num_tasks=int(num_tasks))
    return base.override("attention", IA3, **kw).override("mlp", IA3, **kw)


def ia3_blocks(config: Optional[Any] = None, *, num_tasks: int = 1,
               base: Optional[network.Blocks] = None, **hyperparameters: Any) -> network.Blocks:
  """`base` (default: the blocks of `config`'s family, else T5's) with
  (IA)^3 on its attention and MLP blocks."""
  return IA3Config(**hyperparameters).blocks(
      config, registry.base_blocks(config, base), num_tasks)


def ia3_model(config: Any, sites: Sequence[str] = DEFAULT_SITES, num_tasks: int = 1) -> Any:
  """The network of `config` (T5 or decoder-only: `families.of`) with (IA)^3 blocks."""
  family = families.of(config)
  return family.build(config, ia3_blocks(config, sites=tuple(sites), num_tasks=num_tasks))


# --------------------------------------------------------------------------- param trees


def abstract_ia3(config: Any, sites: Sequence[str] = DEFAULT_SITES,
                 num_tasks: int = 1) -> Params:
  """Boxed ShapeDtypeStructs of the (IA)^3 params alone (no memory allocated), either family."""
  model = ia3_model(config, sites, num_tasks)
  abstract = families.of(config).abstract_params(model, with_task_id=num_tasks > 1)
  return extract_ia3(abstract)[0]


def init_ia3(config: Any, sites: Sequence[str] = DEFAULT_SITES, num_tasks: int = 1) -> Params:
  """(IA)^3 params at their initial value (ones): the model equals the base model."""
  abstract = nn.unbox(abstract_ia3(config, sites, num_tasks))
  return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract)


def count_ia3(config: Any, sites: Sequence[str] = DEFAULT_SITES, num_tasks: int = 1) -> int:
  """Number of (IA)^3 scalars, computed with `jax.eval_shape` (works for 11B configs)."""
  return params_lib.count(abstract_ia3(config, sites, num_tasks))


def trainable_mask(params: Mapping[str, Any]) -> Params:
  """True at the (IA)^3 params: the paper trains these alone."""
  return params_lib.trainable_mask(params, IA3_PATTERN)


def extract_ia3(params: Mapping[str, Any]) -> tuple[Params, Params]:
  """(ia3 subtree, base params) -- both sparse trees in the original nesting."""
  return params_lib.partition(params, params_lib.trainable_mask(params, IA3_PATTERN, allow_unmatched=True))


def insert_ia3(params: Mapping[str, Any], ia3: Mapping[str, Any]) -> Params:
  """Base params (any (IA)^3 params in them are replaced) plus the `ia3` subtree."""
  _, base = extract_ia3(params)
  unknown = [p for p in params_lib.flatten(ia3) if p.rsplit("/", 1)[-1] not in SITE_OF_PARAM]
  if unknown:
    raise ValueError(f"insert_ia3: not (IA)^3 params: {', '.join(unknown[:5])}")
  return params_lib.combine(base, ia3)


def with_ia3(base_params: Mapping[str, Any], config: T5Config, sites: Sequence[str] = DEFAULT_SITES,
             num_tasks: int = 1) -> Params:
  """Base params (e.g. from `checkpoints.load_hf_checkpoint`) plus fresh (IA)^3 vectors."""
  return insert_ia3(base_params, init_ia3(config, sites, num_tasks))


def sites_of(ia3: Mapping[str, Any]) -> tuple[str, ...]:
  """The sites an (IA)^3 tree holds, in `SITES` order."""
  found = {SITE_OF_PARAM[p.rsplit("/", 1)[-1]] for p in params_lib.flatten(ia3)}
  return tuple(s for s in SITES if s in found)


def num_tasks_of(ia3: Mapping[str, Any]) -> int:
  sizes = {int(np.shape(v)[0]) for v in params_lib.flatten(ia3).values()}
  if len(sizes) != 1:
    raise ValueError(f"(IA)^3 tree has banks of different sizes {sorted(sizes)}" if sizes
                     else "(IA)^3 tree is empty")
  return sizes.pop()


def select_task(ia3: Mapping[str, Any], task: int) -> Params:
  """A one-task bank holding row `task` of every vector."""
  n = num_tasks_of(ia3)
  if not 0 <= task < n:
    raise ValueError(f"task {task} out of range: the bank holds {n} tasks")
  return jax.tree.map(lambda v: v[task:task + 1], params_lib.unflatten(params_lib.flatten(ia3)))


def stack_tasks(banks: Sequence[Mapping[str, Any]]) -> Params:
  """Concatenates banks with the same params along the task axis (task order kept)."""
  if not banks:
    raise ValueError("stack_tasks: no banks given")
  flats = [params_lib.flatten(b) for b in banks]
  for i, f in enumerate(flats[1:], 1):
    if set(f) != set(flats[0]):
      diff = sorted(set(f) ^ set(flats[0]))
      raise ValueError(f"stack_tasks: bank {i} has different params from bank 0: "
                       f"{', '.join(diff[:5])}")
  return params_lib.unflatten({p: jnp.concatenate([jnp.asarray(f[p]) for f in flats], axis=0)
                      for p in flats[0]})


# --------------------------------------------------------------------------- merging


def merge(params: Mapping[str, Any], task: int = 0) -> tuple[Params, Params]:
  """Folds task `task`'s vectors into the kernels: returns (merged base params, originals).

  The merged tree has the base network's names (run it with
  `network.Transformer(config)`, export it with `checkpoints.export_hf_checkpoint`).
  `originals = {"kernels": original kernels that changed, "ia3": the (IA)^3 subtree}`
  lets `unmerge` restore `params` bit for bit (no division by the vectors).

  A kernel stored quantised (`model.storage`: int8 / int4) is dequantised,
  scaled and quantised again with its own scheme; `originals["requantization_error"]`
  then gives, per kernel, the largest |merged - exact fold| that the re-quantisation adds.
  A projection with a bias (Qwen2's q/k/v) whose output a vector scales gets its bias
  scaled too: `l * (x W + b)`.
  """
  ia3, base = extract_ia3(network.unscan_params(params))  # either layer layout
  if not params_lib.flatten(ia3):
    raise ValueError("merge: params hold no (IA)^3 vectors (names ia3_*)")
  n = num_tasks_of(ia3)
  if not 0 <= task < n:
    raise ConfigError(f"task {task} out of range (--task): the adapter bank holds {n} task"
                      f"{'s' if n != 1 else ''} (rows 0..{n - 1})")
  flat = params_lib.flatten(base)
  originals: dict[str, Any] = {}
  errors: dict[str, float] = {}
  for path, bank in sorted(params_lib.flatten(ia3).items()):
    block, leaf = path.rsplit("/", 1)
    proj, side = SITE_TARGETS[SITE_OF_PARAM[leaf]]
    kpath = f"{block}/{proj}/kernel"
    if kpath not in flat:
      raise ValueError(f"merge: {path} scales {kpath}, which the params lack")
    originals.setdefault(kpath, flat[kpath])
    quantized = isinstance(flat[kpath], storage.QArray)
    kernel = storage.materialize(flat[kpath], jnp.float32) if quantized else jnp.asarray(
        flat[kpath])
    vec = jnp.asarray(bank)[task].astype(kernel.dtype)
    folded = kernel * (vec[None, :] if side == "out" else vec[:, None])
    if quantized:
      flat[kpath] = storage.requantize_like(folded, flat[kpath])
      errors[kpath] = float(jnp.max(jnp.abs(storage.materialize(flat[kpath], jnp.float32)
                                            - folded)))
    else:
      flat[kpath] = folded
    bpath = f"{block}/{proj}/bias"
    if side == "out" and bpath in flat:
      originals.setdefault(bpath, flat[bpath])
      flat[bpath] = jnp.asarray(flat[bpath]) * vec.astype(jnp.float32)
  out = {"kernels": params_lib.unflatten(originals), "ia3": ia3}
  if errors:
    out["requantization_error"] = errors
  return params_lib.unflatten(flat), out


def unmerge(merged: Mapping[str, Any], originals: Mapping[str, Any]) -> Params:
  """Inverse of `merge`: puts back the original kernels and the (IA)^3 subtree."""
  flat = params_lib.flatten(merged)
  for path, kernel in params_lib.flatten(originals["kernels"]).items():
    if path not in flat:
      raise ValueError(f"unmerge: merged params lack {path}")
    flat[path] = kernel
  return params_lib.combine(params_lib.unflatten(flat), originals["ia3"])
