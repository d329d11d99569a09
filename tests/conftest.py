"""Test session setup: CPU only, quiet TensorFlow, no hub access, a shared XLA compile cache."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests compile the same tiny programs in both xdist workers and in subprocesses:
# a persistent cache shared by all of them compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "ia3_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Tiny programs: compiling dominates running, so XLA:CPU's backend (LLVM) optimises less. This
# changes speed, not the arithmetic (no fast-math); subprocesses and notebook kernels inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import sys

import jax
import pytest

# The backend starts here, before any test: entry points that a test calls in-process
# (`main.main`, the benchmarks' `main`) then cannot switch process-wide settings such as
# `train.host_memory`'s, whatever the order the tests run in (subprocesses get them).
jax.devices()


# The longest tests (about a minute or more on 2 cores) start first, so that with `-n 2` the
# other worker works through the short ones meanwhile instead of idling at the end.
SLOW_FIRST = ("test_notebooks.py::test_notebook_runs[ablations]",
              "test_demo_llama.py::test_llama_demo_trains_the_vectors_and_beats_zero_shot",
              "test_cli_errors.py::test_sigterm_saves_exits_0_and_the_same_command_resumes_exactly",
              "test_main.py::test_readme_command_lines_end_to_end",
              "test_readme.py::test_adapter_bank_snippet_and_command",
              "test_install.py::test_wheel_installed_apart_runs_the_demo_and_a_gin_train")


def pytest_collection_modifyitems(items):
  """Moves the `SLOW_FIRST` tests to the front (same order in every xdist worker)."""
  items.sort(key=lambda item: not item.nodeid.endswith(SLOW_FIRST))


@pytest.fixture(autouse=True)
def _fresh_gin_config():
  """Each test starts with an empty, unlocked gin config (entry points finalize and lock it)."""
  if "gin" in sys.modules:
    sys.modules["gin"].clear_config()
  yield
  if "gin" in sys.modules:
    sys.modules["gin"].clear_config()
