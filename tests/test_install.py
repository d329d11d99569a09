"""A non-editable install works: build the wheel, install it apart from the checkout, run from it.

The wheel must carry every subpackage (`ia3_jax.tasks.demo` was once left out),
the gin files, the templates and the bundled model.
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(args, cwd, env, timeout=300):
  proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc


def test_wheel_installed_apart_runs_the_demo_and_a_gin_train(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", str(tmp_path / "dist"), str(REPO)], tmp_path, env)
  wheel, = (tmp_path / "dist").glob("ia3_jax-*.whl")
  site = tmp_path / "site"
  _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
        str(site), str(wheel)], tmp_path, env)
  assert (site / "ia3_jax/tasks/demo/__init__.py").exists()
  assert (site / "ia3_jax/gin/models/demo.gin").exists()
  work = tmp_path / "work"
  work.mkdir()
  env["PYTHONPATH"] = str(site)
  check = _run([sys.executable, "-c", "import ia3_jax; print(ia3_jax.__file__)"], work, env)
  assert check.stdout.strip().startswith(str(site))  # not the checkout

  demo_dir = work / "demo"
  _run([sys.executable, "-m", "ia3_jax.cli", "demo", f"--gin.MODEL_DIR='{demo_dir}'",
        "--gin.DEMO_TASKS=('edible',)", "--gin.DEMO_SEEDS=(0,)", "--gin.DEMO_EVAL_SIZE=16",
        "--gin.DEMO_TRAIN_STEPS=2"], work, env)
  results = json.loads((demo_dir / "results.json").read_text())
  assert set(results["summary"]["tasks"]) == {"edible"}

  env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO / "examples" / "toy")])
  run_dir = work / "toy"
  _run([sys.executable, "-m", "ia3_jax.cli", "train", "--gin_file=models/tiny.gin",
        "--gin_file=recipes/t_few.gin", "--gin_file=peft/ia3.gin",
        "--gin.MIXTURE_OR_TASK_MODULES=['toy_tasks']",
        "--gin.MIXTURE_OR_TASK_NAME='toy_fewshot_seed0'", f"--gin.MODEL_DIR='{run_dir}'",
        "--gin.INITIAL_CHECKPOINT_PATH=None", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4, 'num_choices': 2}"], work, env)
  assert json.loads((run_dir / "results.json").read_text())["step"] == 2
