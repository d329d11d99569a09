"""Combining one-task (IA)^3 adapters (and LoRA adapters) into one new adapter.

Every function takes the adapters as a list of one-task (IA)^3 trees (what
`ia3.extract_ia3`, `ia3.select_task` or `ia3_adapters.import_adapter` return:
`<block>/ia3_<site>` vectors of shape `[1, width]`), or as a `{name: tree}`
dict so that errors name the adapter; it returns a new one-task tree with the
same params (float32; computed in float64). Per entry, with l_i the value of
adapter i and tau_i = l_i - 1 its task vector ((IA)^3 vectors start at ones,
so l - 1 is what training moved):

  linear           sum_i w_i l_i                        (peft `IA3Model.add_weighted_adapter`)
  multiplicative   prod_i l_i                           (the adapters applied in sequence)
  task_arithmetic  1 + lambda sum_i w_i tau_i           (Ilharco et al. 2023, w_i = 1 by default)
  ties             1 + lambda TIES(tau_1, ..., tau_n)   (Yadav et al. 2023, TIES-merging)

All adapters must hold the same params with the same shapes (the same sites of
one base model); a multi-task bank, an empty adapter or other params raise
`AdapterError` naming the adapter, and bad weights, `k` or `lambda_` raise
`ConfigError` naming the argument.

`lora_linear` combines LoRA trees (`lora.py` layout) into one LoRA of the
concatenated rank whose update is sum_i w_i s_i A_i B_i; `lora_deltas` gives
the delta kernels of a LoRA tree.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from ia3_jax.errors import AdapterError, ConfigError
from ia3_jax.model import params as params_lib
from ia3_jax.peft import ia3, lora

Params = dict[str, Any]
Adapters = Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]


# --------------------------------------------------------------------------- checks


def _named(adapters: Adapters) -> tuple[list[str], list[Mapping[str, Any]]]:
  """(names for messages, trees) of a list or a {name: tree} dict of adapters."""
  if isinstance(adapters, Mapping):
    if {"encoder", "decoder"} & set(adapters):
      raise AdapterError("adapters: got one param tree (keys 'encoder'/'decoder'); pass a list "
                         "of adapters or a {name: adapter} dict")
    names, trees = [f"adapter {k!r}" for k in adapters], list(adapters.values())
  elif isinstance(adapters, (list, tuple)):
    names, trees = [f"adapter {i}" for i in range(len(adapters))], list(adapters)
  else:
    raise AdapterError(f"adapters: expected a list or a {{name: adapter}} dict, got "
                       f"{type(adapters).__name__}")
  if not trees:
    raise AdapterError("adapters: none given; combining needs at least one adapter")
  return names, trees


def _ia3_vectors(name: str, tree: Any) -> dict[str, np.ndarray]:
  """The flat float64 vectors `{path: [width]}` of a one-task (IA)^3 tree."""
  if not isinstance(tree, Mapping):
    raise AdapterError(f"{name}: not a param tree (got {type(tree).__name__})")
  flat = params_lib.flatten(tree)
  if not flat:
    raise AdapterError(f"{name}: holds no (IA)^3 vectors")
  others = sorted(p for p in flat if p.rsplit("/", 1)[-1] not in ia3.SITE_OF_PARAM)
  if others:
    raise AdapterError(f"{name}: not (IA)^3 params: {', '.join(others[:5])}")
  out = {}
  for path, value in sorted(flat.items()):
    value = np.asarray(value, np.float64)
    if value.ndim != 2:
      raise AdapterError(f"{name}: {path} has shape {value.shape}; expected a bank [1, width]")
    if value.shape[0] != 1:
      raise AdapterError(f"{name}: a bank of {value.shape[0]} tasks ({path} {value.shape}); "
                         "combine one-task adapters (ia3.select_task(bank, t))")
    out[path] = value[0]
  return out


def _sites(paths: Sequence[str]) -> list[str]:
  found = {ia3.SITE_OF_PARAM.get(p.rsplit("/", 1)[-1]) for p in paths}
  return [s for s in ia3.SITES if s in found]


def _same_params(names: Sequence[str], flats: Sequence[Mapping[str, np.ndarray]]) -> None:
  """Raises unless every adapter has the params and shapes of the first."""
  first = flats[0]
  for name, flat in zip(names[1:], flats[1:]):
    if set(flat) != set(first):
      missing, extra = sorted(set(first) - set(flat)), sorted(set(flat) - set(first))
      why = (f"sites {_sites(flat)} vs {_sites(first)}" if _sites(flat) != _sites(first)
             else "the same sites in other layers (another base model?)")
      raise AdapterError(f"{name} has other params than {names[0]}: {why}; missing "
                         f"{missing[:3]}, extra {extra[:3]}")
    for path, value in first.items():
      if flat[path].shape != value.shape:
        raise AdapterError(f"{name}: {path} has shape {flat[path].shape}, {names[0]} has "
                           f"{value.shape} (an adapter of another base model shape?)")


def _checked(adapters: Adapters) -> tuple[list[str], list[dict[str, np.ndarray]]]:
  names, trees = _named(adapters)
  flats = [_ia3_vectors(n, t) for n, t in zip(names, trees)]
  _same_params(names, flats)
  return names, flats


def _number(value: Any, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ConfigError(f"{what} = {value!r}: must be a finite real number")
  return float(value)


def _weights(weights: Any, n: int, what: str = "weights") -> list[float]:
  if isinstance(weights, np.ndarray):
    weights = weights.reshape(-1).tolist()
  if not isinstance(weights, (list, tuple)):
    raise ConfigError(f"{what}: expected a list of one number per adapter, got {weights!r}")
  if len(weights) != n:
    raise ConfigError(f"{what}: {len(weights)} given for {n} adapters (one per adapter)")
  return [_number(w, f"{what}[{i}]") for i, w in enumerate(weights)]


def _tree(flat: Mapping[str, np.ndarray]) -> Params:
  return params_lib.unflatten({p: jnp.asarray(v[None].astype(np.float32)) for p, v in flat.items()})


# --------------------------------------------------------------------------- (IA)^3


def linear(adapters: Adapters, weights: Sequence[float]) -> Params:
  """sum_i w_i l_i: peft's `IA3Model.add_weighted_adapter(adapters, weights, name)`.

  As peft, the weights are any real numbers (they need not be positive nor sum
  to 1; weights summing to 1 give `task_arithmetic` with those weights); unlike
  peft, which zips silently, their count must equal the number of adapters, and
  they must be finite. peft refuses adapters whose `target_modules` (or
  `feedforward_modules`) differ in type (a regex string vs a list) and otherwise
  targets the union of their modules. The result equals peft's when the adapters
  target the same modules. Where peft differs: an adapter with no vector at a
  module adds nothing there in peft, while our trees hold ones there (identity)
  that count as a vector of ones; and peft keeps an adapter on `wo`'s input and
  one on `wi_1`'s output as two modules (their product scales the MLP), where
  both are our "ff" site and are summed.
  """
  names, flats = _checked(adapters)
  w = _weights(weights, len(names))
  return _tree({p: sum(wi * f[p] for wi, f in zip(w, flats)) for p in flats[0]})


def multiplicative(adapters: Adapters) -> Params:
  """prod_i l_i, elementwise: applying the adapters one after the other.

  (IA)^3 rescales activations, so scaling by l_1 then by l_2 is scaling by
  l_1 * l_2 (peft with several IA3 adapters active at once does this product).
  """
  _, flats = _checked(adapters)
  return _tree({p: np.prod([f[p] for f in flats], axis=0) for p in flats[0]})


def task_arithmetic(adapters: Adapters, lambda_: float = 1.0,
                    weights: Optional[Sequence[float]] = None) -> Params:
  """1 + lambda * sum_i w_i (l_i - 1): adding task vectors (Ilharco et al. 2023).

  "Editing models with task arithmetic" (ICLR 2023): theta = theta_0 + lambda
  sum_i tau_i with task vectors tau_i = theta_i - theta_0; for (IA)^3 theta_0 is
  ones. `weights` (default all 1) scale each task vector; any finite reals (a
  negative one negates a task, the paper's forgetting).
  """
  names, flats = _checked(adapters)
  lam = _number(lambda_, "lambda_")
  w = [1.0] * len(names) if weights is None else _weights(weights, len(names))
  return _tree({p: 1.0 + lam * sum(wi * (f[p] - 1.0) for wi, f in zip(w, flats))
                for p in flats[0]})


def _trim(tau: np.ndarray, k: float) -> np.ndarray:
  """tau with all but its top-k% magnitudes set to 0 (ties at the threshold kept)."""
  keep = math.ceil(Fraction(str(k)) * tau.size / 100)
  threshold = np.sort(np.abs(tau))[::-1][keep - 1]
  return np.where(np.abs(tau) >= threshold, tau, 0.0)


def ties(adapters: Adapters, k: float = 20.0, lambda_: float = 1.0) -> Params:
  """1 + lambda * TIES-merge of the task vectors tau_i = l_i - 1 (Yadav et al. 2023).

  "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023), Algorithm 1:
  1. Trim: in each tau_i keep its ceil(k% * n) largest magnitudes, n = all entries
     of the adapter (every site and layer flattened into one vector, as the paper
     and its reference code trim over all params, not per tensor); entries whose
     magnitude ties with the threshold are all kept, others are set to 0.
  2. Elect: gamma = sgn(sum_i trimmed_i) per entry.
  3. Disjoint mean: the mean of the trimmed_i with sgn(trimmed_i) = gamma (so
     zeros never count); 0 where there is none.
  An entry whose trimmed values sum to exactly 0 gets gamma = sgn(0) = 0 and
  merges to 0 (l = 1), as Algorithm 1 reads. The reference code instead gives such
  entries the sign of the sum of all elected signs, and keeps int(k% * n) + 1
  entries (its kthvalue threshold); peft's `ties` trims per tensor and elects +.
  `k` in (0, 100] is a percentage; `lambda_` any finite real (the paper tunes it,
  1 by default).
  """
  names, flats = _checked(adapters)
  k = _number(k, "k")
  if not 0.0 < k <= 100.0:
    raise ConfigError(f"k = {k!r}: must be in (0, 100] (the percentage of each adapter's "
                      "entries kept)")
  lam = _number(lambda_, "lambda_")
  paths = sorted(flats[0])
  sizes = [flats[0][p].size for p in paths]
  taus = np.stack([_trim(np.concatenate([f[p] for p in paths]) - 1.0, k) for f in flats])
  gamma = np.sign(taus.sum(axis=0))
  agree = (np.sign(taus) == gamma) & (taus != 0.0)
  count = agree.sum(axis=0)
  merged = np.where(count > 0, np.where(agree, taus, 0.0).sum(axis=0) / np.maximum(count, 1), 0.0)
  parts = np.split(1.0 + lam * merged, np.cumsum(sizes)[:-1])
  return _tree(dict(zip(paths, parts)))


# --------------------------------------------------------------------------- LoRA


def _lora_pairs(name: str, tree: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`{<block>/<proj>: (A [in, r], B [r, out])}` of a LoRA tree."""
  if not isinstance(tree, Mapping):
    raise AdapterError(f"{name}: not a param tree (got {type(tree).__name__})")
  flat = params_lib.flatten(tree)
  others = sorted(p for p in flat if not p.endswith((lora.SUFFIX_A, lora.SUFFIX_B)))
  if others or not flat:
    raise AdapterError(f"{name}: not LoRA params (<proj>{lora.SUFFIX_A}/{lora.SUFFIX_B}): "
                       f"{', '.join(others[:5]) or 'empty'}")
  pairs = {}
  for path in sorted(p for p in flat if p.endswith(lora.SUFFIX_A)):
    site = path[:-len(lora.SUFFIX_A)]
    if site + lora.SUFFIX_B not in flat:
      raise AdapterError(f"{name}: {path} has no {site}{lora.SUFFIX_B}")
    a, b = (np.asarray(flat[site + s], np.float64) for s in (lora.SUFFIX_A, lora.SUFFIX_B))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
      raise AdapterError(f"{name}: {site}: A {a.shape} and B {b.shape} are not [in, r], [r, out]")
    pairs[site] = (a, b)
  lone = sorted({p[:-len(lora.SUFFIX_B)] for p in flat if p.endswith(lora.SUFFIX_B)} - set(pairs))
  if lone:
    raise AdapterError(f"{name}: {lone[0]}{lora.SUFFIX_B} has no {lora.SUFFIX_A}")
  return pairs


def lora_linear(adapters: Adapters, weights: Sequence[float],
                scalings: Optional[Sequence[float]] = None) -> Params:
  """One LoRA of rank sum_i r_i whose update is sum_i w_i s_i A_i B_i, at scaling 1.

  A = [w_1 s_1 A_1, ..., w_n s_n A_n] (concatenated columns), B = [B_1; ...; B_n]
  (rows), so A B = sum_i w_i s_i A_i B_i exactly: peft's
  `add_weighted_adapter(..., combination_type="cat")`, which also folds w_i s_i
  into A. `scalings` are each adapter's alpha_i / r_i (`LoraSettings.scaling`;
  default 1); load the result with rank = alpha = sum_i r_i (scaling 1), or fold it
  with `lora.merge_lora(tree, alpha=rank)`. Ranks may differ; the targets and
  kernel shapes must not. Weights: any finite reals.
  """
  names, trees = _named(adapters)
  pairs = [_lora_pairs(n, t) for n, t in zip(names, trees)]
  for name, p in zip(names[1:], pairs[1:]):
    if set(p) != set(pairs[0]):
      raise AdapterError(f"{name} has other LoRA targets than {names[0]}: "
                         f"{sorted(set(p) ^ set(pairs[0]))[:3]}")
    for site, (a, b) in p.items():
      a0, b0 = pairs[0][site]
      if (a.shape[0], b.shape[1]) != (a0.shape[0], b0.shape[1]):
        raise AdapterError(f"{name}: {site} maps {a.shape[0]} -> {b.shape[1]}, {names[0]} "
                           f"{a0.shape[0]} -> {b0.shape[1]} (another base model shape?)")
  w = _weights(weights, len(names))
  s = [1.0] * len(names) if scalings is None else _weights(scalings, len(names), "scalings")
  out = {}
  for site in pairs[0]:
    a = np.concatenate([wi * si * p[site][0] for wi, si, p in zip(w, s, pairs)], axis=1)
    b = np.concatenate([p[site][1] for p in pairs], axis=0)
    out[site + lora.SUFFIX_A] = jnp.asarray(a.astype(np.float32))
    out[site + lora.SUFFIX_B] = jnp.asarray(b.astype(np.float32))
  return params_lib.unflatten(out)


def lora_deltas(tree: Mapping[str, Any], scaling: float = 1.0) -> Params:
  """The delta kernels `scaling * A @ B` of a LoRA tree, at `<block>/<proj>/kernel`."""
  pairs = _lora_pairs("lora tree", tree)
  s = _number(scaling, "scaling")
  return params_lib.unflatten({f"{site}/kernel": jnp.asarray((s * a @ b).astype(np.float32))
                               for site, (a, b) in pairs.items()})
