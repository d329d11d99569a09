"""The train state: frozen params, trainable params, and optimizer state for the latter only.

The param tree is split by `params.partition` into two sparse trees with the
original nesting. Only `trainable` is differentiated and has optimizer state;
`frozen` goes into the jitted step as an input and never comes out of it, so
it stays bit-for-bit the same buffers for the whole run.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import optax
from jax.sharding import NamedSharding

from ia3_jax.model import params as params_lib

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  """step (updates applied, int32 scalar), trainable, opt_state, frozen."""

  step: jax.Array
  trainable: Params
  opt_state: optax.OptState
  frozen: Params

  @property
  def params(self) -> Params:
    """The full param tree (trainable and frozen combined)."""
    return params_lib.combine(self.trainable, self.frozen)


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(opt_state_shapes: Any, trainable_shardings: Params,
                        trainable_shapes: Params, replicated: NamedSharding) -> Any:
  """Shardings for an optimizer state: a leaf shaped like the param it belongs to
  (its dict-key path ends with the param's path) takes that param's sharding;
  anything else (counts, factored row/column moments) is replicated."""
  by_path = {tuple(k.split("/")): v for k, v in params_lib.flatten(trainable_shardings).items()}
  shapes = {tuple(k.split("/")): v.shape for k, v in params_lib.flatten(trainable_shapes).items()}

  def one(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      tail = keys[start:]
      if tail in by_path:
        return by_path[tail] if tuple(leaf.shape) == tuple(shapes[tail]) else replicated
    return replicated
  return jax.tree_util.tree_map_with_path(one, opt_state_shapes)


def opt_state_param_paths(opt_state: Any) -> set[str]:
  """Param paths ("a/b/kernel") that appear in an optimizer state's dict keys."""
  found = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = _dict_keys(path)
    if keys:
      found.add("/".join(keys))
  return found
