"""The notebooks run top to bottom on the bundled model (small settings) and save their plots."""

import importlib.util
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
SMALL = {"IA3_JAX_NB_SMALL": "1", "IA3_JAX_NB_STEPS": "8", "IA3_JAX_NB_SEEDS": "0",
         "IA3_JAX_NB_TASKS": "recommend", "IA3_JAX_NB_EVAL": "24",
         "IA3_JAX_NB_COMBINE_TASKS": "recommend,edible"}  # combining adapters needs >= 2 tasks
PLOTS = {"quickstart": ["quickstart_loss.png"],
         "ablations": ["ablation_losses.png", "ablation_init.png", "ablation_methods.png",
                       "ablation_params.png", "ablation_combine.png"]}


def _builder():
  spec = importlib.util.spec_from_file_location("build_notebooks",
                                                os.path.join(NB_DIR, "build_notebooks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_notebook_is_built_from_builder(name):
  built = _builder().build(name)
  with open(os.path.join(NB_DIR, f"{name}.ipynb"), encoding="utf-8") as f:
    committed = nbformat.read(f, as_version=4)
  assert [c.source for c in committed.cells] == [c.source for c in built.cells], (
      f"notebooks/{name}.ipynb is out of date: run python notebooks/build_notebooks.py")


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_notebook_runs(name, tmp_path, monkeypatch):
  for key, value in dict(SMALL, IA3_JAX_NB_OUT=str(tmp_path)).items():
    monkeypatch.setenv(key, value)
  with open(os.path.join(NB_DIR, f"{name}.ipynb"), encoding="utf-8") as f:
    nb = nbformat.read(f, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  for plot in PLOTS[name]:
    path = tmp_path / plot
    assert path.exists() and path.stat().st_size > 5000, plot
  text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  if name == "quickstart":
    assert "unmerge is exact: True" in text and "adapter round trip: True" in text
    assert "merged model round trip: True" in text
  if name == "ablations":  # one mixed-task pass over 2 tasks = each task alone with its adapter
    assert "mixed pass equals each alone: True" in text
    assert "(c) TIES, k 20, lambda 1" in text
