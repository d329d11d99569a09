"""Smoke test: the CPU benchmark runs end to end on the tiny preset (no timing assertions)."""

import collections
import json
import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks import attention_check, bench_cpu, bench_gpu, harness, memory, report

REPO = pathlib.Path(__file__).resolve().parents[1]

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
    torch_losses = results["train"][loss]["losses"]["torch_float32"]
    jax_losses = results["train"][loss]["losses"]["jax_float32"]
    assert len(jax_losses) == len(torch_losses) == 2
    assert jax_losses == pytest.approx(torch_losses, rel=1e-4)
  preds = results["rank"]["predictions"]
  assert (preds["jax_float32"] == preds["torch_reuse_encoder_float32"]
          == preds["torch_per_choice_float32"])


def _cells(text: str, start: str) -> list[str]:
  row = [l for l in text.splitlines() if l.startswith(start)][0]
  return [c.strip() for c in row.strip("|").split("|")]


def test_tables_compare_medians_and_fastest_iterations(results):
  """Training rows and ia3-jax's rank classification row: the ratio of the medians and of each
  side's fastest iteration."""
  seconds = {"torch_float32": [4.0, 2.0, 9.0], "jax_float32": [1.0, 1.6, 1.5]}
  rank_seconds = {**results["rank"]["seconds"], "torch_reuse_encoder_float32": [4.0, 2.0, 9.0],
                  "jax_float32": [1.0, 1.6, 1.5]}
  fake = {**results, "train": {"lm": {**results["train"]["lm"], "seconds": seconds}},
          "rank": {**results["rank"], "seconds": rank_seconds}}
  text = report.render(fake)
  # 4.0 / 1.5 (medians); 2.0 / 1.0 (fastest)
  assert _cells(text, "| L_LM only")[2:6] == ["0.250", "0.667", "2.67x", "2.00x"]
  assert _cells(text, "| ia3-jax (`scoring.rank_classify`), fp32")[3:5] == ["2.67x", "2.00x"]
  assert "fastest vs fastest" in report.render(results)


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
  assert (a.preset, a.dtypes, a.batch_size, a.peak_reference, a.attention_impl) == (
      "t0_3b", "bfloat16", 8, "xla_bf16", "dot_product_attention")


def test_report_names_the_cpu_flags_and_compares_like_for_like(results):
  text = report.render(results)
  flags = results["machine"]["cpu_flags"]
  assert set(flags) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
  assert results["machine"]["cpu_summary"] in text
  assert "ia3-jax fp32 vs PyTorch fp32" in text and "| fp32 / fp32 |" in text


@pytest.mark.parametrize("flags,backend,want,skipped", [
    ((), "cpu", ["float32"], True),
    (("avx512_bf16",), "cpu", ["float32", "bfloat16"], False),
    (("amx_bf16",), "cpu", ["float32", "bfloat16"], False),
    ((), "gpu", ["float32", "bfloat16"], False)])
def test_bf16_is_timed_only_where_native(flags, backend, want, skipped):
  """bf16 vs torch.autocast(bf16) only where the hardware has bf16 kernels; "auto" resolves
  (and says why), and a repeated dtype is timed once."""
  dtypes, notes = harness.plan_dtypes(["float32", "bfloat16", "auto"], backend=backend,
                                      cpu_flags=flags)
  assert dtypes == want
  assert any("bf16 skipped" in n for n in notes) == skipped
  assert any(n.startswith("activations: ") and "dtype='auto'" in n for n in notes)
  forced, _ = harness.plan_dtypes(["bfloat16"], backend="cpu", cpu_flags=(),
                                  allow_emulated_bf16=True)
  assert forced == ["bfloat16"]


def test_gpu_variant_runs_on_cpu_with_dot_product_attention(tmp_path, monkeypatch):
  """bench_gpu.py end to end on CPU (tiny sizes): bf16 ia3-jax with its attention through
  jax.nn.dot_product_attention against torch.autocast(bf16); the report is written."""
  import jax
  calls, real = [], jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  out = tmp_path / "gpu.md"
  assert bench_gpu.main(TINY + ["--skip", "memory", "--allow-emulated-bf16", "--torch-threads",
                                "1", "--out", str(out)]) == 0
  text = out.read_text()
  assert calls and "attention dot_product_attention" in text
  assert "| bf16 activations / torch.autocast(bf16) |" in text
  assert "PyTorch, encoder reused (T-Few repo), bf16" in text


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


@pytest.mark.parametrize("rows,batch_size,want", [(8, 32, 8), (16, 32, 16), (32, 32, 32),
                                                  (40, 32, 20), (64, 32, 32), (33, 32, 17)])
def test_mixed_task_eval_splits_rows_evenly(rows, batch_size, want):
  """Mixed batches hold the real rows, split evenly: 8 tasks x 1 example are one batch of 8,
  not 8 rows padded to 32."""
  from benchmarks import mixed_task_eval
  assert mixed_task_eval.mixed_batch_rows(rows, batch_size) == want


def test_mixed_task_eval_sweeps_examples_per_task(tmp_path, capsys):
  """`--examples 1,3` measures both with the model loaded once; no padding rows, the same
  predictions as merging per task, and batches of one shape compile once."""
  from benchmarks import mixed_task_eval
  parser = mixed_task_eval.build_parser()
  assert parser.parse_args([]).examples == [8]
  assert parser.parse_args(["--examples", "1,2,4,8"]).examples == [1, 2, 4, 8]
  for bad in ("0", "two", ","):
    with pytest.raises(SystemExit):
      parser.parse_args(["--examples", bad])
  out = tmp_path / "sweep.json"
  assert mixed_task_eval.main(
      ["--preset", "tiny", "--tasks", "3", "--examples", "1,3", "--batch-size", "4",
       "--input-length", "16", "--target-length", "4", "--iters", "1", "--warmup", "0",
       "--recompile-iters", "0", "--json", str(out)]) == 0
  results = json.loads(out.read_text())
  assert [r["examples_per_task"] for r in results] == [1, 3]
  assert [(r["mixed_batches"], r["mixed_batch_rows"], r["mixed_padding_rows"])
          for r in results] == [(1, 3, 0), (3, 3, 0)]
  assert [r["mixed_compilations"] for r in results] == [1, 0]  # 3-row batches both times
  assert all(r["agreement"] == {"merge": 1.0} for r in results)
  assert all(r["merge_split_s"]["merge"] > 0 for r in results)
  text = capsys.readouterr().out
  assert "Sweep: tiny, 3 tasks" in text and "| 3 | 3 x 3 |" in text


def test_attention_check_compares_every_core_with_einsum(tmp_path, capsys):
  """benchmarks/attention_check.py on CPU (tiny): einsum and dot_product_attention (xla) give
  the same loss, logits and gradients; the table and the JSON name every core."""
  out = tmp_path / "attn.json"
  assert attention_check.main(["--preset", "tiny", "--batch-size", "4", "--input-length", "24",
                               "--target-length", "6", "--iters", "1", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(r["attention_impl"], r["dpa_implementation"]) for r in rows] == [
      ("einsum", None), ("dot_product_attention", "xla")]
  assert rows[1]["logits_rel_diff"] < 1e-5 and rows[1]["grads_rel_diff"] < 1e-5
  assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-6)
  assert "| dot_product_attention (xla) |" in capsys.readouterr().out
  assert attention_check.cores("gpu")[-1] == ("dot_product_attention", "cudnn")


def test_profile_step_charges_the_step_to_its_matmuls(tmp_path, capsys):
  """benchmarks/profile_step.py on CPU (tiny): thunk times charged to HLO instructions, the
  matmuls' FLOPs from their dots; the trace and the compiled HLO kept with --trace-dir."""
  from benchmarks import profile_step
  assert profile_step.main(["--preset", "tiny", "--batch-size", "2", "--input-length", "16",
                            "--target-length", "4", "--steps", "1", "--top", "3",
                            "--trace-dir", str(tmp_path)]) == 0
  text = capsys.readouterr().out
  assert "| matmul |" in text and "matmul thunks:" in text and "untraced" in text
  assert float(re.search(r"executor / module ([0-9.]+) ms", text).group(1)) > 0
  assert (tmp_path / "step.hlo.txt").stat().st_size > 0
  assert list(tmp_path.glob("**/*.xplane.pb"))


def test_profile_step_finds_the_step_when_dispatch_is_synchronous():
  """With `--host-memory reuse` (a fresh process: it applies) XLA:CPU runs the step on the
  Python thread, whose executor events then give the step's wall time."""
  out = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--preset", "tiny",
                        "--batch-size", "2", "--input-length", "16", "--target-length", "4",
                        "--steps", "1", "--top", "3"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "host memory: step buffers reused" in out.stdout
  assert float(re.search(r"executor / module ([0-9.]+) ms", out.stdout).group(1)) > 0


def test_profile_step_reads_cublas_gemms_and_cudnn_attention():
  """GPU HLO: a cuBLAS gemm call (tuple result) gets 2 * M * N * K FLOPs from its backend
  config's contracting dims; cuDNN's fused attention is its own kind."""
  from benchmarks import profile_step
  hlo = ('ENTRY %main (p.1: bf16[8,4], q.2: bf16[4,16]) -> bf16[8,16] {\n'
         '  %p.1 = bf16[8,4]{1,0} parameter(0)\n'
         '  %q.2 = bf16[4,16]{1,0} parameter(1)\n'
         '  %custom-call.3 = (bf16[8,16]{1,0}, s8[1024]{0}) custom-call(%p.1, %q.2), '
         'custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/encoder/mlp/wi_0/dot"}, '
         'backend_config={"gemm_backend_config":{"dot_dimension_numbers":'
         '{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}\n'
         '  %custom-call.4 = (bf16[8,16]{1,0}, u8[0]{0}) custom-call(%p.1, %q.2), '
         'custom_call_target="__cudnn$fmhaScaleBiasSoftmax"\n'
         '}\n')
  instrs, comp_flops = profile_step.parse_hlo(hlo)
  gemm = instrs["custom-call.3"]
  assert gemm["flops"] == 2 * 8 * 16 * 4 and gemm["shape"] == (8, 16)
  text = profile_step.report({"per": collections.Counter({"custom-call.3": 1000,
                                                          "custom-call.4": 3000}),
                              "instrs": instrs, "comp_flops": comp_flops, "wall_ns": 4000.0,
                              "overlapped_ns": 0.0, "host_s": 5e-6}, top=2)
  assert "| fused attention | 0.0 | 75.0% |" in text and "| matmul | 0.0 | 25.0% |" in text
  assert "| encoder mlp wi_0 fwd | 0.0 | 0.00 | 1 |" in text  # 1024 FLOP in 1000 ns


def test_profile_step_shares_the_time_of_concurrent_ops():
  """Ops that run at once share each instant: two 2 ms products side by side cost 1 ms each,
  a thunk on two threads counts once, and the charges add up to the busy wall time."""
  from benchmarks import profile_step
  shares, overlapped = profile_step.wall_shares([
      (0.0, 2.0, "wi_0"), (0.0, 2.0, "wi_1"),        # concurrent: 1 each
      (2.0, 5.0, "wo"), (2.5, 4.0, "wo"),            # one thunk on two threads: 3
      (4.0, 6.0, "gelu"), (9.0, 10.0, "norm")])      # gelu overlaps wo for 1; 3 idle
  assert shares == pytest.approx({"wi_0": 1.0, "wi_1": 1.0, "wo": 2.5, "gelu": 1.5, "norm": 1.0})
  assert overlapped == pytest.approx(3.0) and sum(shares.values()) == pytest.approx(7.0)


def test_profile_step_reads_thunks_on_the_callers_thread():
  """Synchronous dispatch: the Python thread launches the step, runs some thunks itself and
  waits for the pool's; its own thunks count as ops, its Python frames do not."""
  from types import SimpleNamespace as NS
  from benchmarks import profile_step
  ev = lambda name, start, dur: NS(name=name, start_ns=start, duration_ns=dur)  # noqa: E731
  data = NS(planes=[NS(name="/host:CPU", lines=[
      NS(name="python", events=[ev("$train.py:10 step", 0, 100), ev("PjitFunction(step)", 1, 98),
                                ev("ThunkExecutor::Execute", 2, 20), ev("%fusion.1", 5, 10),
                                ev("ThunkExecutor::Execute (wait for completion)", 22, 70)]),
      NS(name="tf_XLAEigen/1", events=[ev("ThunkExecutor::Execute", 20, 70),
                                       ev("ynn_fusion.2", 25, 60), ev("end: ynn_fusion.2", 85, 1)])])])
  per, wall, overlapped = profile_step.op_times(data, 1, {"fusion.1", "ynn_fusion.2"})
  assert per == {"fusion.1": 10, "ynn_fusion.2": 60} and wall == 90 and overlapped == 0


def test_step_sweep_times_each_batch_and_frozen_storage(tmp_path, capsys):
  """benchmarks/step_sweep.py on CPU (tiny): a row per (batch size, frozen dtype), twice the
  FLOPs for twice the batch."""
  from benchmarks import step_sweep
  out = tmp_path / "sweep.json"
  assert step_sweep.main(["--preset", "tiny", "--batch-sizes", "2,4", "--frozen-dtypes",
                          "bfloat16", "--input-length", "16", "--target-length", "4", "--iters",
                          "1", "--warmup", "0", "--peak-size", "128", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(r["batch_size"], r["frozen_dtype"]) for r in rows] == [(2, "bfloat16"), (4, "bfloat16")]
  assert rows[1]["matmul_gflop"] == pytest.approx(2 * rows[0]["matmul_gflop"], rel=0.05)
  assert all(r["s_per_step"] > 0 and r["gflops"] > 0 for r in rows)
  assert "| 4 | bfloat16 |" in capsys.readouterr().out
