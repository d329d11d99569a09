"""`train.host_memory`: repeated XLA:CPU calls stop faulting in fresh pages; where it
does not apply, it says why and changes nothing."""

import json
import os
import subprocess
import sys

import jax

from ia3_jax.train import host_memory

# A call whose temporary buffer (the [4096, 4096] product) is 64 MiB, above glibc's largest
# mmap threshold (32 MiB): glibc maps and unmaps it on every call unless told otherwise. The
# faults of a call: the median of the last 8 of 16. (A call's buffer is freed just after the
# call returns, so under load the next call may not find it free yet: the heap grows by a
# block or two in the first calls, then every call finds one.)
PROGRAM = """
import json, resource, sys
from ia3_jax.train import host_memory
status = host_memory.reuse_step_buffers() if sys.argv[1] == "reuse" else "untouched"
import jax, jax.numpy as jnp
if sys.argv[2:] == ["status"]:  # without starting the backend
  print(json.dumps({"status": status,
                    "async": jax.config.values["jax_cpu_enable_async_dispatch"]}))
  sys.exit()
f = jax.jit(lambda a, b: jnp.sin(a @ b).sum())
a, b = jnp.ones((4096, 64)), jnp.ones((64, 4096))
temp = f.lower(a, b).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a, b).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"status": status, "temp": temp, "faults": sorted(faults[8:])[4], "each": faults,
                  "async": jax.config.values["jax_cpu_enable_async_dispatch"]}))
"""


def _run(*args: str, **env) -> dict:
  out = subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **env})
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _transparent_huge_pages_always() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


def test_repeated_calls_reuse_their_buffers_instead_of_fresh_pages():
  reused = _run("reuse", JAX_PLATFORMS="cpu")
  assert reused["status"].startswith("host memory: step buffers reused"), reused
  assert reused["async"] is False
  assert reused["temp"] >= 64 * 2 ** 20, reused  # the program still has its large buffer
  pages = reused["temp"] / os.sysconf("SC_PAGE_SIZE")
  assert reused["faults"] < 0.02 * pages, (reused, pages)
  system = _run("system", JAX_PLATFORMS="cpu")
  assert system["async"] is True and system["temp"] == reused["temp"]
  if not _transparent_huge_pages_always():  # else the kernel maps it in 2 MiB pages
    assert system["faults"] > 0.5 * pages, (system, pages)  # what the setting saves


def test_leaves_hosts_that_may_use_an_accelerator_alone():
  out = _run("reuse", "status", JAX_PLATFORMS="cuda,cpu")
  assert out["status"] == "host memory: left to the system (a GPU/TPU backend may be used)"
  assert out["async"] is True


def test_too_late_once_the_backend_has_started():
  jax.devices()  # this process's backend is running
  assert host_memory.reuse_step_buffers() == (
      "host memory: left to the system (the JAX backend has already started)")
  assert jax.config.values["jax_cpu_enable_async_dispatch"] is True
