"""How the frozen base weights are stored: float32, bfloat16, or weight-only int8 / int4.

A PEFT run reads the frozen params and never updates them, so they can live in
less memory than the float32 that the trainable params and the optimizer state
keep. `FrozenStorage("bfloat16")` stores every frozen param in bfloat16;
`"int8"` and `"int4"` quantise the projection kernels (every 2-D `.../kernel`)
weight-only with Qwix (`qwix.quantize`, symmetric absmax: int8 with one scale
per output channel, int4 with one scale per output channel and per `tile`
input rows) and store the other frozen params (embeddings, norms, position
biases) in bfloat16.

Layers read a kernel through `materialize(kernel, dtype)`: a cast for an
array, Qwix's dequantisation for a `qwix.QArray`, inside the jitted step, so
a float copy of a kernel exists only while its layer runs. The trainable
params never pass through `store`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jax.sharding import NamedSharding, PartitionSpec

from ia3_jax.errors import ConfigError

FROZEN_DTYPES = ("float32", "bfloat16", "int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
QArray = qwix.QArray


@dataclasses.dataclass(frozen=True)
class FrozenStorage:
  """Storage of frozen params (gin macro FROZEN_DTYPE); `tile`: int4 input rows per scale."""

  dtype: str = "float32"
  tile: int = 128

  def __post_init__(self):
    if self.dtype not in FROZEN_DTYPES:
      raise ConfigError(f"FROZEN_DTYPE={self.dtype!r} is not one of {', '.join(FROZEN_DTYPES)}")
    if not isinstance(self.tile, int) or self.tile < 1:
      raise ConfigError(f"FrozenStorage.tile must be a positive int, got {self.tile!r}")

  @property
  def quantized(self) -> bool:
    return self.dtype in QTYPES

  def quantizes(self, path: str, shape: tuple[int, ...]) -> bool:
    """Whether frozen param `path` (of `shape`) is stored quantised."""
    return self.quantized and path.rsplit("/", 1)[-1] == "kernel" and len(shape) == 2

  def store(self, path: str, value: Any) -> Any:
    """The stored form of frozen param `path` (a host or device float array)."""
    if isinstance(value, QArray):
      return value
    if self.dtype == "float32" or not self.quantizes(path, np.shape(value)):
      dtype = jnp.float32 if self.dtype == "float32" else jnp.bfloat16
      if np.dtype(getattr(value, "dtype", None) or np.float32) == dtype:
        return value
      return value.astype(dtype) if _is_jax(value) else np.asarray(value).astype(dtype)
    rows = np.shape(value)[0]
    tiled = ({0: self.tile} if self.dtype == "int4" and rows > self.tile and rows % self.tile == 0
             else None)
    return qwix.quantize(jnp.asarray(value, jnp.float32), QTYPES[self.dtype],
                         channelwise_axes=(1,), tiled_axes=tiled)

  def store_tree(self, frozen: Mapping[str, Any]) -> dict[str, Any]:
    """`store` on every leaf of a frozen param tree."""
    from ia3_jax.model import params as params_lib  # pylint: disable=g-import-not-at-top
    return params_lib.unflatten({k: self.store(k, v)
                                 for k, v in params_lib.flatten(frozen).items()})

  def abstract_tree(self, frozen: Mapping[str, Any]) -> dict[str, Any]:
    """ShapeDtypeStructs (QArrays of them for quantised kernels) of the stored tree."""
    return jax.eval_shape(self.store_tree, frozen)

  def shardings(self, stored: Mapping[str, Any], param_shardings: Mapping[str, Any]
                ) -> dict[str, Any]:
    """Shardings of the stored tree: a quantised kernel's values like the kernel, its
    scales along the output dim only (as the kernel's output dim)."""
    from ia3_jax.model import params as params_lib  # pylint: disable=g-import-not-at-top
    flat_sh = params_lib.flatten(param_shardings)
    out = {}
    for k, v in params_lib.flatten(stored).items():
      sh = flat_sh[k]
      if isinstance(v, QArray):
        spec = tuple(sh.spec) + (None,) * (2 - len(sh.spec))
        scale = NamedSharding(sh.mesh, PartitionSpec(None, spec[1]))
        out[k] = dataclasses.replace(v, qvalue=sh, scale=scale)
      else:
        out[k] = sh
    return params_lib.unflatten(out)


def requantize_like(value: jax.Array, like: QArray) -> QArray:
  """`value` (float) quantised as `like` is: its qtype, one scale per column and per tile."""
  rows = like.shape[0] // like.scale.shape[0]
  tiled = {0: rows} if like.scale.shape[0] > 1 else None
  return qwix.quantize(jnp.asarray(value, jnp.float32), like.qtype, channelwise_axes=(1,),
                       tiled_axes=tiled)


def materialize(kernel: Any, dtype: Any, after: Optional[jax.Array] = None) -> jax.Array:
  """A kernel in compute `dtype`: dequantised if it is stored quantised, else cast.

  With `after` (the layer's input), the conversion reads one element of it (`+ 0 * x`,
  which XLA does not fold for floats, and which is exact for a finite input): otherwise
  nothing ties the conversion to its layer, and XLA computes every layer's converted copy
  early (in the backward pass too) and keeps them all alive, the whole model again in
  `dtype`. (XLA:CPU drops optimization barriers before scheduling, so a barrier would not do.)
  """
  quantized = isinstance(kernel, QArray)
  if not quantized and jnp.dtype(kernel.dtype) == jnp.dtype(dtype):
    return kernel
  if after is not None:
    zero = 0 * after[(0,) * after.ndim]
    if quantized:  # on the scales: the dependency costs nothing
      kernel = dataclasses.replace(kernel, scale=kernel.scale + zero.astype(kernel.scale.dtype))
    else:
      kernel = kernel + zero.astype(kernel.dtype)
  if quantized:
    return qwix.dequantize(kernel.astype(dtype))
  return kernel.astype(dtype)


def nbytes(tree: Any) -> int:
  """Bytes of a param tree as stored (int4 counted as half a byte, as accelerators pack it)."""
  total = 0.0
  for leaf in jax.tree.leaves(tree):
    dtype = np.dtype(leaf.dtype)
    total += int(np.prod(leaf.shape)) * (0.5 if dtype.name == "int4" else dtype.itemsize)
  return int(total)


def _is_jax(x: Any) -> bool:
  return isinstance(x, jax.Array)  # device arrays and tracers
