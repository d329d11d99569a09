"""eval / infer runs on a small task of one's own (examples/toy): the task's vocabulary decodes
predictions, templates are named, bad inputs (a vocabulary larger than the model's, an empty
split, choices made identical by truncation) are errors; TensorBoard points are not repeated."""

import json
import pathlib
import shutil
import uuid

import pytest
import seqio

from ia3_jax.train.assembly import ModelSpec
from ia3_jax import errors, runs
from ia3_jax.data import batches
from ia3_jax.model import config
from ia3_jax.peft import ia3
from ia3_jax.train import checks, writers
from tests import trainer_utils as tu

REPO = pathlib.Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "toy"
TINY = config.get_config("tiny")  # vocab_size 128 >= the toy vocabulary's 47 pieces
LENGTHS = {"inputs": 32, "targets": 4, "num_choices": 2}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  path = tu.compilation_cache_dir(tmp_path_factory)
  tu.enable_compilation_cache(path)
  return path


def _task_module(root: pathlib.Path, monkeypatch, *, yaml: str | None = None,
                 validation: str | None = None) -> tuple[str, str]:
  """A copy of examples/toy under a fresh key, registered by a module that nothing has imported
  yet (as MIXTURE_OR_TASK_MODULES does it). Returns (module name, dataset key)."""
  key = f"runs_{uuid.uuid4().hex[:8]}"
  task_dir = root / key
  shutil.copytree(TOY, task_dir)
  if yaml is not None:
    (task_dir / "toy.yaml").write_text(yaml)
  if validation is not None:
    (task_dir / "validation.jsonl").write_text(validation)
  (root / f"{key}_tasks.py").write_text(
      (TOY / "toy_tasks.py").read_text().replace('register_task("toy"', f'register_task("{key}"')
      .replace("HERE = os.path.dirname(os.path.abspath(__file__))", f"HERE = {str(task_dir)!r}"))
  monkeypatch.syspath_prepend(str(root))
  return f"{key}_tasks", key


def _data(module: str, key: str, lengths=LENGTHS) -> batches.SeqioBatches:
  return batches.SeqioBatches(f"{key}_eval", lengths, shuffle=False, repeat=False,
                              task_modules=[module])


def _run(kind, out, data, cfg=TINY):
  return getattr(runs, kind)(output_dir=str(out), model=ModelSpec(cfg, peft=ia3.IA3Config()),
                             data=data, batch_size=4, checkpoint_path=None, seed=0)


def test_infer_decodes_with_the_tasks_vocabulary(tmp_path, monkeypatch):
  module, key = _task_module(tmp_path, monkeypatch)
  _run("infer", tmp_path / "out", _data(module, key))
  rows = [json.loads(l) for l in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
  assert len(rows) == 48
  vocab = seqio.SentencePieceVocabulary(str(TOY / "spm.model"))
  choices = {0: ["yes", "no"], 1: ["good", "bad"]}  # the two templates' answer choices
  for r in rows:
    assert r["prediction_text"] == choices[r["template_id"]][r["prediction"]]
    assert r["prediction_text"] == vocab.decode([t for t in r["prediction_tokens"] if t != 1])
  assert not list((tmp_path / "out").glob("*.tmp"))


def test_eval_names_templates_and_reports_truncation(tmp_path, monkeypatch, capsys):
  module, key = _task_module(tmp_path, monkeypatch)
  lengths = dict(LENGTHS, inputs=6)  # every input is longer than 6 tokens
  out = _run("evaluate", tmp_path / "out", _data(module, key, lengths))
  saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
  assert set(saved["per_template"]) == {"is it positive", "review sentiment"}
  assert {r["template_id"] for r in saved["per_template"].values()} == {0, 1}
  assert saved["truncation"]["inputs_truncated"] == saved["truncation"]["examples"] == 48
  assert saved["truncation"]["choices_truncated"] == 0
  assert out["num_examples"] == 48
  assert "truncated: " in capsys.readouterr().out


def test_eval_with_auto_dtype_says_which_dtype_it_chose(tmp_path, monkeypatch, capsys):
  from ia3_jax.model import precision
  module, key = _task_module(tmp_path, monkeypatch)
  _run("evaluate", tmp_path / "out", _data(module, key), cfg=TINY.replace(dtype="auto"))
  name, why = precision.resolve_dtype("auto")
  assert f"activations: {name} ({why})" in capsys.readouterr().out


def test_vocabulary_larger_than_the_embedding_is_a_config_error(tmp_path, monkeypatch):
  module, key = _task_module(tmp_path, monkeypatch)
  small = TINY.replace(vocab_size=32)  # the toy vocabulary has 47 pieces
  with pytest.raises(errors.ConfigError, match=rf"{key}_eval: its vocabulary has 47 pieces but "
                     r"the model's embedding has vocab_size=32"):
    _run("infer", tmp_path / "out", _data(module, key), cfg=small)
  assert not (tmp_path / "out").exists()


def test_token_ids_beyond_the_embedding_are_a_data_error():
  batch = tu.SyntheticBatches(8).global_batch(0)
  batch["encoder_input_tokens"][2, 3] = 200
  with pytest.raises(errors.DataError, match="'encoder_input_tokens' holds token id 200, "
                     "outside the model's vocab_size=128"):
    checks.check_token_ids(batch, 128, "train batch")


def test_empty_validation_split_is_a_data_error(tmp_path, monkeypatch):
  module, key = _task_module(tmp_path, monkeypatch, validation="")
  with pytest.raises(errors.DataError, match=rf"{key}_eval: no labelled examples"):
    _run("evaluate", tmp_path / "out", _data(module, key))
  assert not (tmp_path / "out" / "eval_results.json").exists()


def test_choices_identical_after_truncation_are_a_data_error(tmp_path, monkeypatch):
  yaml = (TOY / "toy.yaml").read_text().replace("'yes ||| no'", "'film nice ||| film sad'")
  module, key = _task_module(tmp_path, monkeypatch, yaml=yaml)
  lengths = dict(LENGTHS, targets=2)  # "film nice" and "film sad" both become "film" EOS
  with pytest.raises(errors.DataError, match=r"of 48 examples have identical answer choices "
                     r"\(feature 'choices'"):
    _run("evaluate", tmp_path / "out", _data(module, key, lengths))


def test_tensorboard_writes_no_step_twice_after_a_resume(tmp_path):
  from ia3_jax.runtime import import_tf
  tf = import_tf()
  first = writers.MetricWriter(str(tmp_path), True, lambda _: None)
  for step in (1, 2, 3, 4):
    first.write(step, {"loss": step}, prefix="train/")
  first.close()
  resumed = writers.MetricWriter(str(tmp_path), True, lambda _: None)  # resumed from step 2
  for step in (3, 4, 5, 6):
    resumed.write(step, {"loss": step}, prefix="train/")
  resumed.close()
  steps = [e.step for f in sorted(tmp_path.iterdir())
           for e in tf.compat.v1.train.summary_iterator(str(f)) if e.summary.value]
  assert sorted(steps) == [1, 2, 3, 4, 5, 6]


def test_eval_summary_has_every_templates_accuracy():
  result = {"accuracy": 0.5, "num_examples": 4,
            "per_template": {0: {"accuracy": 1.0}, 1: {"accuracy": 0.0}}}
  summary = writers.eval_summary(result, ("is it positive", "review sentiment"))
  assert summary["template/is_it_positive/accuracy"] == 1.0
  assert summary["template/review_sentiment/accuracy"] == 0.0


def _hf_base_and_checkpoint(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """A tiny random HF base (with the demo model's spiece.model) and an (IA)^3 training
  checkpoint of it, as `loop.train` writes one (nothing trained)."""
  from ia3_jax.interop import hf_checkpoints
  from ia3_jax.model import network
  from ia3_jax.train import checkpointer, optimizers
  from tests import hf_utils
  base = root / "base"
  hf_utils.make_hf_model(base, "t5_1_1", "small")
  shutil.copyfile(REPO / "ia3_jax" / "assets" / "demo" / "spiece.model", base / "spiece.model")
  cfg, params = hf_checkpoints.load_hf_checkpoint(base)
  tr = tu.make_trainer(network.Transformer(cfg, ia3.ia3_blocks()), trainable=ia3.IA3_PATTERN,
                       optimizer=optimizers.OptimizerConfig(total_steps=10).build())
  ckpt = checkpointer.Checkpointer(root / "model" / "checkpoints")
  ckpt.save(3, tr.init_state(params), {"seed": 0, "data_position": 3,
                                       "model_config": cfg.to_dict()})
  ckpt.close()
  return base, root / "model"


def test_merge_writes_the_vocabulary_with_ordinary_modes_and_export_refuses_to_overwrite(
    tmp_path):
  from ia3_jax import cli
  base, model_dir = _hf_base_and_checkpoint(tmp_path)
  for fmt in ("hf", "orbax"):
    out = tmp_path / f"merged_{fmt}"
    assert cli.merge(["--base", str(base), "--ia3", str(model_dir), "--out", str(out),
                      "--format", fmt]) == 0
    assert (out / "spiece.model").read_bytes() == (base / "spiece.model").read_bytes()
    for path in [out, *out.rglob("*")]:
      assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path

  adapter = tmp_path / "adapter"
  args = ["--checkpoint", str(model_dir), "--out", str(adapter), "--base", str(base)]
  assert cli.export_peft(args) == 0
  before = {p.name: p.read_bytes() for p in adapter.iterdir()}
  with pytest.raises(errors.ConfigError, match=rf"--out {adapter}: already exists; pass "
                     "--overwrite to replace it"):
    cli.export_peft(args)
  assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
  assert cli.export_peft(args + ["--overwrite"]) == 0
