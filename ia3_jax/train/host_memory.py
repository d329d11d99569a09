"""Host memory on XLA:CPU: each step reuses the last step's buffers instead of fresh pages.

XLA:CPU takes all of a call's temporary buffers from `malloc` as one block
(1.0 GB for a t5-small (IA)^3 step at batch 8 x 256 tokens). glibc serves a
block that large from a fresh `mmap` and unmaps it when the call frees it,
so every step faults in and zeroes the whole block again: about 250,000
page faults per step, 15-20% of that step's time on two cores.

`reuse_step_buffers` keeps such blocks in the process heap: glibc stops
mapping blocks of their own (`M_MMAP_MAX=0`) and stops returning freed heap
to the kernel (`M_TRIM_THRESHOLD`), and CPU computations run on the calling
thread (`jax_cpu_enable_async_dispatch=False`), whose heap those settings
govern (other threads' heaps map large blocks regardless). The trade-offs:
the process keeps freed memory for its next use (its resident size stays at
its peak; a step's block is freed just after the step returns, so the heap
may hold two or three of them before every step finds one free), and Python
waits for each CPU computation (the input pipeline's own threads keep
prefetching; the GIL is released while XLA runs).

Process-wide, so the entry points call it (`python -m ia3_jax.main`, the
benchmarks), before anything starts the JAX backend; it does nothing on
GPU/TPU hosts, whose step buffers live in device memory.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import platform
from typing import Optional

# The entry points' flag: `reuse_step_buffers`, or malloc and JAX's dispatch left alone.
MODES = ("reuse", "system")

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1


def _accelerator_possible(platforms: Optional[str]) -> bool:
  """Whether JAX may pick a GPU/TPU backend: a platform list (`jax_platforms`) not led by
  "cpu", or (no list) an installed accelerator plugin or libtpu."""
  if platforms:
    return platforms.split(",")[0].strip() != "cpu"
  return bool(importlib.metadata.entry_points(group="jax_plugins")) or any(
      importlib.util.find_spec(m) is not None for m in ("libtpu", "jax_plugins"))


def _backend_started() -> bool:
  from jax._src import xla_bridge  # no public query that does not start the backend
  return xla_bridge.backends_are_initialized()


def _glibc() -> Optional[ctypes.CDLL]:
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  libc = ctypes.CDLL(None)
  return libc if hasattr(libc, "mallopt") else None


def reuse_step_buffers() -> str:
  """Makes repeated XLA:CPU calls reuse their host buffers (module docstring); returns
  what it did, as one line for the log.

  Applies only where JAX will run on the CPU, the C library is glibc and the
  JAX backend has not started yet (the dispatch mode is fixed when it starts):
  call it first thing, once.
  """
  import jax  # here: the command line's parser reads `MODES` without importing jax
  libc = _glibc()
  reason = ("a GPU/TPU backend may be used" if _accelerator_possible(jax.config.jax_platforms)
            else "the JAX backend has already started" if _backend_started()
            else "the C library is not glibc" if libc is None else None)
  if reason:
    return f"host memory: left to the system ({reason})"
  if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)):
    return "host memory: left to the system (mallopt refused the settings)"
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return "host memory: step buffers reused (glibc heap kept, CPU calls run on the caller)"
