"""Which activation dtype to run in: `dtype="auto"` resolved in one place.

bfloat16 activations (float32 params, sums, norms, softmax and losses) pay
only where the hardware multiplies bf16 natively: GPUs, TPUs, and x86 CPUs
with AVX512-BF16 or AMX-BF16. Elsewhere XLA:CPU emulates bf16 through
float32 and is slower than plain float32, so "auto" picks float32 there.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp

AUTO = "auto"
CPUINFO = "/proc/cpuinfo"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # either means native bf16 dot products
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
BF16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
  """The host CPU's model name and feature flags (empty where unreadable)."""

  model: str = "?"
  flags: frozenset = frozenset()

  @property
  def native_bf16(self) -> tuple[str, ...]:
    """The flags that make bf16 native here (empty: none)."""
    return tuple(f for f in BF16_CPU_FLAGS if f in self.flags)

  def describe(self) -> str:
    """`MODEL (avx2 yes, avx512f no, ...)`: the flags that matter to the matmul kernels."""
    shown = ", ".join(f"{f} {'yes' if f in self.flags else 'no'}" for f in REPORTED_CPU_FLAGS)
    return f"{self.model} ({shown})"


def parse_cpuinfo(text: str) -> CpuInfo:
  """`CpuInfo` from the text of a Linux cpuinfo file (the first processor's entries)."""
  model, flags = "?", frozenset()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and model == "?":
      model = value.strip()
    elif key in ("flags", "Features") and not flags:  # x86 / ARM spelling
      flags = frozenset(value.split())
  return CpuInfo(model, flags)


@functools.cache
def host_cpu() -> CpuInfo:
  """This machine's `CpuInfo` (read once)."""
  try:
    with open(CPUINFO) as f:
      return parse_cpuinfo(f.read())
  except OSError:
    return CpuInfo()


def resolve_dtype(dtype: Any, *, backend: Optional[str] = None,
                  cpu_flags: Optional[Iterable[str]] = None) -> tuple[str, str]:
  """(dtype name, why) for an activation dtype; "auto" becomes "bfloat16" or "float32".

  `backend` defaults to JAX's default backend, `cpu_flags` to the host's
  (both are arguments so the choice can be tested).
  """
  if dtype != AUTO:
    return str(jnp.dtype(dtype)), "set explicitly"
  backend = backend or jax.default_backend()
  if backend in BF16_BACKENDS:
    return "bfloat16", f"dtype='auto': the {backend} backend runs bfloat16 natively"
  flags = frozenset(host_cpu().flags if cpu_flags is None else cpu_flags)
  native = [f for f in BF16_CPU_FLAGS if f in flags]
  if native:
    return "bfloat16", f"dtype='auto': the CPU has {' and '.join(native)}"
  return "float32", (f"dtype='auto': the CPU has neither {' nor '.join(BF16_CPU_FLAGS)} "
                     "(bfloat16 would be emulated)")


@functools.cache
def auto_dtype() -> str:
  """`resolve_dtype("auto")` for this process, logged once (what T5Config(dtype="auto") runs in)."""
  name, why = resolve_dtype(AUTO)
  logging.getLogger("ia3_jax").info("activations in %s (%s)", name, why)
  return name


def activation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype a config's `dtype` field runs in here ("auto" resolved for this process)."""
  return jnp.dtype(auto_dtype() if dtype == AUTO else dtype)


def describe_dtype(dtype: Any) -> str:
  """One line for a run's log: `activations: bfloat16 (dtype='auto': the CPU has amx_bf16)`."""
  name, why = resolve_dtype(dtype)
  return f"activations: {name} ({why})"
