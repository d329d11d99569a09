"""Trainable-parameter utilities shared by every parameter-efficient method.

Param trees are nested dicts keyed by T5X names; a param's *path* is its keys
joined by "/" (e.g. `encoder/layers_0/attention/ia3_key`). Methods name their
trainable params with regular expressions matched against paths with
`re.fullmatch` (as T-Few's `trainable_param_names` does).

`partition` splits a tree into two *sparse* trees (each holds only its own
leaves, in the original nesting), so `jax.grad`, optax and checkpoints see the
trainable params alone; `combine` rebuilds the full tree. Leaves may be arrays,
ShapeDtypeStructs or `nn.LogicallyPartitioned` boxes: nothing here looks
inside them, so the same calls work on abstract and boxed trees.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import flax
import jax
import numpy as np

from ia3_jax.errors import ConfigError

Params = dict[str, Any]
Patterns = Union[str, Iterable[str], Callable[[str], bool]]


def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} for a nested param dict (boxes count as leaves)."""
  flat = flax.traverse_util.flatten_dict(_plain(params), sep="/")
  return dict(flat)


def unflatten(flat: Mapping[str, Any]) -> Params:
  """Inverse of `flatten`."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def _plain(params: Mapping[str, Any]) -> dict:
  if isinstance(params, flax.core.FrozenDict):
    return flax.core.unfreeze(params)
  return dict(params) if not isinstance(params, dict) else params


def _matcher(patterns: Patterns) -> tuple[Callable[[str], bool], list[str]]:
  """A path predicate and the list of regexes it uses (empty for a callable)."""
  if callable(patterns):
    return patterns, []
  regexes = [patterns] if isinstance(patterns, str) else list(patterns)
  compiled = []
  for p in regexes:
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"trainable pattern {p!r} is not a valid regular expression: {e}") from e
  return (lambda path: any(c.fullmatch(path) for c in compiled)), regexes


def trainable_mask(params: Mapping[str, Any], patterns: Patterns, *,
                   allow_unmatched: bool = False) -> Params:
  """Bool tree (same nesting as `params`): True where the path full-matches a pattern.

  `patterns` is a regex, a list of regexes, or a predicate on the path string.
  A regex that matches no param raises (a typo would otherwise silently
  freeze everything) unless `allow_unmatched`.
  """
  match, regexes = _matcher(patterns)
  flat = flatten(params)
  mask = {path: bool(match(path)) for path in flat}
  if not allow_unmatched:
    for regex in regexes:
      if not any(re.fullmatch(regex, path) for path in flat):
        sample = ", ".join(list(flat)[:5])
        raise ConfigError(f"TRAINABLE_PARAMS: trainable pattern {regex!r} matches no param "
                          f"(paths look like: {sample}, ...)")
  return unflatten(mask)


def partition(params: Mapping[str, Any], mask: Mapping[str, Any]) -> tuple[Params, Params]:
  """Splits `params` into sparse (trainable, frozen) trees by a bool `mask` tree."""
  flat, flat_mask = flatten(params), flatten(mask)
  if set(flat) != set(flat_mask):
    diff = sorted(set(flat) ^ set(flat_mask))
    raise ValueError(f"mask does not match the param tree; differing paths: {', '.join(diff[:5])}")
  trainable = {p: v for p, v in flat.items() if flat_mask[p]}
  frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
  return unflatten(trainable), unflatten(frozen)


def combine(*trees: Mapping[str, Any]) -> Params:
  """Merges sparse trees (e.g. trainable and frozen) into one; a path in two trees raises."""
  out: dict[str, Any] = {}
  for tree in trees:
    for path, value in flatten(tree).items():
      if path in out:
        raise ValueError(f"combine: param {path} is present in more than one tree")
      out[path] = value
  return unflatten(out)


def select(params: Mapping[str, Any], patterns: Patterns) -> tuple[Params, Params]:
  """`partition(params, trainable_mask(params, patterns))`."""
  return partition(params, trainable_mask(params, patterns))


def count(params: Any, mask: Optional[Mapping[str, Any]] = None) -> int:
  """Number of scalars in a (possibly abstract or boxed) tree, or in its masked part."""
  if mask is not None:
    params, _ = partition(params, mask)
  leaves = jax.tree.leaves(flax.linen.unbox(params))
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in leaves))


def nbytes(params: Any) -> int:
  """Bytes taken by a (possibly abstract or boxed) tree's leaves at their dtypes."""
  leaves = jax.tree.leaves(flax.linen.unbox(params))
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in leaves))


def paths(params: Mapping[str, Any]) -> list[str]:
  """All param paths, sorted."""
  return sorted(flatten(params))
