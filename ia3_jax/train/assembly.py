"""How every run assembles its model: one `ModelSpec` -> network, parameter layout, params.

    spec = assembly.ModelSpec(config.get_config("t0_3b"), peft=ia3.IA3Config(),
                              frozen_dtype="int8", initial_checkpoint_path="/ckpt/T0_3B")
    lay = assembly.layout(spec, Partitioner(PartitionConfig()))   # the model on the mesh
    params = lay.init_params(assembly.load_base_params(lay, spec.initial_checkpoint_path))

`ModelSpec` is what a run says about its model, validated once where it is built
(gin: the `MODEL` macro of `gin/models/base.gin`, which every model file
includes). Training (`loop.train`), eval / score / infer (`ia3_jax.runs`), the
demo's `FewShotRunner` and the benchmarks all build from it here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from ia3_jax.errors import ConfigError
from ia3_jax.interop import hf_checkpoints, hf_families
from ia3_jax.model import families, network
from ia3_jax.model import params as params_lib
from ia3_jax.model.storage import FROZEN_DTYPES, FrozenStorage
from ia3_jax.peft import registry
from ia3_jax.train.param_layout import ParamLayout
from ia3_jax.train.partitioning import PartitionConfig, Partitioner

log = logging.getLogger(__name__)

Params = dict[str, Any]
ALL_PARAMS = ".*"


def _positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The model of a run (gin macro in brackets; `gin/models/base.gin` binds them all).

  config [MODEL_CONFIG]: a `T5Config` or `DecoderConfig` (family, shape, activation
    dtype, attention implementation).
  peft [PEFT]: a registered PEFT method config (`peft.registry`); None: the plain model.
  num_tasks [NUM_TASKS]: rows of the method's per-task banks; > 1 means batches carry
    `task_id` (mixed-task batches).
  trainable [TRAINABLE_PARAMS]: regexes over param paths; None: the method's (no
    method: every param).
  frozen_dtype [FROZEN_DTYPE]: storage of the frozen params: float32, bfloat16, int8, int4.
  scan_layers [SCAN_LAYERS]: run the layers with `nn.scan` (params stacked under `layers`).
  remat [REMAT]: rematerialisation of each layer: "none", "full" or "dots".
  dropout_rate [DROPOUT_RATE]: training dropout (None: the config's; decoder-only
    models have none). Inference never drops out.
  initial_checkpoint_path [INITIAL_CHECKPOINT_PATH]: the base weights (HF directory or
    orbax params); None: random init with the run's seed.
  max_choices_per_step [MAX_CHOICES_PER_STEP]: score the answer choices this many at a
    time (memory); None: all at once.
  """

  config: Any
  peft: Optional[registry.PeftMethod] = None
  num_tasks: int = 1
  trainable: Optional[params_lib.Patterns] = None
  frozen_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  dropout_rate: Optional[float] = None
  initial_checkpoint_path: Optional[str] = None
  max_choices_per_step: Optional[int] = None

  def __post_init__(self) -> None:
    try:
      self.family
    except TypeError:
      raise ConfigError(f"MODEL_CONFIG={self.config!r}: not a model config (T5Config or "
                        "DecoderConfig; e.g. include a gin/models/*.gin file)") from None
    if self.peft is not None and not isinstance(self.peft, registry.PeftMethod):
      raise ConfigError(f"PEFT={self.peft!r}: not a PEFT method config (e.g. "
                        "@ia3.IA3Config(); known methods: "
                        f"{', '.join(registry.method_names())})")
    self.method.check_num_tasks(self.num_tasks)
    if self.frozen_dtype not in FROZEN_DTYPES:
      raise ConfigError(f"FROZEN_DTYPE={self.frozen_dtype!r} is not one of "
                        f"{', '.join(FROZEN_DTYPES)}")
    if not isinstance(self.scan_layers, bool):
      raise ConfigError(f"SCAN_LAYERS={self.scan_layers!r}: must be True or False")
    if self.remat not in network.REMAT_POLICIES:
      raise ConfigError(f"REMAT={self.remat!r}: choose from {sorted(network.REMAT_POLICIES)}")
    rate = self.dropout_rate
    if rate is not None and not (isinstance(rate, (int, float)) and not isinstance(rate, bool)
                                 and 0.0 <= rate < 1.0):
      raise ConfigError(f"DROPOUT_RATE={rate!r}: must be a number in [0, 1)")
    if self.max_choices_per_step is not None and not _positive_int(self.max_choices_per_step):
      raise ConfigError(f"MAX_CHOICES_PER_STEP={self.max_choices_per_step!r}: must be a "
                        "positive int or None")
    patterns = self.trainable
    if patterns is not None and not (isinstance(patterns, str) or (
        isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns))):
      raise ConfigError(f"TRAINABLE_PARAMS={patterns!r}: must be a regex or a list of regexes")

  @property
  def family(self) -> families.Family:
    return families.of(self.config)

  @property
  def method(self) -> registry.PeftMethod:
    """The PEFT method (no method: full fine-tuning's, which changes no blocks)."""
    return self.peft if self.peft is not None else registry.make("full")

  @property
  def trainable_patterns(self) -> params_lib.Patterns:
    if self.trainable is not None:
      return self.trainable
    return self.peft.trainable_patterns if self.peft is not None else ALL_PARAMS

  @property
  def use_task_id(self) -> bool:
    """Whether batches pass `task_id` to the model (per-task banks of several rows)."""
    return self.num_tasks > 1

  def replace(self, **changes: Any) -> "ModelSpec":
    return dataclasses.replace(self, **changes)

  def blocks(self) -> network.Blocks:
    """The family's blocks (scan, remat) with the PEFT method's overrides."""
    base = self.family.blocks_cls(remat=self.remat, scan_layers=self.scan_layers)
    return self.method.blocks(self.config, base, self.num_tasks)

  def model(self, *, training: bool = True) -> Any:
    """The network; `training` applies DROPOUT_RATE (inference: no dropout)."""
    config = self.config
    rate = self.dropout_rate if training else 0.0
    if self.family is families.DECODER_ONLY:
      if rate:
        log.warning("DROPOUT_RATE=%s ignored: decoder-only models have no dropout", rate)
    elif rate is not None:
      config = config.replace(dropout_rate=float(rate))
    return self.family.build(config, self.blocks())

  def check_task_ids(self, task_id: Any, *, source: str = "batch") -> None:
    """A batch's `task_id` against the method and NUM_TASKS (host side): an id outside
    the bank is a DataError naming it, not a NaN loss."""
    self.method.check_task_ids(task_id, self.num_tasks, source=source)


def layout(spec: ModelSpec, partitioner: Partitioner | PartitionConfig | None = None, *,
           seed: int = 42, training: bool = True) -> ParamLayout:
  """`spec`'s model laid out on the mesh (`training`: with DROPOUT_RATE)."""
  if not isinstance(partitioner, Partitioner):
    partitioner = Partitioner(partitioner or PartitionConfig())
  return ParamLayout(spec.model(training=training), trainable=spec.trainable_patterns,
                     partitioner=partitioner, seed=seed, use_task_id=spec.use_task_id,
                     max_choices_per_step=spec.max_choices_per_step,
                     frozen_storage=FrozenStorage(spec.frozen_dtype),
                     check_task_ids=spec.check_task_ids)


def load_base_params(lay: ParamLayout, path: Optional[str]) -> Optional[Params]:
  """The base params at `path` (HF directory or orbax params; None: none), each tensor
  stored as `lay` keeps it as it is read (no float32 copy of the model); an HF
  directory must hold the layout's model (the error names the first differing param)."""
  load = hf_families.of(lay.model.config).load_initial
  base, hf_config = load(path, convert=lay.store_base_tensor)
  if base is not None and hf_config is not None:
    hf_checkpoints.check_params_match(base, lay.model.config, source=str(path))
  return base


def initial_params(lay: ParamLayout, spec: ModelSpec) -> Params:
  """Every param of `lay`, placed: the base at INITIAL_CHECKPOINT_PATH where it has them,
  the seed's random init elsewhere (new PEFT params, or everything without a base)."""
  path = spec.initial_checkpoint_path
  return lay.init_params(load_base_params(lay, path), source=str(path))
