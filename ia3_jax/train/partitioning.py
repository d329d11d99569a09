"""Device mesh, logical-axis sharding and per-host input, T5X style.

Params and activations carry logical axis names (`vocab, embed, joined_kv,
heads, kv, mlp, relpos_buckets, tasks, batch, length`); a rule table maps them
onto a two-axis mesh `("data", "model")`. The same code runs on one CPU, on
fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), on a
GPU or TPU slice, and on several processes joined by
`jax.distributed.initialize`:

  * `make_mesh(data, model)` builds the mesh (-1 for the data axis: the rest).
  * `Partitioner.shardings(abstract_params)` turns logical axes into
    `NamedSharding`s; a dimension the mesh axis does not divide is replicated
    (and listed in `Partitioner.replicated_dims`), never an error.
  * `Partitioner.shard_batch(host_batch)` assembles each host's rows into
    global arrays split over "data"; `data_shard_info()` says which rows a host
    reads (its seqio shard).
  * `Partitioner.context()` activates the mesh and rules so the model's
    `with_logical_constraint`s take effect inside `jax.jit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"
Rules = tuple[tuple[str, Optional[str]], ...]

# T5X's defaults for a (data, model) mesh (docs/design.md "Logical axes").
DEFAULT_RULES: Rules = (
    ("batch", DATA), ("vocab", MODEL), ("mlp", MODEL), ("heads", MODEL), ("joined_kv", MODEL),
    ("embed", None), ("kv", None), ("length", None), ("relpos_buckets", None), ("tasks", None),
    ("layers", None),  # the stacked axis of scanned layers (Blocks(scan_layers=True))
)


# --------------------------------------------------------------------------- processes


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           cpu_collectives: Optional[str] = "gloo",
                           initialization_timeout: int = 300) -> None:
  """Joins this process to a multi-process JAX run (no-op for a single process).

  With all arguments None, JAX auto-detects the cluster (Cloud TPU, SLURM,
  ...). On CPU, cross-process collectives need `cpu_collectives="gloo"` (set
  before the backend starts). Must run before anything touches a device.
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if num_processes == 1:
    return
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=initialization_timeout)
  log.info("process %d of %d joined (%d local / %d global devices)", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


# --------------------------------------------------------------------------- mesh


def make_mesh(data: int = -1, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A `("data", "model")` mesh over `devices` (default: all global devices).

  `data=-1` takes the devices left after `model`. Errors name the flags.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(f"model_parallel={model} must be >= 1 and divide the {n} devices")
  if data == -1:
    data = n // model
  if data < 1 or data * model != n:
    raise ValueError(f"mesh data_parallel={data} x model_parallel={model} = {data * model} "
                     f"does not match the {n} devices (use data_parallel=-1 to fill)")
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh((data, model), devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(data, model)
  return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
  """Mesh shape and logical axis rules (T5X: `num_partitions` = model_parallel)."""

  data_parallel: int = -1
  model_parallel: int = 1
  logical_axis_rules: Rules = DEFAULT_RULES

  def __post_init__(self):
    object.__setattr__(self, "logical_axis_rules",
                       tuple((str(k), v) for k, v in self.logical_axis_rules))


# --------------------------------------------------------------------------- partitioner


class Partitioner:
  """Maps logical axes to a mesh; places params and batches."""

  def __init__(self, config: PartitionConfig = PartitionConfig(),
               devices: Optional[Sequence[jax.Device]] = None):
    self.config = config
    self.mesh = make_mesh(config.data_parallel, config.model_parallel, devices)
    self.rules = config.logical_axis_rules
    self.replicated_dims: list[str] = []  # "path: dim d (size s) not divisible by axis a (n)"

  # ---- sizes
  @property
  def data_size(self) -> int:
    return self.mesh.shape[DATA]

  @property
  def model_size(self) -> int:
    return self.mesh.shape[MODEL]

  # ---- shardings
  def _mesh_axis(self, name: Optional[str]) -> Optional[str]:
    if name is None:
      return None
    for logical, mesh_axis in self.rules:
      if logical == name:
        return mesh_axis
    raise ValueError(f"logical axis {name!r} has no rule in logical_axis_rules "
                     f"({', '.join(k for k, _ in self.rules)})")

  def spec(self, logical: Sequence[Optional[str]], shape: Sequence[int],
           what: str = "") -> PartitionSpec:
    """Mesh PartitionSpec for one array; undivisible dims are replicated (and recorded)."""
    out, used = [], set()
    for dim, (name, size) in enumerate(zip(logical, shape)):
      axis = self._mesh_axis(name)
      if axis is not None and (axis in used or size % self.mesh.shape[axis]):
        if axis not in used:
          self.replicated_dims.append(f"{what}: dim {dim} ({name}, size {size}) not divisible "
                                      f"by mesh axis {axis} ({self.mesh.shape[axis]})")
        axis = None
      used.add(axis)
      out.append(axis)
    return PartitionSpec(*out)

  def sharding(self, logical: Sequence[Optional[str]], shape: Sequence[int],
               what: str = "") -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical, shape, what))

  def shardings(self, abstract: Any) -> Any:
    """NamedSharding tree for a boxed abstract tree (`network.abstract_params`).

    Leaves without `nn.LogicallyPartitioned` boxes are replicated.
    """
    def one(path, leaf):
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      if isinstance(leaf, nn.LogicallyPartitioned):
        return self.sharding(leaf.names, leaf.value.shape, name)
      return self.replicated
    return jax.tree_util.tree_map_with_path(
        one, abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def batch_sharding(self) -> NamedSharding:
    """Leading (batch) dim split over "data", the rest replicated."""
    return NamedSharding(self.mesh, PartitionSpec(self._mesh_axis("batch")))

  # ---- placement
  def place(self, tree: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) -> global arrays with `shardings`."""
    def one(x, s):
      if isinstance(x, jax.Array) and x.sharding == s:
        return x
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(one, tree, shardings)

  def data_shard_info(self) -> tuple[int, int]:
    """(shard_id, num_shards) of the rows this host feeds (its seqio shard).

    Hosts whose devices sit on the same rows of the "data" axis read the same
    shard (possible when the "model" axis spans hosts).
    """
    rows_of = {}
    for i, row in enumerate(self.mesh.devices):
      for d in row:
        rows_of.setdefault(d.process_index, set()).add(i)
    groups = sorted({tuple(sorted(r)) for r in rows_of.values()})
    mine = tuple(sorted(rows_of[jax.process_index()]))
    sizes = {len(g) for g in groups}
    flat = [i for g in groups for i in g]
    if len(sizes) != 1 or sorted(flat) != list(range(self.data_size)) or any(
        list(g) != list(range(g[0], g[0] + len(g))) for g in groups):
      raise ValueError(f"mesh rows per process {rows_of} do not split the data axis into "
                       "equal contiguous blocks; choose data/model parallelism that keeps "
                       "each process on its own rows")
    return groups.index(mine), len(groups)

  def local_batch_size(self, global_batch_size: int) -> int:
    """Rows each host feeds for a global batch; checks divisibility (names BATCH_SIZE)."""
    _, num_shards = self.data_shard_info()
    if global_batch_size % self.data_size or global_batch_size % num_shards:
      raise ValueError(f"BATCH_SIZE={global_batch_size} must be divisible by the data axis "
                       f"({self.data_size} devices) and the {num_shards} input shards")
    return global_batch_size // num_shards

  def shard_batch(self, host_batch: Mapping[str, np.ndarray], global_batch_size: int) -> dict:
    """This host's rows -> global arrays [global_batch, ...] split over "data"."""
    sharding = self.batch_sharding()
    out = {}
    for key, value in host_batch.items():
      value = np.asarray(value)
      out[key] = jax.make_array_from_process_local_data(
          sharding, value, (global_batch_size,) + value.shape[1:])
    return out

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """Mesh + logical rules active: activation constraints apply under jit."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def describe(self) -> str:
    return (f"mesh data={self.data_size} x model={self.model_size} over {jax.device_count()} "
            f"devices / {jax.process_count()} processes")
