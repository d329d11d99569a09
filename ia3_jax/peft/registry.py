"""PEFT methods: one config dataclass per method, registered by the module that defines it.

    from ia3_jax.peft import registry
    method = registry.make("lora", rank=8)        # a frozen, validated `lora.LoRA`
    blocks = method.blocks(config, decoder.DecoderBlocks())   # overrides on that family's blocks
    trainable = method.trainable_patterns         # regexes over "/"-joined param paths

A method is one module of `ia3_jax.peft` holding a `PeftMethod` subclass
decorated with `@register`: its fields are its hyper-parameters and their
defaults (the one home of both), `__post_init__` validates them as
`ConfigError` naming the gin binding (`lora.LoRA.rank=0: ...`), `blocks` puts
its module overrides on the blocks of the model's family, `post_load` may
initialise its params from the loaded base (prompt tuning). The registry finds
the modules of the package itself, so a new method is that module alone: the
CLI's choices, `peft-counts` and the tests parametrised over `methods()` pick
it up.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from ia3_jax.errors import ConfigError, DataError
from ia3_jax.model import families, network

_METHODS: dict[str, type["PeftMethod"]] = {}
_NOT_METHODS = {"registry", "banks", "combine", "counts", "projection_targets"}


@dataclasses.dataclass(frozen=True)
class PeftMethod:
  """A fine-tuning method's hyper-parameters (subclasses add fields with defaults).

  Class attributes: name (registry key), trainable_patterns (regexes, `re.fullmatch` on
  "/"-joined param paths), supports_mixed_tasks (per-task banks: examples of one batch
  may use different `task_id`s), description (one line for tables and --help).
  """

  name: ClassVar[str] = ""
  trainable_patterns: ClassVar[tuple[str, ...]] = ()
  supports_mixed_tasks: ClassVar[bool] = False
  description: ClassVar[str] = ""

  def __post_init__(self) -> None:
    self.validate()

  def validate(self) -> None:
    """Raises ConfigError for a bad hyper-parameter (`self.invalid(field, why)`)."""

  def invalid(self, field: str, why: str) -> ConfigError:
    """The one-line error for `field`, naming its gin binding (`lora.LoRA.rank=0: ...`)."""
    cls = type(self)
    binding = f"{cls.__module__.rpartition('.')[2]}.{cls.__name__}.{field}"
    return ConfigError(f"{binding}={getattr(self, field)!r}: {why}")

  def require_positive_int(self, field: str) -> None:
    """ConfigError unless hyper-parameter `field` is a positive int."""
    value = getattr(self, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise self.invalid(field, "must be a positive int")

  def names_from(self, field: str, known: Any) -> tuple[str, ...]:
    """Hyper-parameter `field` (a name or names) as a tuple, each one of `known`."""
    value = getattr(self, field)
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
      raise self.invalid(field, f"unknown {unknown or 'empty'}; known: {', '.join(known)}")
    return names

  def blocks(self, config: Any, base: network.Blocks, num_tasks: int = 1) -> network.Blocks:
    """`base` (the model family's blocks) with this method's module overrides."""
    del config
    self.check_num_tasks(num_tasks)
    return base

  def post_load(self, params: Any, config: Any) -> Any:
    """The params of a fresh start after the base is loaded (default: unchanged)."""
    del config
    return params

  def hyperparameters(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def check_num_tasks(self, num_tasks: int) -> None:
    """ConfigError unless `num_tasks` [NUM_TASKS] is a positive int this method supports."""
    if not isinstance(num_tasks, (int, np.integer)) or isinstance(num_tasks, bool) or num_tasks < 1:
      raise ConfigError(f"NUM_TASKS={num_tasks!r}: must be a positive int")
    if num_tasks > 1 and not self.supports_mixed_tasks:
      raise ConfigError(
          f"NUM_TASKS={num_tasks}: {self.name} does not support mixed-task batches (its "
          "parameters are shared by every example); train one adapter per task, or use "
          f"{' or '.join(n for n, m in methods().items() if m.supports_mixed_tasks)}")

  def check_task_ids(self, task_id: Any, num_tasks: int = 1, *, source: str = "batch") -> None:
    """Host-side check of a batch's `task_id` (None is fine) against the bank size."""
    if task_id is None or np.size(task_id) == 0:
      return
    ids = np.asarray(task_id)
    if not np.issubdtype(ids.dtype, np.integer):
      raise DataError(f"{source}: task_id must be integers, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= num_tasks)]
    if bad.size:
      if not self.supports_mixed_tasks:
        raise DataError(f"{source}: task_id {int(bad[0])}: {self.name} has one set of params "
                        "(no mixed-task batches); every task_id must be 0")
      raise DataError(f"{source}: task_id {int(bad[0])} is out of range: the {self.name} bank "
                      f"has {num_tasks} rows (NUM_TASKS={num_tasks})")


def base_blocks(config: Optional[Any], base: Optional[network.Blocks] = None) -> network.Blocks:
  """`base`, or the plain blocks of `config`'s family (no config: the T5 blocks)."""
  if base is not None:
    return base
  return families.of(config).blocks_cls() if config is not None else network.Blocks()


def register(cls: type[PeftMethod]) -> type[PeftMethod]:
  """Class decorator: adds a `PeftMethod` subclass to the registry under `cls.name`."""
  if not cls.name or cls.name in _METHODS and _METHODS[cls.name] is not cls:
    raise ValueError(f"PEFT method {cls.__name__}: name {cls.name!r} is empty or taken")
  _METHODS[cls.name] = cls
  return cls


def methods() -> Mapping[str, type[PeftMethod]]:
  """Every registered method by name, sorted (imports the modules of `ia3_jax.peft` once)."""
  if not getattr(methods, "_discovered", False):
    package = importlib.import_module("ia3_jax.peft")
    for info in pkgutil.iter_modules(package.__path__):
      if info.name not in _NOT_METHODS:
        importlib.import_module(f"ia3_jax.peft.{info.name}")
    methods._discovered = True  # type: ignore[attr-defined]
  return dict(sorted(_METHODS.items()))


def method_names() -> tuple[str, ...]:
  return tuple(methods())


def get_method(name: str) -> type[PeftMethod]:
  """The method class registered as `name` (ia3, lora, bitfit, layernorm, prompt_tuning, ...)."""
  found = methods()
  if name not in found:
    raise ConfigError(f"PEFT_METHOD={name!r}: unknown PEFT method; known: {', '.join(found)}")
  return found[name]


def make(name: str, **hyperparameters: Any) -> PeftMethod:
  """The method `name` with `hyperparameters` over its defaults (gin: PEFT_METHOD, PEFT_OPTIONS)."""
  cls = get_method(name)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(hyperparameters) - known)
  if unknown:
    raise ConfigError(f"PEFT_OPTIONS: {name} has no hyper-parameter {unknown[0]!r}; it has "
                      f"{', '.join(sorted(known)) or 'none'}")
  return cls(**hyperparameters)


def defaults(name: str) -> dict[str, Any]:
  """The default hyper-parameters of method `name`."""
  return get_method(name)().hyperparameters()


def trainable_patterns(name: str) -> list[str]:
  """The regexes of the params method `name` trains."""
  return list(get_method(name).trainable_patterns)
