"""Builds notebooks/quickstart.ipynb and notebooks/ablations.ipynb with nbformat.

    python notebooks/build_notebooks.py

The notebooks are generated from the cells below so that their code stays
reviewable as Python; edit here and rebuild. Both read their settings from
environment variables (CI runs them small; see tests/test_notebooks.py):

  IA3_JAX_NB_STEPS   (IA)^3 / fine-tuning steps per run
  IA3_JAX_NB_SEEDS   comma-separated few-shot seeds
  IA3_JAX_NB_TASKS   comma-separated held-out families
  IA3_JAX_NB_COMBINE_TASKS  held-out families of the ablations' adapter-combining section
                     (at least 2; default all three)
  IA3_JAX_NB_EVAL    evaluation examples per task
  IA3_JAX_NB_OUT     where plots and exports go
  IA3_JAX_NB_SMALL   1: every other size small too (pre-training steps, methods' steps;
                     two of the losses, two of the methods)
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETTINGS = '''\
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SMALL = os.environ.get("IA3_JAX_NB_SMALL", "0") == "1"
STEPS = int(os.environ.get("IA3_JAX_NB_STEPS", "{steps}"))
SEEDS = [int(s) for s in os.environ.get("IA3_JAX_NB_SEEDS", "{seeds}").split(",")]
TASKS = os.environ.get("IA3_JAX_NB_TASKS", "{tasks}").split(",")
EVAL_SIZE = int(os.environ.get("IA3_JAX_NB_EVAL", "{eval_size}"))
OUT = os.environ.get("IA3_JAX_NB_OUT", "notebook_outputs")
os.makedirs(OUT, exist_ok=True)
print(dict(SMALL=SMALL, STEPS=STEPS, SEEDS=SEEDS, TASKS=TASKS, EVAL_SIZE=EVAL_SIZE, OUT=OUT))'''


def quickstart() -> nbformat.NotebookNode:
  md, code = new_markdown_cell, new_code_cell
  cells = [
      md("# ia3-jax quickstart\n\n"
         "Load a T5 model, add (IA)$^3$, train it few-shot with the T-Few losses, evaluate, "
         "merge the vectors into the weights and export. It uses the tiny T5 bundled with "
         "ia3-jax (`ia3_jax/assets/demo`, trained from scratch by "
         "`scripts/train_demo_model.py` on a synthetic multitask suite); the same calls load "
         "`bigscience/T0_3B`-style HF directories."),
      code(SETTINGS.format(steps=300, seeds="0", tasks="recommend", eval_size=300)),
      md("## 1. Load the model and its vocabulary"),
      code('''\
import jax, jax.numpy as jnp, numpy as np
from ia3_jax import demo
from ia3_jax.data import synthetic
from ia3_jax.interop import hf_checkpoints, ia3_adapters
from ia3_jax.model import network, params as params_lib
from ia3_jax.peft import ia3

config, base_params, vocabulary = demo.load_model()   # any HF T5 directory works here
print(config)
print(f"{network.param_count(base_params):,} params, vocabulary of {vocabulary.vocab_size} pieces")'''),
      md("## 2. The held-out task\n\nThe synthetic suite's held-out families were never "
         "seen in training. Each has several prompt templates (promptsource format) and is "
         "registered as seqio tasks: `demo_<task>_fewshot_seed<S>` (k examples) and "
         "`demo_<task>_eval_<template>`."),
      code('''\
from ia3_jax.data.templates import load_templates
from ia3_jax.tasks import demo as demo_tasks
demo.register_tasks(vocabulary, families=TASKS, seeds=SEEDS, num_shots=32, eval_size=EVAL_SIZE)
task = TASKS[0]
templates = load_templates(demo_tasks.template_path(task))
example = synthetic.generate_splits(task, {"validation": 1})["validation"][0]
for t in templates:
  r = t.render(example)
  print(f"[{t.name}] {r.inputs!r} -> {r.target!r} (choices {list(r.choices)})")'''),
      md("## 3. Add (IA)$^3$\n\nThree vectors per layer rescale keys, values and the "
         "feed-forward activation. They start at ones, so the model is unchanged."),
      code('''\
model = ia3.ia3_model(config)                        # network.Transformer with (IA)^3 blocks
params = ia3.with_ia3(base_params, config)           # base weights + vectors of ones
print(f"(IA)^3 params: {ia3.count_ia3(config):,} "
      f"({100 * ia3.count_ia3(config) / network.param_count(base_params):.2f}% of the model)")
enc = jnp.asarray(np.random.RandomState(0).randint(3, config.vocab_size, (2, 12)))
dec = jnp.asarray(np.random.RandomState(1).randint(3, config.vocab_size, (2, 5)))
base_logits = network.Transformer(config).apply({"params": base_params}, enc, network.shift_right(dec), dec)
ia3_logits = model.apply({"params": params}, enc, network.shift_right(dec), dec)
print("max |difference| at init:", float(jnp.max(jnp.abs(base_logits - ia3_logits))))'''),
      md("## 4. Zero-shot, then few-shot training with the T-Few recipe\n\n"
         "`FewShotRunner` wraps ia3-jax's trainer: only the (IA)$^3$ vectors are "
         "differentiated; loss L_LM + L_UL + L_LN; Adafactor with warmup and linear decay."),
      code('''\
from ia3_jax.objectives import losses
from ia3_jax.train import optimizers
runner = demo.FewShotRunner(config, base_params, method="ia3",
                            loss=losses.LossConfig(1.0, 1.0, 1.0),
                            optimizer=optimizers.OptimizerConfig(learning_rate=demo.DEMO_RECIPE["learning_rate"]),
                            train_steps=STEPS)
zero_shot = runner.evaluate(runner.initial_params(), task)
print("zero-shot accuracy per template:", {k: round(v, 3) for k, v in zero_shot.items()})
trained, curve = runner.fit(task, SEEDS[0])
few_shot = runner.evaluate(trained, task)
print("T-Few accuracy per template:   ", {k: round(v, 3) for k, v in few_shot.items()})
print(f"median: zero-shot {np.median(list(zero_shot.values())):.3f} -> T-Few {np.median(list(few_shot.values())):.3f}")'''),
      code('''\
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(curve, lw=1)
ax.set_xlabel("step"); ax.set_ylabel("L_LM + L_UL + L_LN"); ax.set_title(f"(IA)$^3$ on {task}, seed {SEEDS[0]}")
fig.tight_layout(); fig.savefig(os.path.join(OUT, "quickstart_loss.png"), dpi=100)
plt.show()'''),
      md("## 5. Merge the vectors into the weights\n\n`ia3.merge` folds l_k, l_v into the "
         "key/value kernels and l_ff into `wo`: a plain T5 with the same outputs, no extra "
         "inference cost. The originals are kept for an exact `unmerge`."),
      code('''\
trained_host = jax.device_get(trained)
merged, originals = ia3.merge(trained_host)
plain = network.Transformer(config)
a = model.apply({"params": trained_host}, enc, network.shift_right(dec), dec)
b = plain.apply({"params": merged}, enc, network.shift_right(dec), dec)
print("max |merged - unmerged| logits:", float(jnp.max(jnp.abs(a - b))))
restored = ia3.unmerge(merged, originals)
print("unmerge is exact:", all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(trained_host))))
merged_runner = demo.FewShotRunner(config, merged, method="full", train_steps=1)
print("merged model accuracy:", {k: round(v, 3) for k, v in merged_runner.evaluate(merged_runner.initial_params(), task).items()})'''),
      md("## 6. Export\n\nThe vectors as an HF peft IA3 adapter (a few kB; "
         "`PeftModel.from_pretrained` loads it), and the merged model as an HF directory."),
      code('''\
adapter_dir = ia3_adapters.export_peft_adapter(runner.trainable_params(trained), config, os.path.join(OUT, "adapter"))
merged_dir = hf_checkpoints.export_hf_checkpoint(merged, config, os.path.join(OUT, "merged_model"))
for d in (adapter_dir, merged_dir):
  for f in sorted(os.listdir(d)):
    print(f"{d}/{f}: {os.path.getsize(os.path.join(d, f)):,} bytes")
reloaded = ia3_adapters.import_peft_adapter(adapter_dir, config)
same = all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(reloaded), jax.tree.leaves(runner.trainable_params(trained))))
print("adapter round trip:", same)
_, merged_back = hf_checkpoints.load_hf_checkpoint(merged_dir)
print("merged model round trip:", all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(merged_back), jax.tree.leaves(merged))))'''),
  ]
  return new_notebook(cells=cells, metadata=_metadata())


def ablations() -> nbformat.NotebookNode:
  md, code = new_markdown_cell, new_code_cell
  cells = [
      md("# Ablations on the bundled tiny T5\n\n"
         "The T-Few paper's ablations, on ia3-jax's own tiny T5 and the held-out synthetic "
         "tasks: (1) the losses (L_LM alone, + L_UL, + L_LN, all three), (2) (IA)$^3$ "
         "initialised at ones vs pre-trained on the multitask mixture, (3) (IA)$^3$ vs full "
         "fine-tuning and the other PEFT methods ia3-jax ships, (4) many tasks, one model: "
         "one adapter per task in a bank (one mixed-task pass) vs the adapters combined into "
         "one. Accuracy is rank classification, median over templates, averaged over "
         "few-shot seeds."),
      code(SETTINGS.format(steps=300, seeds="0,1,2", tasks="recommend,edible,alive",
                           eval_size=300)),
      code('''\
import time
import numpy as np
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from ia3_jax import demo
from ia3_jax.data import synthetic
from ia3_jax.objectives import losses
from ia3_jax.peft import registry
from ia3_jax.train import optimizers

config, base_params, vocabulary = demo.load_model()
demo.register_tasks(vocabulary, families=list(synthetic.TRAINING_FAMILIES) + TASKS, seeds=SEEDS,
                    num_shots=32, eval_size=EVAL_SIZE, train_size=200 if SMALL else 2000)
LR = demo.DEMO_RECIPE["learning_rate"]

def run(runner, init=None):
  """Median accuracy over templates, averaged over seeds, per task; plus zero-shot."""
  scores = {}
  for task in TASKS:
    per_seed = [np.median(list(runner.evaluate(runner.fit(task, s, init=init)[0], task).values())) for s in SEEDS]
    scores[task] = float(np.mean(per_seed))
  return scores

def bar_plot(results, title, path, tasks=TASKS):
  names = list(results)
  x = np.arange(len(tasks) + 1)
  width = 0.8 / len(names)
  fig, ax = plt.subplots(figsize=(2 + 1.6 * len(x), 3.6))
  for i, name in enumerate(names):
    vals = [results[name][t] for t in tasks]
    ax.bar(x + (i - (len(names) - 1) / 2) * width, [100 * v for v in vals + [np.mean(vals)]], width, label=name)
  ax.set_xticks(x, tasks + ["mean"]); ax.set_ylim(0, 100); ax.set_ylabel("accuracy (%)")
  ax.set_title(title); ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars
  fig.tight_layout(); fig.savefig(os.path.join(OUT, path), dpi=100, bbox_inches="tight"); plt.show()

def show(results):
  for name, r in results.items():
    print(f"{name:32s}" + "".join(f"{t}: {100 * v:5.1f}  " for t, v in r.items()) + f"mean: {100 * np.mean(list(r.values())):5.1f}")'''),
      code('''\
zs_runner = demo.FewShotRunner(config, base_params, method="ia3", train_steps=1)
zero_shot = {t: float(np.median(list(zs_runner.evaluate(zs_runner.initial_params(), t).values()))) for t in TASKS}
show({"zero-shot": zero_shot})'''),
      md("## 1. Losses\n\nSame (IA)$^3$ run, different loss weights (lm, ul, ln)."),
      code('''\
LOSSES = {"L_LM": (1, 0, 0), "L_LM + L_UL": (1, 1, 0), "L_LM + L_LN": (1, 0, 1),
          "L_LM + L_UL + L_LN": (1, 1, 1)}
if SMALL:  # a quick check: L_LM alone and the T-Few loss
  LOSSES = {k: LOSSES[k] for k in ("L_LM", "L_LM + L_UL + L_LN")}
loss_results = {"zero-shot": zero_shot}
for name, w in LOSSES.items():
  t0 = time.time()
  runner = demo.FewShotRunner(config, base_params, method="ia3", loss=losses.LossConfig(*map(float, w)),
                              optimizer=optimizers.OptimizerConfig(learning_rate=LR), train_steps=STEPS)
  loss_results[name] = run(runner)
  print(f"{name}: {time.time() - t0:.0f} s")
show(loss_results)
bar_plot(loss_results, "T-Few losses", "ablation_losses.png")'''),
      md("## 2. (IA)$^3$ initialisation\n\nOnes (the model unchanged) vs vectors pre-trained "
         "with L_LM on the multitask mixture of the training families (T-Few's "
         "initialisation)."),
      code('''\
import tempfile
pretrained = demo.pretrain_ia3(config, base_params, tempfile.mkdtemp(prefix="ia3_pretrain_"),
                               train_steps=20 if SMALL else 500)
runner = demo.FewShotRunner(config, base_params, method="ia3",
                            optimizer=optimizers.OptimizerConfig(learning_rate=LR), train_steps=STEPS)
init_results = {"zero-shot": zero_shot,
                "zero-shot, pre-trained (IA)$^3$": {t: float(np.median(list(runner.evaluate(runner.initial_params(pretrained), t).values()))) for t in TASKS},
                "T-Few, ones": loss_results["L_LM + L_UL + L_LN"],
                "T-Few, pre-trained (IA)$^3$": run(runner, init=pretrained)}
show(init_results)
bar_plot(init_results, "(IA)$^3$ initialisation", "ablation_init.png")'''),
      md("## 3. Methods\n\n(IA)$^3$ against full fine-tuning (the paper's baseline: lr 3e-4) "
         "and the other methods in `ia3_jax.peft`, each with the T-Few losses and the "
         "same steps. The learning rates are not tuned here. Methods whose new parameters start "
         "at zero (LoRA's B, BitFit's biases) use Adafactor without parameter scaling: with it, "
         "a zero parameter's step is 1e-3 of the learning rate (Adafactor's eps2 floor on the "
         "parameter's RMS) and they barely move in a few hundred steps."),
      code('''\
METHODS = {  # name -> (registry name, hyper-parameters, learning rate, Adafactor parameter scaling)
    "(IA)^3": ("ia3", {}, LR, True),
    "full fine-tuning": ("full", {}, 3e-4, True),
    "LoRA (rank 4)": ("lora", {"rank": 4}, 3e-3, False),
    "BitFit": ("bitfit", {}, 3e-2, False),
    "LayerNorm": ("layernorm", {}, 3e-2, True),
    "prompt tuning (10)": ("prompt_tuning", {"length": 10}, 3e-1, True),
    "prefix tuning (10)": ("prefix_tuning", {"length": 10}, 3e-2, True),
}
METHODS = {k: v for k, v in METHODS.items() if v[0] in registry.methods()}
if SMALL:  # a quick check: two of the methods
  METHODS = {k: METHODS[k] for k in ("(IA)^3", "LoRA (rank 4)")}
method_results, sizes = {"zero-shot": zero_shot}, {}
for name, (method, kwargs, lr, scale) in METHODS.items():
  t0 = time.time()
  runner = demo.FewShotRunner(config, base_params, method=method, method_kwargs=kwargs,
                              optimizer=optimizers.OptimizerConfig(learning_rate=lr, multiply_by_parameter_scale=scale),
                              train_steps=STEPS)
  method_results[name] = run(runner)
  sizes[name] = runner.num_trainable
  print(f"{name}: {runner.num_trainable:,} trainable params, {time.time() - t0:.0f} s")
show(method_results)
bar_plot(method_results, "Fine-tuning methods", "ablation_methods.png")'''),
      code('''\
fig, ax = plt.subplots(figsize=(6, 3.6))
for name, n in sizes.items():
  acc = 100 * np.mean(list(method_results[name].values()))
  ax.scatter(n, acc, s=30); ax.annotate(name, (n, acc), fontsize=8, xytext=(4, 2), textcoords="offset points")
ax.axhline(100 * np.mean(list(zero_shot.values())), color="grey", ls="--", lw=1, label="zero-shot")
ax.set_xscale("log"); ax.set_xlabel("trainable parameters"); ax.set_ylabel("mean accuracy (%)")
ax.set_title("Accuracy vs trainable parameters"); ax.legend(fontsize=8)
fig.tight_layout(); fig.savefig(os.path.join(OUT, "ablation_params.png"), dpi=100); plt.show()'''),
      md("## 4. Many tasks, one model: an adapter bank vs combined adapters\n\n"
         "One (IA)$^3$ adapter per held-out task (T-Few, the first seed), then: (a) each adapter "
         "on its own task, through the one-task model; (b) all the tasks in ONE mixed-task pass "
         "(`runs.score(adapters=bank)`: an `AdapterBank` with one row per task, each example "
         "using its task's row), which must give the same predictions and scores as (a); "
         "(c) one adapter made from all of them by each method of `peft.combine`, used for every "
         "task: `linear` with equal weights 1/n (peft's `add_weighted_adapter`), "
         "`multiplicative` (the adapters in sequence), `task_arithmetic` with lambda 0.5 "
         "(between the mean of the task vectors, 1/n, and their sum, 1) and `ties` with the "
         "paper's defaults k = 20 (% of each adapter's entries kept) and lambda 1. The "
         "combinations run through one compiled program: `AdapterBank.replace` changes "
         "values only (`runs.with_bank`). Its own setting `IA3_JAX_NB_COMBINE_TASKS` picks the "
         "tasks (at least 2)."),
      code('''\
import json
import jax
from ia3_jax import data, runs
from ia3_jax.data import batches, features
from ia3_jax.peft import combine
from ia3_jax.peft.banks import AdapterBank
from ia3_jax.train.assembly import ModelSpec

COMBINE_TASKS = os.environ.get("IA3_JAX_NB_COMBINE_TASKS", "recommend,edible,alive").split(",")
if len(COMBINE_TASKS) < 2:
  raise ValueError(f"IA3_JAX_NB_COMBINE_TASKS={','.join(COMBINE_TASKS)}: give at least 2 held-out tasks")

demo.register_tasks(vocabulary, families=COMBINE_TASKS, seeds=SEEDS, num_shots=32, eval_size=EVAL_SIZE)
KEYS = {t: f"demo_{t}" for t in COMBINE_TASKS}   # dataset keys: the adapters' names in a bank
MIXED = data.add_mixture("demo_combine_eval", [f"demo_{t}_eval" for t in COMBINE_TASKS],
                         kind="eval", default_split="validation")
LENGTHS = {k: max(demo.feature_lengths(t)[k] for t in COMBINE_TASKS) for k in ("inputs", "targets", "num_choices")}
t0 = time.time()
combine_runner = demo.FewShotRunner(config, base_params, method="ia3", train_steps=STEPS,
                                    optimizer=optimizers.OptimizerConfig(learning_rate=LR))
fitted = {t: combine_runner.fit(t, SEEDS[0])[0] for t in COMBINE_TASKS}
adapters = {t: combine_runner.trainable_params(p) for t, p in fitted.items()}   # one-task trees [1, width]
print(f"{len(adapters)} adapters fitted: {time.time() - t0:.0f} s")

def median_accuracy(per_template):
  return float(np.median([r["accuracy"] for r in per_template.values()]))

def rows_alone(task, params):
  """(a): the task's evaluation split through the one-task (IA)^3 model, no bank (batch shapes
  as in the mixed pass: other lengths change float32 sums in the last digits)."""
  classify, rows = combine_runner.trainer.classifier(demo.EVAL_BATCH_SIZE), {}
  for batch in batches.get_batches(f"demo_{task}_eval", None, demo.EVAL_BATCH_SIZE, LENGTHS):
    out = classify(params, {k: batch[k] for k in features.MODEL_FEATURES if k in batch})
    for i in np.nonzero(batch["example_mask"])[0]:
      rows[(task, int(batch["example_id"][i]), int(batch["template_id"][i]))] = (
          int(out["predictions"][i]), np.asarray(out["scores"][i])[batch["choice_mask"][i] > 0],
          int(batch["label"][i]))
  return rows

def accuracy_of(rows):
  """Each task's accuracy, median over templates, of {(task, example, template): (prediction, scores, label)}."""
  groups = {}
  for (task, _, template), (pred, _, label) in rows.items():
    groups.setdefault(task, {}).setdefault(template, []).append(pred == label)
  return {t: float(np.median([np.mean(v) for v in groups[t].values()])) for t in COMBINE_TASKS}'''),
      code('''\
bank = AdapterBank(adapters[COMBINE_TASKS[0]], capacity=len(COMBINE_TASKS))
for t in COMBINE_TASKS:
  bank.add(KEYS[t], adapters[t], {"source": f"T-Few on {t}, seed {SEEDS[0]}"})
print(bank)
base_model = ModelSpec(config, initial_checkpoint_path=demo.BUNDLED_MODEL_DIR)
scored = runs.score(output_dir=os.path.join(OUT, "combine_mixed"), model=base_model,
                    data=data.SeqioBatches(MIXED, LENGTHS), batch_size=demo.EVAL_BATCH_SIZE,
                    adapters=bank)
mixed_rows = {}
with open(scored["path"]) as f:
  for r in map(json.loads, f):
    mixed_rows[(r["task"][len("demo_"):], r["example_id"], r["template_id"])] = (
        r["prediction"], np.array([s for s in r["scores"] if s is not None]), r["label"])
alone_rows = {k: v for t in COMBINE_TASKS for k, v in rows_alone(t, fitted[t]).items()}
same_rows = mixed_rows.keys() == alone_rows.keys()
rel = max(float(np.max(np.abs(mixed_rows[k][1] - v[1]) / np.abs(v[1]))) if same_rows else np.inf
          for k, v in alone_rows.items())
same = same_rows and all(mixed_rows[k][0] == v[0] for k, v in alone_rows.items()) and rel <= 1e-5
print(f"{len(mixed_rows)} rows of {len(COMBINE_TASKS)} tasks in one pass; largest relative score difference {rel:.1e}")
print("mixed pass equals each alone:", same)'''),
      code('''\
N = len(COMBINE_TASKS)
COMBINERS = {  # name -> the one adapter made from the fitted ones
    "linear, weights 1/n": lambda a: combine.linear(a, [1 / N] * N),   # a: {task: adapter}
    "multiplicative": combine.multiplicative,
    "task arithmetic, lambda 0.5": lambda a: combine.task_arithmetic(a, lambda_=0.5),
    "TIES, k 20, lambda 1": lambda a: combine.ties(a, k=20, lambda_=1.0),
}
serving = AdapterBank(adapters[COMBINE_TASKS[0]], capacity=N)
for t in COMBINE_TASKS:
  serving.add(KEYS[t], adapters[t])
layout, bank_params, serving = runs.load_bank_for_inference(serving, base_model)
mixture = runs.bank_data(data.SeqioBatches(MIXED, LENGTHS), serving)

def everywhere(adapter):
  """Accuracy per task with `adapter` in every task's row: one mixed pass, no recompilation."""
  for t in COMBINE_TASKS:
    serving.replace(KEYS[t], adapter)
  params = runs.with_bank(layout, bank_params, serving)   # new values, same shapes: no new compilation
  result = layout.evaluate(params, mixture(batch_size=demo.EVAL_BATCH_SIZE), demo.EVAL_BATCH_SIZE, per_task=True)
  return {serving.name_of_row(row)[len("demo_"):]: median_accuracy(r["per_template"])
          for row, r in result["per_task"].items()}

combine_results = {"zero-shot": everywhere(jax.tree.map(np.ones_like, adapters[COMBINE_TASKS[0]])),
                   "(a) each adapter, alone": accuracy_of(alone_rows),
                   "(b) bank, one mixed pass": accuracy_of(mixed_rows)}
for name, make in COMBINERS.items():
  combine_results[f"(c) {name}"] = everywhere(make(adapters))
show(combine_results)
bar_plot(combine_results, "Combining adapters", "ablation_combine.png", tasks=COMBINE_TASKS)'''),
  ]
  return new_notebook(cells=cells, metadata=_metadata())


def _metadata() -> dict:
  return {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
          "language_info": {"name": "python"}}


NOTEBOOKS = {"quickstart": quickstart, "ablations": ablations}


def build(name: str) -> nbformat.NotebookNode:
  """The notebook `name`, with stable cell ids (rebuilding gives the same file)."""
  nb = NOTEBOOKS[name]()
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{name}-{i:02d}"
  return nb


def main() -> None:
  for name in NOTEBOOKS:
    path = os.path.join(HERE, f"{name}.ipynb")
    nbformat.write(build(name), path)
    print("wrote", path)


if __name__ == "__main__":
  main()
