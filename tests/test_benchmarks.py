"""Smoke test: the CPU benchmark runs end to end on the tiny preset (no timing assertions)."""

import json

import pytest

from benchmarks import bench_cpu, bench_gpu, memory, report

TINY = ["--preset", "tiny", "--batch-size", "2", "--input-length", "16", "--target-length", "4",
        "--iters", "1", "--warmup", "0", "--peak-size", "128"]


@pytest.fixture(scope="module")
def results():
  args = bench_cpu.build_parser().parse_args(
      TINY + ["--dtypes", "float32", "--skip", "memory"])
  return bench_cpu.run(args)


def test_report_has_every_section(results):
  text = report.render(results)
  for heading in ("#### (IA)^3 training", "Achieved FLOP/s", "#### Rank classification",
                  "#### Numerics", "#### Targets"):
    assert heading in text
  json.dumps(results, default=float)  # the --json output is serialisable


def test_both_frameworks_compute_the_same_losses(results):
  # Same initial weights and batch: ia3-jax and the PyTorch reference agree on
  # the loss at every step (the optimizers are the same Adafactor recipe).
  for loss in ("lm", "tfew"):
    torch_losses = results["train"][loss]["losses"]["torch"]
    jax_losses = results["train"][loss]["losses"]["jax_float32"]
    assert len(jax_losses) == len(torch_losses) == 2
    assert jax_losses == pytest.approx(torch_losses, rel=1e-4)
  preds = results["rank"]["predictions"]
  assert preds["jax_float32"] == preds["torch_reuse_encoder"] == preds["torch_per_choice"]


def test_flop_counts_are_positive(results):
  for r in results["train"].values():
    assert r["matmul_flops"] > 0
  assert results["rank"]["matmul_flops"] > 0
  assert results["peaks"]["xla_fp32"] > 0


def test_memory_subprocess_entry_point(capsys):
  memory.main(["--side", "jax", "--mode", "ia3", "--preset", "tiny", "--batch-size", "2",
               "--input-length", "16", "--target-length", "4", "--steps", "1"])
  line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("MEMORY_JSON ")][-1]
  out = json.loads(line.split(" ", 1)[1])
  assert out["xla"]["peak_bytes"] > 0 and out["num_trainable"] > 0


def test_gpu_variant_defaults():
  a = bench_gpu.build_parser().parse_args([])
  assert (a.preset, a.dtypes, a.batch_size, a.peak_reference) == (
      "t0_3b", "bfloat16", 8, "xla_bf16")


def test_real_size_memory_script_on_the_tiny_preset():
  """benchmarks/memory_real_size.py's compile-only measurement: int8 storage shrinks the
  step's arguments (the frozen params) and, with them, the whole buffer assignment."""
  from benchmarks import memory_real_size
  f32 = memory_real_size.step_memory("tiny", "float32", batch=2, inputs=16, targets=4)
  scanned = memory_real_size.step_memory("tiny", "int8", batch=2, inputs=16, targets=4,
                                         scan_layers=True)
  int8 = memory_real_size.step_memory("tiny", "int8", batch=2, inputs=16, targets=4)
  assert 0 < int8["frozen_gib"] < 0.35 * f32["frozen_gib"]
  assert int8["argument_gib"] < f32["argument_gib"] and int8["temp_gib"] > 0
  assert scanned["frozen_gib"] == pytest.approx(int8["frozen_gib"], rel=0.05)


def test_mixed_task_eval_on_the_tiny_preset():
  """benchmarks/mixed_task_eval.py: one compiled program for every task, the same predictions
  as merging or recompiling per task."""
  from benchmarks import mixed_task_eval
  args = mixed_task_eval.build_parser().parse_args(
      ["--preset", "tiny", "--tasks", "3", "--examples", "2", "--batch-size", "4",
       "--input-length", "16", "--target-length", "4", "--iters", "1", "--warmup", "0"])
  r = mixed_task_eval.run(args)
  assert r["mixed_compilations"] == 1
  assert r["agreement"] == {"merge": 1.0, "recompile": 1.0}
  assert set(r["speedup"]) == {"merge", "recompile"} and all(v > 0 for v in r["speedup"].values())
  assert "| recompile |" in mixed_task_eval.render(r)
