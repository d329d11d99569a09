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

import sys

import pytest


@pytest.fixture(autouse=True)
def _fresh_gin_config():
  """Each test starts with an empty, unlocked gin config (entry points finalize and lock it)."""
  if "gin" in sys.modules:
    sys.modules["gin"].clear_config()
  yield
  if "gin" in sys.modules:
    sys.modules["gin"].clear_config()
