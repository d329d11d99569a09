"""The ia3-jax side of the benchmarks, and the measuring tools both sides share.

Everything timed here goes through the library's real code paths:
`trainer.Trainer` (jitted step, grads w.r.t. the trainable params only,
Adafactor from `optimizers.OptimizerConfig`, `losses.LossConfig`) for
training, and `scoring.rank_classify` under `Trainer.classifier` for rank
classification. This module adds only the synthetic batches, the timers and
the FLOP/memory accounting.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax.model import config as config_lib
from ia3_jax.model import network, precision
from ia3_jax.objectives import losses
from ia3_jax.peft import ia3
from ia3_jax.train import assembly, host_memory, loop, optimizers, trainer

Batch = dict[str, np.ndarray]

IA3_TRAINABLE = ia3.IA3_PATTERN
FULL_TRAINABLE = assembly.ALL_PARAMS


# --------------------------------------------------------------------------- workload


@dataclasses.dataclass(frozen=True)
class Workload:
  """Model shape and batch geometry of one benchmark run."""

  preset: str = "t5_1_1_small"
  batch_size: int = 8
  input_length: int = 256
  target_length: int = 16
  max_choices: int = 4
  min_choices: int = 2
  dtype: str = "float32"      # activation / matmul dtype (params stay float32)
  seed: int = 0
  attention_impl: str = "einsum"              # T5Config.attention_impl
  dpa_implementation: Optional[str] = None    # T5Config.dpa_implementation

  @property
  def config(self) -> config_lib.T5Config:
    return config_lib.get_config(self.preset, dtype=self.dtype, attention_impl=self.attention_impl,
                                 dpa_implementation=self.dpa_implementation)

  def describe(self, with_dtype: bool = True) -> str:
    attention = self.attention_impl + (f" ({self.dpa_implementation})"
                                       if self.dpa_implementation else "")
    return (f"{self.preset}, batch {self.batch_size}, {self.input_length} input tokens, "
            f"{self.min_choices}-{self.max_choices} choices of <= {self.target_length} tokens, "
            f"attention {attention}" + (f", {self.dtype}" if with_dtype else ""))


def make_batch(w: Workload, vocab_size: Optional[int] = None) -> Batch:
  """A rank-classification batch like the feature converter's (0 = padding, 1 = EOS).

  Inputs have random lengths in [L/2, L]; each example has between
  `min_choices` and `max_choices` real choices (the rest are padding choices
  with choice_mask 0), each 1..T-1 random tokens plus EOS.
  """
  rng = np.random.default_rng(w.seed)
  vocab = vocab_size or w.config.vocab_size
  b, l, c, t = w.batch_size, w.input_length, w.max_choices, w.target_length
  enc = rng.integers(2, vocab, (b, l))
  lengths = rng.integers(l // 2, l + 1, b)
  lengths[0] = l
  enc = np.where(np.arange(l)[None] < lengths[:, None] - 1, enc, 0)
  enc[np.arange(b), lengths - 1] = 1
  num_choices = rng.integers(w.min_choices, c + 1, b)
  choices = np.zeros((b, c, t), np.int64)
  for i in range(b):
    for j in range(num_choices[i]):
      n = rng.integers(1, t)
      choices[i, j, :n] = rng.integers(2, vocab, n)
      choices[i, j, n] = 1
  choice_mask = (np.arange(c)[None] < num_choices[:, None]).astype(np.int32)
  label = rng.integers(0, num_choices)
  return {"encoder_input_tokens": enc.astype(np.int32), "choice_tokens": choices.astype(np.int32),
          "choice_mask": choice_mask, "label": label.astype(np.int32),
          "example_mask": np.ones((b,), np.int32)}


def correct_choice_batch(batch: Batch) -> Batch:
  """The batch reduced to its labelled choice: a plain seq2seq LM batch (C = 1)."""
  rows = np.arange(batch["label"].shape[0])
  out = dict(batch)
  out["choice_tokens"] = batch["choice_tokens"][rows, batch["label"]][:, None]
  out["choice_mask"] = np.ones((rows.size, 1), np.int32)
  out["label"] = np.zeros_like(batch["label"])
  return out


LM_ONLY = losses.LossConfig(lm_weight=1.0, ul_weight=0.0, ln_weight=0.0)
TFEW = losses.LossConfig()


# --------------------------------------------------------------------------- timing


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def interleaved_times(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1,
                      iters: int = 3) -> dict[str, list[float]]:
  """Seconds per call of each fn, run alternately (a, b, a, b, ...) after warm-up.

  Alternating keeps a slow drift in machine load from favouring one side.
  Each fn must block until its work is done.
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(iters):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def matmul_peak(dtype: Any = jnp.float32, n: int = 2048, repeats: int = 7) -> float:
  """Best FLOP/s of an n^3 `jnp.dot` under XLA (float32 accumulation), best of `repeats`."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  block(f(a, b))
  best = min(_timed(lambda: block(f(a, b))) for _ in range(repeats))
  return 2.0 * n ** 3 / best


def _timed(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


# --------------------------------------------------------------------------- FLOPs


def _subjaxprs(eqn) -> list[tuple[Any, int]]:
  """(sub-jaxpr, times it runs) for every jaxpr nested in an equation's params."""
  out = []
  mult = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        out.append((v.jaxpr, mult))
      elif isinstance(v, jax.extend.core.Jaxpr):
        out.append((v, mult))
  return out


def _jaxpr_matmul_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      k = float(np.prod([lhs[i] for i in lc])) if lc else 1.0
      total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * k
    subs = _subjaxprs(eqn)
    if eqn.primitive.name == "cond":  # one branch runs
      total += max((_jaxpr_matmul_flops(j) * m for j, m in subs), default=0.0)
    else:
      total += sum(_jaxpr_matmul_flops(j) * m for j, m in subs)
  return total


def jaxpr_matmul_flops(jaxpr: Any) -> float:
  """Matmul FLOPs (2 per multiply-add) of a (closed) jaxpr.

  Exact for the program as written: every dot_general, including those JAX's
  autodiff emits for the backward pass (none for frozen weights), scan bodies
  times their length. Elementwise work is not counted.
  """
  return _jaxpr_matmul_flops(getattr(jaxpr, "jaxpr", jaxpr))


def matmul_flops(fn: Callable, *args) -> float:
  """`jaxpr_matmul_flops` of `fn(*args)`."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args))


def xla_flops(compiled) -> float:
  """`flops` of XLA's cost analysis of a compiled executable (all ops, after fusion)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float(ca.get("flops", float("nan")))


def memory_stats(compiled) -> dict[str, int]:
  """XLA's buffer assignment: argument, output, alias (donated) and temp bytes.

  `peak_bytes` = argument + output - alias + temp: every buffer the
  executable needs at once in the worst case (inputs and outputs live for
  the whole call; donated inputs share their output buffers).
  """
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  out["peak_bytes"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def device_memory_stats() -> Optional[dict]:
  """The first device's allocator stats (GPU/TPU; None on CPU, which has none)."""
  try:
    return jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 -- backends without stats raise or return None
    return None


def peak_rss_bytes() -> int:
  """Peak resident set size of this process's address space so far.

  Linux `VmHWM` (/proc/self/status): unlike `ru_maxrss`, which a child
  inherits from its parent across fork and exec, it starts afresh in a new
  program. Falls back to ru_maxrss elsewhere.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- training


def random_base(w: Workload) -> dict[str, Any]:
  """Random params of `w`'s plain network, initialised in the scanned layer layout.

  One random program per stacked param: T0-3B's init compiles in about 2 s on
  2 CPU cores, against 50 s for the unrolled model's ~400 (the likely reason
  an H200 run of the trainer's own init did not reach its first step in two
  minutes). `Trainer.init_state` takes either layout. (While the trainer
  unrolls it, both copies are alive: not for peak-RSS runs.)
  """
  model = network.Transformer(w.config, blocks=network.Blocks(scan_layers=True))
  return jax.jit(lambda rng: network.init_params(model, rng))(jax.random.key(w.seed))


class JaxTraining:
  """One `trainer.Trainer` with its state and a fixed device batch, ready to step.

  trainable: `IA3_TRAINABLE` ((IA)^3 vectors only; the model gets (IA)^3
  blocks) or `FULL_TRAINABLE` (full fine-tuning of the plain network).
  `base`: params of the base network (e.g. converted from the PyTorch
  reference so both sides start from the same weights, or `random_base(w)`);
  the trainer's random init when None.
  `frozen_dtype`: storage of the frozen base (`storage.FrozenStorage`).
  """

  def __init__(self, w: Workload, batch: Batch, *, trainable: str = IA3_TRAINABLE,
               loss: losses.LossConfig = TFEW, base: Optional[Mapping[str, Any]] = None,
               learning_rate: float = 3e-3, remat: str = "none", frozen_dtype: str = "float32"):
    self.spec = assembly.ModelSpec(
        w.config, peft=ia3.IA3Config() if trainable == IA3_TRAINABLE else None,
        trainable=trainable, remat=remat, frozen_dtype=frozen_dtype)
    opt = optimizers.OptimizerConfig(learning_rate=learning_rate, schedule="constant")
    self.trainer = trainer.Trainer(assembly.layout(self.spec, seed=w.seed),
                                   optimizer=opt.build(), loss=loss, enable_dropout=False)
    self.model = self.trainer.model
    self.state = self.trainer.init_state(base)
    self.batch = self.trainer.partitioner.shard_batch(self.trainer.model_batch(batch),
                                                      batch["label"].shape[0])
    # The train loop's step (with its finite check), on a batch sharded once.
    self.loop = loop.TrainLoop(self.trainer, num_steps=2**31 - 1,
                               batch_size=batch["label"].shape[0])
    self.loop.add_hook(loop.check_finite("benchmark step"))
    self.last_metrics: Optional[dict] = None

  def step(self) -> float:
    """One update; returns the loss of the params before it (blocks)."""
    info = self.loop.step(self.state, self.batch)
    self.state, self.last_metrics = info.state, dict(info.metrics)
    return self.last_metrics["loss"]

  def compiled(self):
    return self.trainer.lower_step(self.state, self.batch).compile()

  def matmul_flops(self) -> float:
    """Matmul FLOPs of one step, counted on a float32 twin of the model.

    (The bf16 path's custom VJP also emits cotangent products for frozen
    kernels that XLA then drops; the float32 jaxpr holds only live ones, and
    the same products as every dtype.)
    """
    twin = self.trainer
    if self.model.config.dtype != "float32":
      spec = self.spec.replace(config=self.spec.config.replace(  # the einsum core: the same
          dtype="float32", attention_impl="einsum", dpa_implementation=None))  # products
      twin = trainer.Trainer(assembly.layout(spec, seed=0), optimizer=self.trainer.optimizer,
                             loss=self.trainer.loss, enable_dropout=False)
    return jaxpr_matmul_flops(twin.trace_step(self.state, self.batch).jaxpr)

  @property
  def num_trainable(self) -> int:
    return self.trainer.layout.num_params()["trainable"]


# --------------------------------------------------------------------------- rank classification


class JaxRankClassification:
  """`scoring.rank_classify` (encoder once per example) under `Trainer.classifier`'s jit."""

  def __init__(self, training: JaxTraining, batch: Batch):
    self.training = training
    b = batch["label"].shape[0]
    self.classifier = training.trainer.classifier(b, length_normalize=True)
    self.inputs = {k: batch[k] for k in ("encoder_input_tokens", "choice_tokens", "choice_mask")}
    self.params = training.state.params

  def __call__(self) -> dict[str, np.ndarray]:
    return self.classifier(self.params, self.inputs)

  def compiled(self):
    return self.classifier.lower(self.params, self.inputs).compile()

  def matmul_flops(self) -> float:
    from ia3_jax.objectives import scoring
    cfg = self.training.model.config
    model = network.Transformer(cfg.replace(dtype="float32", attention_impl="einsum",
                                             dpa_implementation=None),
                                blocks=self.training.model.blocks)
    with self.training.trainer.partitioner.context():
      return matmul_flops(lambda p, x: scoring.rank_classify(model, p, x), self.params,
                          self.inputs)


# --------------------------------------------------------------------------- machine


def add_host_memory_flag(ap: argparse.ArgumentParser) -> None:
  """`--host-memory`, which `set_host_memory` applies."""
  ap.add_argument("--host-memory", choices=host_memory.MODES, default="reuse",
                  help="'reuse' (the default, as `python -m ia3_jax.main` does): XLA:CPU steps "
                  "reuse their host buffers (`train.host_memory`; PyTorch, in the same process, "
                  "runs under the same malloc settings); 'system': malloc and JAX's dispatch as "
                  "they are")


def set_host_memory(mode: str) -> str:
  """`host_memory.reuse_step_buffers` for mode "reuse" (call it before anything starts the
  backend); the line the report prints."""
  if mode == "system":
    return "host memory: left to the system (--host-memory system)"
  return host_memory.reuse_step_buffers()


def machine_info() -> dict[str, Any]:
  cpu = precision.host_cpu()
  flags = {f: f in cpu.flags for f in precision.REPORTED_CPU_FLAGS}
  return {"cpu": cpu.model if cpu.model != "?" else (platform.processor() or "?"),
          "cpu_flags": flags, "cpu_summary": cpu.describe(), "native_bf16": cpu.native_bf16,
          "cores": os.cpu_count(), "avx512_bf16": flags["avx512_bf16"],
          "amx": flags["amx_bf16"], "jax": jax.__version__,
          "jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "python": platform.python_version()}


def plan_dtypes(requested: Sequence[str], *, allow_emulated_bf16: bool = False,
                backend: Optional[str] = None, cpu_flags: Optional[Sequence[str]] = None
                ) -> tuple[list[str], list[str]]:
  """(the ia3-jax dtypes to time, one note per decision) for `--dtypes`.

  "auto" becomes its `precision.resolve_dtype` choice. bfloat16 is compared
  with `torch.autocast(bfloat16)`, like for like, only where the hardware
  runs bf16 natively: on a CPU without avx512_bf16 / amx_bf16 both sides
  would emulate it, so it is skipped (unless `allow_emulated_bf16`).
  """
  backend = backend or jax.default_backend()
  flags = precision.host_cpu().flags if cpu_flags is None else frozenset(cpu_flags)
  out, notes = [], []
  for d in requested:
    name, why = precision.resolve_dtype(d, backend=backend, cpu_flags=flags)
    if d == precision.AUTO:
      notes.append(f"activations: {name} ({why})")
    native, _ = precision.resolve_dtype(precision.AUTO, backend=backend, cpu_flags=flags)
    if name == "bfloat16" and native != "bfloat16":
      if not allow_emulated_bf16:
        notes.append("bf16 skipped: this CPU has neither avx512_bf16 nor amx_bf16, so "
                     "bfloat16 would be emulated on both sides (not like for like)")
        continue
      notes.append("bf16 run although emulated on this CPU (--allow-emulated-bf16): a smoke run")
    if name not in out:
      out.append(name)
  return out, notes


def log(msg: str) -> None:
  """A time-stamped progress line on stderr (long benchmark runs)."""
  print(f"[bench {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def load_average() -> tuple[float, float, float]:
  return os.getloadavg()


def busy_processes(limit: int = 5) -> list[str]:
  """The top CPU users besides this process (for the report's load note)."""
  try:
    out = subprocess.run(["ps", "-eo", "pcpu,pid,comm,args", "--sort=-pcpu"],
                         capture_output=True, text=True, timeout=5).stdout.splitlines()[1:]
  except (OSError, subprocess.SubprocessError):
    return []
  me = str(os.getpid())
  rows = [l.strip()[:100] for l in out if l.split()[1] != me]
  return [r for r in rows if float(r.split()[0]) >= 5.0][:limit]
