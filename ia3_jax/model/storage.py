"""How the frozen base weights are stored: float32, bfloat16, or weight-only int8 / int4.

A PEFT run reads the frozen params and never updates them, so they can live in
less memory than the float32 that the trainable params and the optimizer state
keep. `FrozenStorage("bfloat16")` stores every frozen param in bfloat16;
`"int8"` and `"int4"` quantise the projection kernels (every `.../kernel`, [in, out]
or, scanned, [layers, in, out]) weight-only with Qwix (`qwix.quantize`, symmetric absmax: int8 with one scale
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
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jax.sharding import NamedSharding, PartitionSpec

from ia3_jax.errors import ConfigError
from ia3_jax.model import params as params_lib

FROZEN_DTYPES = ("float32", "bfloat16", "int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
QArray = qwix.QArray


@dataclasses.dataclass(frozen=True)
class FrozenStorage:
  """Storage of frozen params (gin macro FROZEN_DTYPE); `tile`: int4 input rows per scale."""

  dtype: str = "float32"
  tile: int = 128
  block_elements: int = 1 << 20  # a host tensor is quantised this many elements at a time

  def __post_init__(self):
    if self.dtype not in FROZEN_DTYPES:
      raise ConfigError(f"FROZEN_DTYPE={self.dtype!r} is not one of {', '.join(FROZEN_DTYPES)}")
    if not isinstance(self.tile, int) or self.tile < 1:
      raise ConfigError(f"FrozenStorage.tile must be a positive int, got {self.tile!r}")

  @property
  def quantized(self) -> bool:
    return self.dtype in QTYPES

  def quantizes(self, path: str, shape: tuple[int, ...]) -> bool:
    """Whether frozen param `path` (of `shape`) is stored quantised: a kernel [in, out], or
    [layers, in, out] in the scanned layout (`network.Blocks(scan_layers=True)`)."""
    return (self.quantized and path.rsplit("/", 1)[-1] == "kernel"
            and len(shape) == (3 if "/layers/" in f"/{path}" else 2))

  def store(self, path: str, value: Any) -> Any:
    """The stored form of frozen param `path`: a device array, a host array, or a host
    array-like read on demand (`.shape`, slicing, `.astype`, as a checkpoint loader's
    `hf_checkpoints.HostTensor`; quantised a block of columns at a time)."""
    if isinstance(value, QArray):
      return value
    if self.dtype == "float32" or not self.quantizes(path, np.shape(value)):
      dtype = jnp.float32 if self.dtype == "float32" else jnp.bfloat16
      if _is_jax(value):
        return value if value.dtype == dtype else value.astype(dtype)
      if isinstance(value, np.ndarray) or not hasattr(value, "astype"):
        return np.asarray(value).astype(dtype, copy=False)
      return value.astype(dtype)  # read on demand: straight into `dtype`
    shape = np.shape(value)
    rows, lead = shape[-2], tuple(range(len(shape) - 2))  # lead: the scanned layers axis
    tiled = ({len(shape) - 2: self.tile}
             if self.dtype == "int4" and rows > self.tile and rows % self.tile == 0 else None)
    how = (QTYPES[self.dtype], (*lead, len(shape) - 1), tuple(sorted((tiled or {}).items())))
    if _is_jax(value):
      return _quantize(jnp.asarray(value, jnp.float32), *how)
    # A host tensor goes to the device a block of output columns at a time (each column has
    # its own scales, so the blocks quantise independently), each block done before the next
    # is read: no float copy of the whole tensor while an HF checkpoint is read.
    cols = _block_columns(shape[-1], self.block_elements // max(1, int(np.prod(shape[:-1]))))
    parts = [jax.block_until_ready(_quantize(jnp.asarray(value[..., i:i + cols], jnp.float32),
                                             *how))
             for i in range(0, shape[-1], cols)]
    if len(parts) == 1:
      return parts[0]
    return dataclasses.replace(parts[0], qvalue=jnp.concatenate([q.qvalue for q in parts], -1),
                               scale=jnp.concatenate([q.scale for q in parts], -1))

  def store_tree(self, frozen: Mapping[str, Any]) -> dict[str, Any]:
    """`store` on every leaf of a frozen param tree."""
    return params_lib.unflatten({k: self.store(k, v)
                                 for k, v in params_lib.flatten(frozen).items()})

  def abstract_tree(self, frozen: Mapping[str, Any]) -> dict[str, Any]:
    """ShapeDtypeStructs (QArrays of them for quantised kernels) of the stored tree."""
    return jax.eval_shape(self.store_tree, frozen)

  def shardings(self, stored: Mapping[str, Any], param_shardings: Mapping[str, Any]
                ) -> dict[str, Any]:
    """Shardings of the stored tree: a quantised kernel's values like the kernel, its
    scales along the output dim only (as the kernel's output dim)."""
    flat_sh = params_lib.flatten(param_shardings)
    out = {}
    for k, v in params_lib.flatten(stored).items():
      sh = flat_sh[k]
      if isinstance(v, QArray):  # scales: [(layers,) in / tile, out]; shard the out dim only
        spec = tuple(sh.spec) + (None,) * (len(v.shape) - len(sh.spec))
        scale = NamedSharding(sh.mesh, PartitionSpec(*spec[:-2], None, spec[-1]))
        out[k] = dataclasses.replace(v, qvalue=sh, scale=scale)
      else:
        out[k] = sh
    return params_lib.unflatten(out)


def requantize_like(value: jax.Array, like: QArray) -> QArray:
  """`value` (float) quantised as `like` is: its qtype, one scale per column and per tile."""
  n = len(like.shape)
  rows = like.shape[-2] // like.scale.shape[-2]
  tiled = {n - 2: rows} if like.scale.shape[-2] > 1 else None
  return _quantize(jnp.asarray(value, jnp.float32), like.qtype, (*range(n - 2), n - 1),
                   tuple(sorted((tiled or {}).items())))


def materialize(kernel: Any, dtype: Any, after: Optional[jax.Array] = None) -> jax.Array:
  """A kernel in compute `dtype`: dequantised if it is stored quantised, else cast.

  With `after` (the layer's input), the conversion reads one element of it (`+ 0 * x`,
  which XLA does not fold for floats, and which is exact for a finite input): otherwise
  nothing ties the conversion to its layer, and XLA computes every layer's converted copy
  early (in the backward pass too) and keeps them all alive, the whole model again in
  `dtype`. (XLA:CPU drops optimization barriers before scheduling, so a barrier would not do.)
  The dependency carries no gradient (`stop_gradient`): otherwise the backward pass computes
  each frozen kernel's cotangent (an X^T dY product as large as the forward's) only to
  multiply it by 0.
  """
  quantized = isinstance(kernel, QArray)
  if not quantized and jnp.dtype(kernel.dtype) == jnp.dtype(dtype):
    return kernel
  if after is not None:  # stop_gradient: no cotangent for the frozen kernel (X^T dY products)
    zero = 0 * jax.lax.stop_gradient(after[(0,) * after.ndim])
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


def _block_columns(n: int, at_most: int) -> int:
  """The largest divisor of `n` that is at most `at_most` (>= 1): equal blocks, one compile."""
  best = 1
  for d in range(1, int(n ** 0.5) + 1):
    if n % d == 0:
      for c in (d, n // d):
        if best < c <= at_most:
          best = c
  return best


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(value: jax.Array, qtype: Any, channelwise_axes: tuple[int, ...],
              tiled_axes: tuple[tuple[int, int], ...]) -> QArray:
  """`qwix.quantize`, compiled: one fused pass per tensor, no float intermediates kept."""
  return qwix.quantize(value, qtype, channelwise_axes=channelwise_axes,
                       tiled_axes=dict(tiled_axes) or None)


def _is_jax(x: Any) -> bool:
  return isinstance(x, jax.Array)  # device arrays and tracers
