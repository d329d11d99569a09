"""The bundled demo: zero-shot vs T-Few on held-out tasks, with ia3-jax's own tiny T5.

    python -m ia3_jax.main --gin_file=demo.gin                 # the README's main job
    python -m ia3_jax.demo --model_dir /tmp/ia3_jax_demo       # the same without gin

The model in `ia3_jax/assets/demo/` is a tiny T5 1.1-style encoder-decoder that
`scripts/train_demo_model.py` trains from scratch, T0-style, on the training
families of the synthetic suite (`ia3_jax.data.synthetic`). The demo evaluates it
zero-shot on the HELD-OUT families (every template, rank classification),
then runs the T-Few recipe on k-shot splits for several seeds: (IA)^3 on
k, v and ff, L_LM + L_UL + L_LN, Adafactor with linear warmup (6%) and decay,
one random template per example. It evaluates again and reports, per task,
the median accuracy over templates (zero-shot; T-Few per seed, and their mean
over seeds), the trainable parameter count and the size of the (IA)^3
adapter on disk; it writes TensorBoard logs, `results.json` and `results.png`
into `model_dir`.

Differences from the paper's recipe, for the time budget (a few minutes on
two CPU cores): `DEMO_RECIPE["train_steps"]` steps instead of 1000 with a
correspondingly larger learning rate (the product matters for how far the
vectors move), dropout off (the model was pre-trained without it), shorter
sequences. Everything else is the recipe.

`FewShotRunner` is the reusable piece (the notebooks build their ablations on
it): one jit-compiled `trainer.Trainer` for a method and loss, fitted by the
train loop (`loop.TrainLoop`) on any few-shot task and evaluated on any
evaluation task of `ia3_jax.tasks.demo`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ia3_jax import files
from ia3_jax.data import synthetic
from ia3_jax.errors import ConfigError
from ia3_jax.model import precision
from ia3_jax.model.config import T5Config
from ia3_jax.model.decoder_config import DecoderConfig
from ia3_jax.objectives import metrics

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# The bundled models, one per family, sharing one 512-piece SentencePiece vocabulary.
BUNDLED_MODELS = {"t5": os.path.join(_ASSETS, "demo"),
                  "llama": os.path.join(_ASSETS, "demo_llama")}
BUNDLED_MODEL_DIR = BUNDLED_MODELS["t5"]

# The bundled models' shapes and how scripts/train_demo_model.py trains them.
MODEL_SHAPE = dict(emb_dim=128, num_heads=4, head_dim=32, num_encoder_layers=3,
                   num_decoder_layers=3, mlp_dim=512, mlp_activations=("gelu", "linear"),
                   logits_via_embedding=False, relative_attention_num_buckets=32,
                   relative_attention_max_distance=64, dropout_rate=0.0)
# Llama architecture: grouped-query attention (2 kv heads for 4 query heads), SwiGLU, rotary.
DECODER_SHAPE = dict(emb_dim=128, num_heads=4, num_kv_heads=2, head_dim=32, num_layers=4,
                     mlp_dim=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                     tie_word_embeddings=False, max_position_embeddings=256)
PRETRAIN = dict(train_steps={"t5": 4000, "llama": 3000}, batch_size=32, learning_rate=1e-3,
                vocab_size=512, feature_lengths={"inputs": 64, "targets": 8})

# The demo's T-Few run (see the module docstring for the differences from the paper).
DEMO_RECIPE = dict(num_shots=32, seeds=(0, 1, 2), train_steps=300, batch_size=8,
                   learning_rate=3e-2, warmup_ratio=0.06, lm_weight=1.0, ul_weight=1.0,
                   ln_weight=1.0, sites=("k", "v", "ff"), dropout_rate=0.0)
FEATURE_LENGTHS = {"inputs": 64, "targets": 8}
# Shorter inputs where a family's prompts are short (the longest is about 25
# pieces): half the compute per step. Longer inputs are counted and reported.
INPUT_LENGTHS = {"edible": 32, "alive": 32}
EVAL_BATCH_SIZE = 100


def bundled_model_path(model: str) -> str:
  """The directory of the bundled `model` ("t5" or "llama")."""
  if model not in BUNDLED_MODELS:
    raise ConfigError(f"DEMO_MODEL={model!r}: choose one of {', '.join(BUNDLED_MODELS)}")
  return BUNDLED_MODELS[model]


def demo_model_config(vocab_size: int, model: str = "t5") -> T5Config | DecoderConfig:
  """The shape of the bundled `model` ("t5" or "llama") for a vocabulary of `vocab_size`."""
  bundled_model_path(model)  # a known model
  if model == "t5":
    return T5Config(vocab_size=vocab_size, **MODEL_SHAPE)
  return DecoderConfig(vocab_size=vocab_size, **DECODER_SHAPE)


def load_model(path: str | os.PathLike = BUNDLED_MODEL_DIR):
  """(config, params as a host tree, seqio vocabulary) of an HF directory of either family."""
  from ia3_jax.interop import hf_checkpoints, hf_families  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no model directory; the bundled demo models are "
                            "regenerated by scripts/train_demo_model.py")
  config, params = hf_families.of_dir(path).load(path)
  return config, params, hf_checkpoints.load_vocabulary(path)


def register_tasks(vocabulary, *, families: Sequence[str], seeds: Sequence[int],
                   num_shots: int, eval_size: Optional[int] = None,
                   train_size: Optional[int] = None) -> None:
  """Registers the demo's seqio tasks for `families` (`ia3_jax.tasks.demo`).

  eval_size: evaluation examples per held-out family; train_size: examples per
  training family (None: the defaults of `ia3_jax.tasks.demo`).
  """
  from ia3_jax.tasks import demo as demo_tasks  # pylint: disable=g-import-not-at-top
  kwargs = {} if eval_size is None else {"eval_size": eval_size}
  if train_size is not None:
    kwargs["train_size"] = train_size
  demo_tasks.register(vocabulary, families=tuple(families), seeds=tuple(seeds),
                      num_shots=num_shots, **kwargs)


def _num_choices(family: str) -> int:
  return synthetic.FAMILIES[family].num_choices


def feature_lengths(family: str) -> dict[str, int]:
  """Static batch shapes of `family`'s rank-classification batches."""
  return dict(FEATURE_LENGTHS, inputs=INPUT_LENGTHS.get(family, FEATURE_LENGTHS["inputs"]),
              num_choices=_num_choices(family))


# --------------------------------------------------------------------------- runner


class FewShotRunner:
  """Fits one fine-tuning method on few-shot demo tasks and evaluates it.

  Holds a `trainer.Trainer` on the layout of an `assembly.ModelSpec` (one jit
  compilation per batch shape, reused by every fit), the base params, and the method.

  Args:
    config: model config of either family (of the base params).
    base_params: host param tree of the base model.
    method: a name of `ia3_jax.peft.registry` ("ia3", "full", "lora", ...).
    method_kwargs: the method's hyper-parameters (e.g. sites for ia3, rank for lora).
    loss: T-Few loss weights.
    optimizer: optimizer config; `total_steps` is set to `train_steps`.
    train_steps, batch_size: per fit.
    dropout_rate: dropout during training (0 keeps the pre-training setting).
    seed: init of new params and dropout.
    frozen_dtype: storage of the frozen base ("float32", "bfloat16", "int8", "int4").
  """

  def __init__(self, config: T5Config | DecoderConfig, base_params: Mapping[str, Any], *,
               method: str = "ia3", method_kwargs: Optional[Mapping[str, Any]] = None,
               loss=None, optimizer=None,
               train_steps: int = DEMO_RECIPE["train_steps"],
               batch_size: int = DEMO_RECIPE["batch_size"], dropout_rate: float = 0.0,
               eval_batch_size: int = EVAL_BATCH_SIZE, seed: int = 0,
               frozen_dtype: str = "float32"):
    from ia3_jax.objectives import losses
    from ia3_jax.train import assembly, optimizers, trainer  # pylint: disable=g-import-not-at-top
    from ia3_jax.peft import registry  # pylint: disable=g-import-not-at-top
    self.method = registry.make(method, **dict(method_kwargs or {}))
    self.loss = loss or losses.LossConfig()
    optimizer = optimizer or optimizers.OptimizerConfig()
    self.optimizer = dataclasses.replace(optimizer, total_steps=train_steps)
    self.train_steps = train_steps
    self.batch_size = batch_size
    self.eval_batch_size = eval_batch_size
    self.spec = assembly.ModelSpec(config, peft=self.method, dropout_rate=dropout_rate,
                                   frozen_dtype=frozen_dtype)
    self.layout = assembly.layout(self.spec, seed=seed)
    self.model = self.layout.model
    self.config = self.model.config
    self.trainer = trainer.Trainer(
        self.layout, optimizer=self.optimizer.build(), loss=self.loss,
        enable_dropout=dropout_rate > 0, learning_rate_fn=self.optimizer.learning_rate_fn())
    self.base_params = base_params
    self._initial = None

  @property
  def num_trainable(self) -> int:
    return self.layout.num_params()["trainable"]

  @property
  def num_total(self) -> int:
    return self.layout.num_params()["total"]

  def initial_params(self, init: Optional[Mapping[str, Any]] = None):
    """Base params with the method's params at their initial value (or `init`'s values)."""
    if init is not None:
      return self.layout.place_params(self._with_method_params(init))
    if self._initial is None:
      self._initial = self.layout.place_params(self._with_method_params())
    return self._initial

  def _with_method_params(self, init: Optional[Mapping[str, Any]] = None):
    """Host tree: base params, the method's new params (initialised), `init` on top."""
    from ia3_jax.model import params as params_lib  # pylint: disable=g-import-not-at-top
    full = self.layout.init_params(self.base_params)
    if init is not None:
      flat = params_lib.flatten(full)
      for path, value in params_lib.flatten(init).items():
        if path not in flat:
          raise KeyError(f"init param {path} is not part of the {self.method.name} model")
        flat[path] = value
      full = params_lib.unflatten(flat)
    return full

  def evaluate(self, params, family: str) -> dict[str, float]:
    """Rank-classification accuracy of every template of `family` on its evaluation split."""
    from ia3_jax.data import batches, registration  # pylint: disable=g-import-not-at-top
    name = f"demo_{family}_eval"
    stream = batches.get_batches(name, None, self.eval_batch_size, feature_lengths(family))
    result = self.layout.evaluate(params, stream, self.eval_batch_size)
    names = registration.get_task_info(name).template_names
    return {names[int(t)]: float(r["accuracy"]) for t, r in result["per_template"].items()}

  def fit(self, family: str, seed: int, *, init: Optional[Mapping[str, Any]] = None,
          log_dir: Optional[str] = None, log_period: int = 25,
          progress: Optional[Callable[[int, float], None]] = None):
    """Trains on the k-shot split of `family` for few-shot seed `seed`.

    Returns (params, losses) -- the full param tree after training (on device)
    and the training loss of every step. `init`: values for some trainable
    params (e.g. pre-trained (IA)^3 vectors). TensorBoard scalars go to
    `log_dir` when given.
    """
    from ia3_jax.data import batches
    from ia3_jax.train import loop, writers  # pylint: disable=g-import-not-at-top
    name = f"demo_{family}_fewshot_seed{seed}"
    train_loop = loop.TrainLoop(self.trainer, num_steps=self.train_steps,
                                batch_size=self.batch_size, data_name=name)
    train_loop.add_hook(loop.check_finite(f"{family} seed {seed}"))
    losses: list[float] = []
    train_loop.add_hook(lambda info: losses.append(info.metrics["loss"]))
    writer = writers.MetricWriter(log_dir, tensorboard=bool(log_dir), show=lambda _: None)

    def emit(step: int, scalars: dict[str, float]) -> None:
      writer.write(step, scalars, prefix="train/")
      if progress:
        progress(step, losses[-1])
    train_loop.add_hook(loop.MetricsWindow(log_period, emit))
    state = self.trainer.init_state(self._with_method_params(init))
    try:
      state = train_loop.run(state, batches.get_batches(name, "train", self.batch_size,
                                                        feature_lengths(family), seed=seed))
    finally:
      writer.close()
    return state.params, losses

  def trainable_params(self, params):
    """The trainable part of a full param tree (host arrays)."""
    import jax  # pylint: disable=g-import-not-at-top
    return jax.device_get(self.layout.split(params)[0])


def pretrain_ia3(config: T5Config | DecoderConfig, base_params: Mapping[str, Any],
                 model_dir: str, *, train_steps: int = 500, batch_size: int = 16,
                 learning_rate: float = 3e-3,
                 sites: Sequence[str] = DEMO_RECIPE["sites"], seed: int = 0):
  """(IA)^3 vectors pre-trained on the multitask mixture of the training families.

  T-Few's initialisation: L_LM only, mixed tasks, one shared set of vectors
  (the paper: 100k steps, batch 16, lr 3e-4 on T0's mixture; here a few
  hundred steps). Runs `loop.train` in `model_dir`; the training tasks must
  be registered (`register_tasks` with `synthetic.TRAINING_FAMILIES`).
  Returns the (IA)^3 subtree (host arrays), ready for `FewShotRunner.fit(init=...)`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ia3_jax.data import batches
  from ia3_jax.peft import ia3
  from ia3_jax.train import assembly, loop, optimizers
  from ia3_jax.objectives import losses  # pylint: disable=g-import-not-at-top
  from ia3_jax.tasks import demo as demo_tasks  # pylint: disable=g-import-not-at-top
  results = loop.train(
      model_dir=model_dir, model=assembly.ModelSpec(config, peft=ia3.IA3Config(sites=tuple(sites))),
      train_data=batches.SeqioBatches(demo_tasks.PRETRAIN_MIXTURE,
                                      dict(FEATURE_LENGTHS, num_choices=1), seed=seed),
      train_config=loop.TrainConfig(train_steps=train_steps, batch_size=batch_size, seed=seed,
                                    enable_dropout=False, eval_at_end=False, progress=False,
                                    log_period=max(1, train_steps // 10)),
      loss=losses.LossConfig(lm_weight=1.0, ul_weight=0.0, ln_weight=0.0),
      optimizer=optimizers.OptimizerConfig(learning_rate=learning_rate),
      initial_params=base_params)
  return jax.device_get(ia3.extract_ia3(results["state"].params)[0])


# --------------------------------------------------------------------------- summaries


def median_over_templates(accuracies: Mapping[str, float]) -> float:
  return float(np.median(list(accuracies.values())))


def summarize(zero_shot: Mapping[str, Mapping[str, float]],
              tfew: Mapping[str, Mapping[int, Mapping[str, float]]]) -> dict[str, Any]:
  """Per task: zero-shot median over templates; T-Few median over templates per seed,
  their mean and std over seeds, the pooled median over templates x seeds, and the gain."""
  tasks = {}
  for family, zs in zero_shot.items():
    per_seed = {s: median_over_templates(accs) for s, accs in tfew[family].items()}
    pooled = metrics.summarize({t: {s: tfew[family][s][t] for s in tfew[family]} for t in zs})
    mean = float(np.mean(list(per_seed.values())))
    tasks[family] = {
        "zero_shot": median_over_templates(zs),
        "tfew_per_seed": per_seed,
        "tfew": mean,
        "tfew_std": float(np.std(list(per_seed.values()))),
        "tfew_pooled_median": pooled["median"],
        "tfew_pooled_iqr": pooled["iqr"],
        "gain": mean - median_over_templates(zs),
    }
  mean_zs = float(np.mean([t["zero_shot"] for t in tasks.values()]))
  mean_tfew = float(np.mean([t["tfew"] for t in tasks.values()]))
  return {"tasks": tasks, "mean": {"zero_shot": mean_zs, "tfew": mean_tfew,
                                   "gain": mean_tfew - mean_zs}}


def markdown_table(summary: Mapping[str, Any], *, num_trainable: int, num_total: int,
                   adapter_bytes: int, model_bytes: int, seeds: Sequence[int]) -> str:
  """The demo's result table (accuracies in %)."""
  pct = lambda x: f"{100 * x:.1f}"
  lines = [f"| held-out task | zero-shot | T-Few (mean of {len(seeds)} seeds) | per seed | gain |",
           "|---|---:|---:|---|---:|"]
  for family, t in summary["tasks"].items():
    per_seed = ", ".join(pct(v) for v in t["tfew_per_seed"].values())
    lines.append(f"| {family} | {pct(t['zero_shot'])} | {pct(t['tfew'])} ± {pct(t['tfew_std'])} "
                 f"| {per_seed} | {100 * t['gain']:+.1f} |")
  m = summary["mean"]
  lines.append(f"| **mean** | **{pct(m['zero_shot'])}** | **{pct(m['tfew'])}** | | "
               f"**{100 * m['gain']:+.1f}** |")
  lines.append("")
  lines.append("Accuracy: rank classification, median over prompt templates (T-Few: per seed, "
               "then the mean over seeds).")
  lines.append(f"Trainable (IA)^3 params: {num_trainable:,} of {num_total:,} "
               f"({100 * num_trainable / num_total:.2f}%); (IA)^3 checkpoint on disk: "
               f"{adapter_bytes / 1e3:.1f} kB (peft adapter) vs {model_bytes / 1e6:.2f} MB for "
               "the whole model.")
  return "\n".join(lines)


def plot(summary: Mapping[str, Any], path: str | os.PathLike, *, title: str = "") -> str:
  """Bar chart: zero-shot vs T-Few per held-out task (dots: seeds). Returns the path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = list(summary["tasks"])
  x = np.arange(len(tasks) + 1)
  zs = [summary["tasks"][t]["zero_shot"] for t in tasks] + [summary["mean"]["zero_shot"]]
  tf = [summary["tasks"][t]["tfew"] for t in tasks] + [summary["mean"]["tfew"]]
  fig, ax = plt.subplots(figsize=(1.8 * len(x) + 2, 4))
  ax.bar(x - 0.2, [100 * v for v in zs], 0.4, label="zero-shot", color="#9aa5b1")
  ax.bar(x + 0.2, [100 * v for v in tf], 0.4, label="T-Few ((IA)$^3$, few-shot)", color="#2b6cb0")
  for i, t in enumerate(tasks):
    seeds = list(summary["tasks"][t]["tfew_per_seed"].values())
    ax.scatter([i + 0.2] * len(seeds), [100 * v for v in seeds], color="k", s=12, zorder=3)
  ax.set_xticks(x, tasks + ["mean"])
  ax.set_ylabel("accuracy (%), median over templates")
  ax.set_ylim(0, 100)
  ax.legend(loc="lower right")
  ax.set_title(title or "Held-out tasks: zero-shot vs T-Few")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return str(path)


def _dir_bytes(path: str | os.PathLike) -> int:
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------------- the demo


def run_demo(model_dir: str = "/tmp/ia3_jax_demo", *, model: str = "t5",
             model_path: Optional[str] = None,
             families: Optional[Sequence[str]] = None,
             seeds: Sequence[int] = DEMO_RECIPE["seeds"],
             num_shots: int = DEMO_RECIPE["num_shots"],
             train_steps: int = DEMO_RECIPE["train_steps"],
             batch_size: int = DEMO_RECIPE["batch_size"],
             learning_rate: float = DEMO_RECIPE["learning_rate"],
             warmup_ratio: float = DEMO_RECIPE["warmup_ratio"],
             lm_weight: float = DEMO_RECIPE["lm_weight"], ul_weight: float = DEMO_RECIPE["ul_weight"],
             ln_weight: float = DEMO_RECIPE["ln_weight"],
             sites: Sequence[str] = DEMO_RECIPE["sites"],
             dropout_rate: float = DEMO_RECIPE["dropout_rate"],
             eval_size: Optional[int] = None, tensorboard: bool = True, make_plot: bool = True,
             verbose: bool = True, frozen_dtype: str = "float32", dtype: str = "float32",
             attention_impl: str = "einsum") -> dict[str, Any]:
  """Zero-shot vs T-Few on the held-out demo tasks; returns (and writes) the results.

  Args:
    model_dir: output directory (results.json, results.png, tensorboard/, adapters/).
    model: the bundled model, "t5" (encoder-decoder) or "llama" (decoder-only).
    model_path: HF directory of a model of either family (instead of a bundled one).
    families: held-out families (default: all of `synthetic.HELD_OUT_FAMILIES`).
    seeds, num_shots: few-shot seeds and k.
    train_steps, batch_size, learning_rate, warmup_ratio: the (IA)^3 run.
    lm_weight, ul_weight, ln_weight: T-Few loss weights.
    sites: (IA)^3 sites.
    eval_size: evaluation examples per task (default: `ia3_jax.tasks.demo`'s).
    frozen_dtype: storage of the frozen base (zero-shot and T-Few both use it).
    dtype: activations, "float32", "bfloat16" or "auto" (bf16 where native; printed).
    attention_impl: `T5Config.attention_impl` ("einsum" or "dot_product_attention").
  """
  t_start = time.time()
  from ia3_jax.interop import ia3_adapters
  from ia3_jax.objectives import losses
  from ia3_jax.train import optimizers  # pylint: disable=g-import-not-at-top
  say = print if verbose else (lambda *a, **k: None)
  families = tuple(families or synthetic.HELD_OUT_FAMILIES)
  unknown = [f for f in families if f not in synthetic.FAMILIES or not synthetic.FAMILIES[f].held_out]
  if unknown:
    raise ConfigError(f"families {unknown} (DEMO_TASKS, --families) are not held-out demo "
                      f"families; choose from {list(synthetic.HELD_OUT_FAMILIES)}")
  model_path = model_path or bundled_model_path(model)
  out = pathlib.Path(model_dir)
  out.mkdir(parents=True, exist_ok=True)

  config, base, vocabulary = load_model(model_path)
  config = config.replace(dtype=dtype)
  if attention_impl != "einsum":
    if not isinstance(config, T5Config):
      raise ConfigError(f"DEMO_ATTENTION_IMPL={attention_impl!r}: decoder-only models run the "
                        "einsum attention core only")
    config = config.replace(attention_impl=attention_impl)
  say(precision.describe_dtype(dtype))
  register_tasks(vocabulary, families=families, seeds=seeds, num_shots=num_shots,
                 eval_size=eval_size)
  runner = FewShotRunner(
      config, base, method="ia3", method_kwargs={"sites": tuple(sites)},
      frozen_dtype=frozen_dtype,
      loss=losses.LossConfig(lm_weight=lm_weight, ul_weight=ul_weight, ln_weight=ln_weight),
      optimizer=optimizers.OptimizerConfig(learning_rate=learning_rate, warmup_ratio=warmup_ratio),
      train_steps=train_steps, batch_size=batch_size, dropout_rate=dropout_rate)
  say(f"ia3-jax demo: model {model_path} ({runner.num_total - runner.num_trainable:,} params), "
      f"(IA)^3 on {', '.join(sites)}: {runner.num_trainable:,} trainable; held-out tasks "
      f"{', '.join(families)}; {num_shots}-shot, seeds {list(seeds)}, {train_steps} steps"
      + (f"; frozen base in {frozen_dtype}" if frozen_dtype != "float32" else ""))

  zero_shot = {}
  initial = runner.initial_params()
  for family in families:
    zero_shot[family] = runner.evaluate(initial, family)
    say(f"  zero-shot {family}: {100 * median_over_templates(zero_shot[family]):.1f}% "
        f"(median of {len(zero_shot[family])} templates)")

  tfew: dict[str, dict[int, dict[str, float]]] = {}
  curves: dict[str, dict[int, list[float]]] = {}
  adapter_bytes = 0
  for family in families:
    tfew[family], curves[family] = {}, {}
    for seed in seeds:
      t0 = time.time()
      log_dir = str(out / "tensorboard" / f"{family}_seed{seed}") if tensorboard else None
      params, curve = runner.fit(family, seed, log_dir=log_dir)
      tfew[family][seed] = runner.evaluate(params, family)
      curves[family][seed] = curve
      adapter = ia3_adapters.export_peft_adapter(runner.trainable_params(params), config,
                                            out / "adapters" / f"{family}_seed{seed}")
      adapter_bytes = _dir_bytes(adapter)
      say(f"  T-Few {family} seed {seed}: {100 * median_over_templates(tfew[family][seed]):.1f}% "
          f"(loss {curve[0]:.3f} -> {curve[-1]:.3f}, {time.time() - t0:.1f} s)")

  summary = summarize(zero_shot, tfew)
  model_bytes = _dir_bytes(model_path)
  table = markdown_table(summary, num_trainable=runner.num_trainable, num_total=runner.num_total,
                         adapter_bytes=adapter_bytes, model_bytes=model_bytes, seeds=seeds)
  wall = time.time() - t_start
  results = {
      "model_path": str(model_path), "model_config": config.to_dict(),
      "settings": {"families": list(families), "seeds": list(seeds), "num_shots": num_shots,
                   "train_steps": train_steps, "batch_size": batch_size,
                   "learning_rate": learning_rate, "warmup_ratio": warmup_ratio,
                   "loss_weights": [lm_weight, ul_weight, ln_weight], "sites": list(sites),
                   "dropout_rate": dropout_rate, "optimizer": "adafactor"},
      "zero_shot": zero_shot, "tfew": {f: {str(s): a for s, a in v.items()} for f, v in tfew.items()},
      "summary": files.jsonable(summary), "num_trainable": runner.num_trainable,
      "num_params": runner.num_total - runner.num_trainable, "adapter_bytes": adapter_bytes,
      "model_bytes": model_bytes, "train_losses": {f: {str(s): c for s, c in v.items()}
                                                   for f, v in curves.items()},
      "table": table, "wall_time_s": wall,
  }
  if tensorboard:
    _write_summary_scalars(out / "tensorboard" / "summary", summary)
  files.write_json(out / "results.json", results)
  if make_plot:
    results["plot"] = plot(summary, out / "results.png")
  say("\n" + table)
  say(f"\nwrote {out / 'results.json'}" + (f", {out / 'results.png'}" if make_plot else "")
      + (f", TensorBoard logs in {out / 'tensorboard'}" if tensorboard else "")
      + f" ({wall:.0f} s)")
  return results


def _write_summary_scalars(logdir: pathlib.Path, summary: Mapping[str, Any]) -> None:
  from ia3_jax.train import writers  # pylint: disable=g-import-not-at-top
  writer = writers.MetricWriter(str(logdir), tensorboard=True, show=lambda _: None)
  try:
    scalars = {}
    for family, t in summary["tasks"].items():
      scalars[f"zero_shot/{family}"] = t["zero_shot"]
      scalars[f"tfew/{family}"] = t["tfew"]
    scalars["zero_shot/mean"] = summary["mean"]["zero_shot"]
    scalars["tfew/mean"] = summary["mean"]["tfew"]
    writer.write(0, scalars)
  finally:
    writer.close()


def family_accuracies(model_path: str | os.PathLike, families: Sequence[str],
                      eval_size: int = 200) -> dict[str, dict[str, float]]:
  """Zero-shot accuracy per template of `families`: held-out families on `eval_size`
  validation examples, training families on the first `eval_size` examples of their
  training split (a check that training worked)."""
  config, base, vocabulary = load_model(model_path)
  register_tasks(vocabulary, families=families, seeds=(0,), num_shots=4, eval_size=eval_size,
                 train_size=eval_size)
  runner = FewShotRunner(config, base, method="full", train_steps=1)
  params = runner.initial_params()
  return {f: runner.evaluate(params, f) for f in families}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m ia3_jax.demo` (plain flags; `ia3-jax demo` is the same run from demo.gin).
  Expected failures are one line, as for `ia3-jax` (`--verbose` adds the traceback)."""
  from ia3_jax import main as main_lib
  from ia3_jax import runtime
  in_process = argv is not None
  argv, verbose = main_lib.pop_verbose(sys.argv[1:] if argv is None else argv)
  main_lib.quiet_runtime(verbose)
  runtime.import_tf(quiet=not verbose)
  status = main_lib.report_errors(lambda: _main(argv), verbose)
  return status if in_process else runtime.quiet_exit(status, verbose)


def _main(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m ia3_jax.demo",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--model_dir", default="/tmp/ia3_jax_demo")
  p.add_argument("--model", default="t5", choices=sorted(BUNDLED_MODELS),
                 help="the bundled model: t5 (encoder-decoder) or llama (decoder-only)")
  p.add_argument("--model_path", default=None, help="HF directory (default: the bundled model)")
  p.add_argument("--families", nargs="*", default=None)
  p.add_argument("--seeds", type=int, nargs="*", default=list(DEMO_RECIPE["seeds"]))
  p.add_argument("--num_shots", type=int, default=DEMO_RECIPE["num_shots"])
  p.add_argument("--train_steps", type=int, default=DEMO_RECIPE["train_steps"])
  p.add_argument("--learning_rate", type=float, default=DEMO_RECIPE["learning_rate"])
  p.add_argument("--eval_size", type=int, default=None)
  p.add_argument("--no_plot", action="store_true")
  p.add_argument("--no_tensorboard", action="store_true")
  p.add_argument("--dtype", default="float32",
                 help="activations: float32, bfloat16, or auto (bfloat16 where native)")
  p.add_argument("--frozen_dtype", default="float32",
                 help="storage of the frozen base: float32, bfloat16, int8, int4")
  a = p.parse_args(argv)
  run_demo(a.model_dir, model=a.model, model_path=a.model_path, families=a.families, seeds=a.seeds,
           num_shots=a.num_shots, train_steps=a.train_steps, learning_rate=a.learning_rate,
           eval_size=a.eval_size, make_plot=not a.no_plot, tensorboard=not a.no_tensorboard,
           frozen_dtype=a.frozen_dtype, dtype=a.dtype)
  return 0


if __name__ == "__main__":
  sys.exit(main())
