"""Float32 comparisons that hold on any CPU model and XLA version.

Two float32 computations of one value that sum in different orders (XLA:CPU's
kernels differ between CPU models and versions; a cache, a grouped product or
PyTorch reorder the sums) differ by a few float32 ulps (6e-8) of the largest
terms summed, times the number of terms and layers, not of each result: an
entry near zero carries the rounding of its large neighbours. So a comparison
takes a relative `rtol` plus an absolute tolerance `scale_tol` times the
largest |desired| (the magnitude compared), never an absolute bound alone.
"""

from __future__ import annotations

import numpy as np

# Same framework, other summation order: the tiny test models' logits (|x| <= ~10, a few
# layers of <= 64-term float32 sums) move by up to ~2e-6 of their scale between CPUs.
RTOL = 1e-5
SCALE_TOL = 1e-5
# PyTorch vs XLA (other kernels for matmul, exp and softmax as well as other orders): the
# tiny HF models' logits (|x| <= ~22) agree to <= 1e-6 of their scale on one CPU.
TORCH_RTOL = 2e-5
TORCH_SCALE_TOL = 2e-5


def assert_close(actual, desired, *, rtol: float = RTOL, scale_tol: float = SCALE_TOL,
                 err_msg: str = "") -> None:
  """`|actual - desired| <= rtol * |desired| + scale_tol * max|desired|`, elementwise (the
  max over finite entries; infinities must match exactly)."""
  desired = np.asarray(desired, np.float64)
  finite = np.abs(desired[np.isfinite(desired)])
  scale = float(finite.max()) if finite.size else 0.0
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol,
                             atol=scale_tol * scale, err_msg=err_msg)


def assert_close_to_torch(actual, desired, *, scale_tol: float = TORCH_SCALE_TOL,
                          err_msg: str = "") -> None:
  """`assert_close` with the PyTorch-vs-XLA tolerances."""
  assert_close(actual, desired, rtol=TORCH_RTOL, scale_tol=scale_tol, err_msg=err_msg)
