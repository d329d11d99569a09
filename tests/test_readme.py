"""The README's own-task path as written: its snippets and command lines, offline.

Each code block under a `<!-- readme-test: NAME -->` marker is read from README.md and run
unchanged (commands get extra `--gin.` flags at the end for a short run in a temporary folder).
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys


from ia3_jax import data
from ia3_jax.demo import BUNDLED_MODEL_DIR
from ia3_jax.interop import hf_checkpoints
from tests import trainer_utils as tu

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4", "--gin.EVAL_PERIOD=0",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4, 'num_choices': 2}"]


def readme_block(name: str) -> str:
  """The fenced code block right after the marker `<!-- readme-test: name -->`."""
  text = (REPO / "README.md").read_text()
  m = re.search(r"<!-- readme-test: " + re.escape(name) + r" -->\n```\w*\n(.*?)\n```", text, re.S)
  assert m, f"README.md has no code block marked readme-test: {name}"
  return m.group(1) + "\n"


def write_reviews(folder: pathlib.Path, files: dict[str, int]) -> None:
  """JSONL files of `n` rows each in the format of the README's example line."""
  example = json.loads(readme_block("own-task-jsonl"))
  texts = ["A delight from start to finish.", "Dull, and far too long."]
  for name, n in files.items():
    rows = [dict(example, review=f"{texts[i % 2]} Scene {i}.", label=1 - i % 2) for i in range(n)]
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_commands(block: str, cwd: pathlib.Path, extra: list[str], bin_dir: pathlib.Path,
                 command: str = "ia3-jax train"):
  """Runs a README bash block with `extra` flags added to its `command` (an `ia3-jax` one);
  `ia3-jax` and `python` are this interpreter (the checkout, whatever is installed)."""
  bin_dir.mkdir(exist_ok=True)
  for name, cmd in (("ia3-jax", f'"{sys.executable}" -m ia3_jax.cli'), ("python", f'"{sys.executable}"')):
    (bin_dir / name).write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
    (bin_dir / name).chmod(0o755)
  script = block.replace("\\\n", " ")
  assert command in script
  script = "\n".join(line + " " + " ".join(map(shlex.quote, extra)) if command in line
                     else line for line in script.splitlines())
  env = tu.child_env(pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"]))
  env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def test_own_task_python_snippet_runs_offline(tmp_path, monkeypatch):
  (tmp_path / "my_templates.yaml").write_text(readme_block("own-task-templates"))
  write_reviews(tmp_path, {"train.jsonl": 40, "validation.jsonl": 6})
  monkeypatch.chdir(tmp_path)
  data.clear_cache()
  scope: dict = {}
  exec(compile(readme_block("own-task-python"), "README.md", "exec"), scope)  # pylint: disable=exec-used

  vocab = hf_checkpoints.load_vocabulary(BUNDLED_MODEL_DIR)
  batch = next(iter(scope["train"]))
  assert batch["encoder_input_tokens"].shape == (8, 256)
  assert batch["choice_tokens"].shape == (8, 2, 32)
  prompts = [vocab.decode([t for t in row if t > 1]) for row in batch["encoder_input_tokens"]]
  assert all("Scene" in p and ("positive or negative" in p or "Did the reviewer" in p)
             for p in prompts), prompts
  evals = list(scope["evals"])
  assert sum(int(b["example_mask"].sum()) for b in evals) == 2 * 6  # every template, every example
  data.clear_cache()


def test_own_data_module_and_train_command(tmp_path):
  """README "Your own data": the task module as written (no vocabulary: the run's model's),
  trained with the README's command on the bundled model through gin/models/demo.gin."""
  (tmp_path / "my_tasks.py").write_text(readme_block("own-data-module"))
  (tmp_path / "mytask_templates.yaml").write_text(readme_block("own-task-templates"))
  write_reviews(tmp_path, {"train.jsonl": 40, "dev.jsonl": 6})
  model_dir = tmp_path / "run"
  run_commands(readme_block("own-data-train"), tmp_path, SMALL + [f"--gin.MODEL_DIR='{model_dir}'"],
               tmp_path / "bin")
  results = json.loads((model_dir / "results.json").read_text())
  assert results["step"] == 2
  assert results["params"]["trainable"] == 5376  # (IA)^3 on the bundled model (README: demo)
  final = results["eval"]["2"]
  assert final["num_examples"] == 12 and set(final["per_template"]) == {"did they like it", "is it positive"}


def test_toy_train_command_from_the_repo_root(tmp_path):
  model_dir = tmp_path / "toy"
  run_commands(readme_block("toy-train"), REPO,
               SMALL + ["--gin.EVAL_PERIOD=1", f"--gin.MODEL_DIR='{model_dir}'"], tmp_path / "bin")
  results = json.loads((model_dir / "results.json").read_text())
  assert results["step"] == 2 and sorted(results["eval"]) == ["1", "2"]
  assert results["eval"]["2"]["num_examples"] == 48  # 24 validation examples x 2 templates


def test_frozen_int8_snippet_stores_the_bundled_model_quantised(capsys):
  import jax
  import numpy as np
  from ia3_jax.model import storage
  scope: dict = {}
  exec(compile(readme_block("frozen-int8"), "README.md", "exec"), scope)  # pylint: disable=exec-used
  counts = scope["layout"].num_params()
  assert str(counts) in capsys.readouterr().out
  float_bytes = 4 * (counts["total"] - counts["trainable"])
  assert 0.2 * float_bytes < counts["frozen_bytes"] < 0.3 * float_bytes
  kernels = [x for x in jax.tree.leaves(scope["state"].frozen, is_leaf=lambda x: isinstance(
      x, storage.QArray)) if isinstance(x, storage.QArray)]
  assert kernels and all(np.dtype(k.qvalue.dtype) == np.int8 for k in kernels)


def test_precision_snippet_prints_the_resolved_dtype(capsys):
  """README "Model and checkpoints": dtype="auto" resolves for this machine and says why."""
  import jax.numpy as jnp
  from ia3_jax.model import precision
  scope: dict = {}
  exec(compile(readme_block("precision"), "README.md", "exec"), scope)  # pylint: disable=exec-used
  name, why = precision.resolve_dtype("auto")
  assert capsys.readouterr().out.splitlines() == [f"activations: {name} ({why})", name]
  assert scope["config"].activation_dtype == jnp.dtype(name)
  assert scope["config"].attention_impl == "dot_product_attention"


def _combine_inputs(root: pathlib.Path) -> None:
  """The files of the README's combine example, tiny: `models/T0_3B` (a random T5 1.1), peft
  adapters `adapters/rte`, `adapters/cb` and a T-Few state dict `tfew/copa.pt`."""
  import numpy as np
  import torch
  from ia3_jax.interop import adapter_files, ia3_adapters
  from ia3_jax.model import params as params_lib
  from ia3_jax.peft import ia3
  from tests import hf_utils
  hf_utils.make_hf_model(root / "models" / "T0_3B", "t5_1_1")
  config = hf_checkpoints.load_hf_config(root / "models" / "T0_3B")
  rng = np.random.default_rng(0)

  def vectors():
    return {p: rng.choice([0.5, 1.0, 1.25, 1.5], v.shape).astype(np.float32)
            for p, v in params_lib.flatten(ia3.init_ia3(config)).items()}
  for name in ("rte", "cb"):
    ia3_adapters.export_peft_adapter(params_lib.unflatten(vectors()), config,
                                     root / "adapters" / name)
  modules = {target: module for module, target in adapter_files.hf_module_map(config).items()}
  projection = {"ia3_key": "key", "ia3_value": "value", "ia3_ff": "wi_1"}  # T-Few: k, v, wi_1
  state = {}
  for path, vec in vectors().items():
    block, leaf = path.rsplit("/", 1)
    state[f"{modules[(block, projection[leaf])]}.multi_lora_b"] = torch.tensor(vec.reshape(-1, 1))
  (root / "tfew").mkdir()
  torch.save(state, root / "tfew" / "copa.pt")


def test_combine_snippet_and_command(tmp_path, monkeypatch):
  """README "Combining adapters": the Python snippet and the command as written, on tiny files;
  both write the same TIES adapter."""
  import numpy as np
  from ia3_jax.interop import ia3_adapters
  from ia3_jax.model import params as params_lib
  _combine_inputs(tmp_path)
  monkeypatch.chdir(tmp_path)
  scope: dict = {}
  exec(compile(readme_block("combine-python"), "README.md", "exec"), scope)  # pylint: disable=exec-used
  config = scope["config"]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "ia3-jax").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ia3_jax.cli "$@"\n')
  (bin_dir / "ia3-jax").chmod(0o755)
  env = tu.child_env(pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"]))
  env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  proc = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block("combine-command")],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  from_python = params_lib.flatten(ia3_adapters.import_peft_adapter("adapters/rte_cb_copa", config))
  from_command = params_lib.flatten(
      ia3_adapters.import_peft_adapter("adapters/rte_cb_copa_ties", config))
  merged = params_lib.flatten(scope["merged"])
  assert sorted(from_command) == sorted(merged) and len(merged) == 16
  for path, vec in merged.items():
    np.testing.assert_array_equal(from_python[path], vec, err_msg=path)
    np.testing.assert_array_equal(from_command[path], vec, err_msg=path)
  assert any(np.any(np.asarray(v) != 1) for v in merged.values())


# Test-only stand-ins for the built-in rte, cb and copa (their TFDS data is not here): small tasks
# of the toy data, registered before the README's mixture module.
BANK_TASKS = """\
import json, os, seqio
from ia3_jax import data as _data
_TOY = {toy!r}
_rows = [json.loads(l) for l in open(os.path.join(_TOY, "validation.jsonl"))]
for _key, (_a, _b) in {{"rte": (0, 5), "cb": (5, 12), "copa": (12, 15)}}.items():
  _data.register_task(_key, {{"train": _rows[_a:_b], "validation": _rows[_a:_b]}},
                      os.path.join(_TOY, "toy.yaml"), num_choices=2,
                      vocabulary=seqio.SentencePieceVocabulary(os.path.join(_TOY, "spm.model")))
"""

BANK_CHECKS = """
assert set(out["per_task"]) == {"rte", "cb", "copa"}, out
assert out["num_examples"] == 2 * 15 and all(r["num_examples"] for r in out["per_task"].values())
assert bank.task_id_map() == {"rte": 0, "cb": 1, "copa": 2, "wic": 3}
import numpy as np
source = runs.bank_data(data.SeqioBatches("rte_cb_copa_eval", lengths,
                                          task_modules=["my_mixture"]), bank)
batch = dict(next(source(batch_size=32, start_step=0, shard_id=0, num_shards=1)))
inputs = {k: batch[k] for k in ("encoder_input_tokens", "choice_tokens", "choice_mask", "task_id")}
before = classify(runs.with_bank(layout, params, ia3_adapters.load_adapter_bank(
    {"rte": "adapters/rte", "cb": "adapters/cb", "copa": "tfew/copa.pt"}, config, capacity=8)),
    dict(inputs, task_id=np.full_like(inputs["task_id"], 3)))["scores"]
after = classify(params, dict(inputs, task_id=np.full_like(inputs["task_id"], 3)))["scores"]
assert not np.allclose(before, after)  # row 3: the base model before, wic after
print("BANK_OK")
"""


def _bank_inputs(root: pathlib.Path) -> None:
  """The README adapter bank's files, tiny: those of the combine example, `adapters/wic`, and
  `my_mixture.py` (the README's module after the stand-in tasks)."""
  import numpy as np
  from ia3_jax.interop import ia3_adapters
  from ia3_jax.model import params as params_lib
  from ia3_jax.peft import ia3
  _combine_inputs(root)
  config = hf_checkpoints.load_hf_config(root / "models" / "T0_3B")
  rng = np.random.default_rng(1)
  wic = {p: rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
         for p, v in params_lib.flatten(ia3.init_ia3(config)).items()}
  ia3_adapters.export_peft_adapter(params_lib.unflatten(wic), config, root / "adapters" / "wic")
  (root / "my_mixture.py").write_text(BANK_TASKS.format(toy=str(REPO / "examples" / "toy"))
                                      + readme_block("adapter-bank-module"))


def test_adapter_bank_snippet_and_command(tmp_path):
  """README "Several adapters at once": the Python snippet and the eval command as written (in
  subprocesses: the stand-in tasks stay out of this process), on tiny files."""
  _bank_inputs(tmp_path)
  env = tu.child_env(pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"]))
  (tmp_path / "snippet.py").write_text(readme_block("adapter-bank-python") + BANK_CHECKS)
  proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "AdapterBank(3/8 rows: rte=0, cb=1, copa=2)" in proc.stdout and "BANK_OK" in proc.stdout
  tiny = ["--gin.config.get_config.name='tiny'", "--gin.BATCH_SIZE=4",  # models/T0_3B is tiny
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4, 'num_choices': 2}"]
  run_commands(readme_block("adapter-bank-command"), tmp_path, tiny, tmp_path / "bin",
               command="ia3-jax eval")
  saved = json.loads((tmp_path / "eval" / "rte_cb_copa" / "eval_results.json").read_text())
  assert set(saved["per_task"]) == {"rte", "cb", "copa"}
  assert saved["adapters"]["copa"] == {"task_id": 2, "source": "tfew/copa.pt"}


def test_peft_method_snippet_registers_a_method_that_trains(tmp_path):
  """The README's example method, run as written: registered, counted, identity at init, and
  `loop.train` trains exactly its params."""
  import jax
  import numpy as np
  from ia3_jax.model import config
  from ia3_jax.model import params as params_lib
  from ia3_jax.peft import counts, registry
  from ia3_jax.train import assembly, loop
  scope: dict = {"__name__": "readme_peft_method"}
  exec(compile(readme_block("peft-method"), "README.md", "exec"), scope)  # pylint: disable=exec-used
  try:
    tiny = config.get_config("tiny")
    [count] = counts.count_all(tiny, ["output_scale"])
    assert count.trainable == (tiny.num_encoder_layers + tiny.num_decoder_layers) * tiny.emb_dim
    spec = assembly.ModelSpec(tiny, peft=registry.make("output_scale"), dropout_rate=0.0)
    base = tu.random_base_params(tiny)
    res = loop.train(model_dir=str(tmp_path), model=spec, train_data=tu.SyntheticBatches(4),
                     train_config=loop.TrainConfig(train_steps=2, batch_size=4, tensorboard=False,
                                                   progress=False),
                     initial_params=base)
    trained = params_lib.flatten(jax.device_get(res["state"].trainable))
    assert set(trained) == {f"{stack}/layers_{i}/mlp/out_scale" for stack in ("encoder", "decoder")
                            for i in range(2)}
    assert all(not np.allclose(v, 1.0) for v in trained.values())  # moved from ones
  finally:
    registry._METHODS.pop("output_scale", None)  # pylint: disable=protected-access
