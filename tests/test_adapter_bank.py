"""The adapter bank (`peft.banks.AdapterBank`, `ia3_adapters.load_adapter_bank`) and
multi-adapter eval / score / infer: one mixed-task pass over three tiny tasks equals three
single-adapter runs; adding an adapter under capacity does not recompile; errors name the
task or adapter."""

import json
import pathlib

import numpy as np
import pytest
import seqio
import torch

from ia3_jax.train.assembly import ModelSpec
from ia3_jax import cli, data, runs
from ia3_jax.errors import AdapterError, ConfigError
from ia3_jax.interop import adapter_files, hf_checkpoints, ia3_adapters
from ia3_jax.model import config
from ia3_jax.model import params as params_lib
from ia3_jax.objectives import scoring
from ia3_jax.peft import banks, ia3
from tests import tolerances
from tests import trainer_utils as tu

REPO = pathlib.Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "toy"
TINY = config.get_config("tiny")
LENGTHS = {"inputs": 32, "targets": 4, "num_choices": 2}
KEYS = ("bank_rte", "bank_cb", "bank_copa")  # dataset keys = adapter names
SIZES = (5, 7, 3)  # validation examples per task (x 2 templates): batches of 4 mix tasks
MIXTURE = "bank_mix_eval"
LAYERS = ["--gin_file=models/tiny.gin", "--gin_file=recipes/t_few.gin", "--gin_file=peft/ia3.gin"]


def _vectors(seed: int, cfg=TINY, sites=ia3.DEFAULT_SITES) -> dict:
  """A one-task (IA)^3 tree of random vectors (far enough from ones to change predictions)."""
  rng = np.random.default_rng(seed)
  return params_lib.unflatten({p: rng.uniform(0.2, 1.8, v.shape).astype(np.float32)
                               for p, v in params_lib.flatten(ia3.init_ia3(cfg, sites)).items()})


def _tfew_file(vectors: dict, path: pathlib.Path) -> pathlib.Path:
  """`vectors` as a T-Few state dict (multi_lora_b on k, v and the linear wi_1 branch)."""
  modules = {t: m for m, t in adapter_files.hf_module_map(TINY).items()}
  projection = {"ia3_key": "key", "ia3_value": "value", "ia3_ff": "wi_1"}
  state = {}
  for p, vec in params_lib.flatten(vectors).items():
    block, leaf = p.rsplit("/", 1)
    state[f"{modules[(block, projection[leaf])]}.multi_lora_b"] = torch.tensor(
        np.asarray(vec).reshape(-1, 1))
  torch.save(state, path)
  return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Three tiny tasks and their mixture, an orbax base, and one adapter per task: a peft
  directory, a T-Few state dict and a training checkpoint (MODEL_DIR/checkpoints/3)."""
  tu.enable_compilation_cache(tu.compilation_cache_dir(tmp_path_factory))
  root = tmp_path_factory.mktemp("adapter_bank")
  vocab = seqio.SentencePieceVocabulary(str(TOY / "spm.model"))
  rows = [json.loads(l) for l in (TOY / "validation.jsonl").read_text().splitlines()]
  start = 0
  for key, n in zip(KEYS, SIZES):
    split = rows[start:start + n]
    data.register_task(key, {"train": split, "validation": split}, str(TOY / "toy.yaml"),
                       vocabulary=vocab, num_choices=2)
    start += n
  data.add_mixture(MIXTURE, [f"{k}_eval" for k in KEYS], kind="eval", default_split="validation")
  base = hf_checkpoints.save_params(root / "base", tu.random_base_params(TINY))
  vectors = {k: _vectors(i) for i, k in enumerate(KEYS)}
  peft_dir = ia3_adapters.export_peft_adapter(vectors[KEYS[0]], TINY, root / "adapters" / "rte")
  tfew = _tfew_file(vectors[KEYS[1]], root / "adapters" / "cb.pt")
  hf_checkpoints.save_params(root / "run" / "checkpoints" / "3" / "trainable", vectors[KEYS[2]])
  adapters = {KEYS[0]: str(peft_dir), KEYS[1]: str(tfew), KEYS[2]: str(root / "run")}
  return {"root": root, "base": str(base), "adapters": adapters, "vectors": vectors}


def _source(name: str) -> data.SeqioBatches:
  return data.SeqioBatches(name, LENGTHS, shuffle=False, repeat=False)


def _run(kind: str, out: pathlib.Path, env: dict, name: str, adapters) -> dict:
  return getattr(runs, kind)(output_dir=str(out), data=_source(name), batch_size=4,
                             model=ModelSpec(TINY, peft=ia3.IA3Config(),
                                             initial_checkpoint_path=env["base"]),
                             checkpoint_path=None, adapters=adapters)


def _rows(path: pathlib.Path) -> dict:
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  return {(r["task"], r["template_id"], r["example_id"]): r for r in rows}


# --------------------------------------------------------------------------- the bank


def test_bank_rows_add_remove_replace():
  like = ia3.init_ia3(TINY)
  bank = banks.AdapterBank(like, 3)
  assert bank.capacity == 3 and len(bank) == 0
  assert all(np.all(v == 1) and v.shape[0] == 3 for v in params_lib.flatten(bank.params()).values())
  a, b = _vectors(0), _vectors(1)
  assert bank.add("a", a, {"source": "x/a"}) == 0 and bank.add("b", b) == 1
  assert bank.task_id_map() == {"a": 0, "b": 1} and bank.info("a").source == "x/a"
  for path, vec in params_lib.flatten(a).items():
    np.testing.assert_array_equal(params_lib.flatten(bank.params())[path][0], vec[0])
    np.testing.assert_array_equal(params_lib.flatten(bank.select("a"))[path], vec)
  before = bank.params()
  assert bank.remove("a") == 0 and "a" not in bank
  assert all(np.all(v[0] == 1) for v in params_lib.flatten(bank.params()).values())
  assert bank.add("c", a) == 0  # the freed row is reused
  bank.replace("b", a)
  for path, vec in params_lib.flatten(a).items():
    np.testing.assert_array_equal(params_lib.flatten(bank.params())[path][1], vec[0])
    np.testing.assert_array_equal(params_lib.flatten(before)[path][0], vec[0])  # not mutated
  assert {p: v.shape for p, v in params_lib.flatten(bank.params()).items()} == {
      p: (3,) + v.shape[1:] for p, v in params_lib.flatten(like).items()}
  assert repr(bank) == "AdapterBank(2/3 rows: c=0, b=1)"


def test_bank_errors_name_the_adapter():
  bank = banks.AdapterBank(ia3.init_ia3(TINY), 2)
  bank.add("a", _vectors(0))
  with pytest.raises(AdapterError, match=r"adapter 'a' is already in the bank \(row 0\); use "
                     r"replace\(\)"):
    bank.add("a", _vectors(1))
  with pytest.raises(AdapterError, match=r"no adapter 'z' in the bank \(adapters: a\)"):
    bank.remove("z")
  with pytest.raises(AdapterError, match=r"no adapter 'z'"):
    bank.replace("z", _vectors(1))
  wide = TINY.replace(mlp_dim=48)
  with pytest.raises(AdapterError, match=r"adapter 'wide': .*ia3_ff has shape \(1, 48\), the "
                     r"bank's rows are \(64,\) \(an adapter for another base model shape\?\)"):
    bank.add("wide", _vectors(2, cfg=wide))
  with pytest.raises(AdapterError, match=r"adapter 'q' has other params than the bank \(other "
                     r"sites or layers\?\): 6 not in the bank \(ia3_query;"):
    bank.add("q", _vectors(3, sites=("q", "k", "v", "ff")))
  bank.add("b", _vectors(4))
  with pytest.raises(AdapterError, match=r"adapter 'c': the bank is full \(2 of 2 rows hold a, "
                     r"b\)"):
    bank.add("c", _vectors(5))


def test_loader_reads_every_kind_and_checks_shapes(env, tmp_path):
  bank = runs.load_adapters(env["adapters"], TINY, capacity=5)
  assert bank.names == KEYS and bank.capacity == 5
  assert bank.info(KEYS[0]).sites == ("k", "v", "ff")
  assert bank.info(KEYS[2]).source.endswith("run/checkpoints/3/trainable")
  for key in KEYS:  # peft, T-Few and checkpoint vectors arrive unchanged
    for path, vec in params_lib.flatten(env["vectors"][key]).items():
      tolerances.assert_close(params_lib.flatten(bank.select(key))[path], vec, err_msg=path)
  # a directory of adapters: one per entry, named by its stem
  by_dir = ia3_adapters.load_adapter_bank(env["root"] / "adapters", TINY)
  assert by_dir.names == ("cb", "rte")
  folder = env["root"] / "adapters"
  (folder / "rte.pt").write_bytes((folder / "cb.pt").read_bytes())
  try:
    with pytest.raises(AdapterError, match=r"two adapters named 'rte' \(rte and rte.pt\)"):
      ia3_adapters.load_adapter_bank(env["root"] / "adapters", TINY)
  finally:
    (folder / "rte.pt").unlink()
  wide = TINY.replace(mlp_dim=48)
  other = ia3_adapters.export_peft_adapter(_vectors(7, cfg=wide), wide, tmp_path / "wide")
  with pytest.raises(AdapterError, match=r"adapter 'wide': .* has 48 entries, model expects 64"):
    ia3_adapters.load_adapter_bank({"wide": other}, TINY)
  with pytest.raises(AdapterError, match=r"3 adapters \(.*\) do not fit a bank of capacity 2"):
    runs.load_adapters(env["adapters"], TINY, capacity=2)
  # the old list API is the bank's values
  old = ia3_adapters.load_adapters_into_bank([env["adapters"][KEYS[0]], env["adapters"][KEYS[1]]],
                                             TINY)
  assert ia3.num_tasks_of(old) == 2


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def alone(env, tmp_path_factory) -> dict:
  """Score rows of each task run alone, with a bank of its own adapter only."""
  rows = {}
  for key in KEYS:
    out = _run("score", tmp_path_factory.mktemp(key), env, f"{key}_eval",
               {key: env["adapters"][key]})
    rows.update(_rows(pathlib.Path(out["path"])))
  return rows


def test_mixed_task_scores_equal_single_adapter_runs(env, alone, tmp_path):
  """score over the 3-task mixture (one bank, mixed batches, one pass) == each task alone:
  the same predictions, scores within tolerance."""
  mixed = _run("score", tmp_path / "mixed", env, MIXTURE, env["adapters"])
  lines = [json.loads(l) for l in pathlib.Path(mixed["path"]).read_text().splitlines()]
  assert any(len({r["task"] for r in lines[i:i + 4]}) > 1 for i in range(0, len(lines), 4))
  rows = _rows(pathlib.Path(mixed["path"]))
  assert len(rows) == 2 * sum(SIZES) and sorted(alone) == sorted(rows)
  for k, r in rows.items():
    assert r["prediction"] == alone[k]["prediction"], k
    tolerances.assert_close(r["scores"], alone[k]["scores"], err_msg=str(k))
  assert len({r["prediction"] for r in rows.values()}) == 2  # the adapters matter


def test_adding_an_adapter_under_capacity_does_not_recompile(env):
  """One compiled classifier serves the bank before and after `add_adapter`: rows of the new
  adapter change, the others' scores stay bit for bit."""
  two = {k: env["adapters"][k] for k in KEYS[:2]}
  tr, params, bank = runs.load_bank_for_inference(
      two, ModelSpec(TINY, initial_checkpoint_path=env["base"]), capacity=4)
  classifier = scoring.RankClassifier(tr.model)
  batch = dict(next(_source(MIXTURE)(batch_size=8, start_step=0, shard_id=0, num_shards=1)))
  batch["task_id"] = np.array([0, 1, 2, 2, 0, 1, 2, 3], np.int32)  # rows 2, 3: no adapter yet
  before = np.asarray(classifier(params, batch)["scores"])
  with pytest.raises(AdapterError, match=r"adapter 'bank_copa': .*/run: neither a peft adapter "
                     r"directory .* for a training checkpoint give its <step>/trainable"):
    ia3_adapters.add_adapter(bank, KEYS[2], env["adapters"][KEYS[2]], TINY)
  source = runs.adapter_source(env["adapters"][KEYS[2]])  # MODEL_DIR -> checkpoints/3/trainable
  assert ia3_adapters.add_adapter(bank, KEYS[2], source, TINY) == 2
  params = runs.with_bank(tr, params, bank)
  after = np.asarray(classifier(params, batch)["scores"])
  assert classifier.num_traces == 1 and classifier.cache_size() == 1
  new = batch["task_id"] == 2
  np.testing.assert_array_equal(after[~new], before[~new])  # other rows: the same program
  assert not np.allclose(after[new], before[new])
  bank.remove(KEYS[0])
  classifier(runs.with_bank(tr, params, bank), batch)
  assert classifier.num_traces == 1


def test_infer_rows_name_their_task(env, tmp_path):
  _run("infer", tmp_path / "out", env, MIXTURE, env["adapters"])
  rows = [json.loads(l) for l in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
  for key, n in zip(KEYS, SIZES):
    assert sum(r["task"] == key for r in rows) == 2 * n
    assert {r["task_id"] for r in rows if r["task"] == key} == {KEYS.index(key)}
  assert all(r["prediction_text"] in ("yes", "no", "good", "bad") for r in rows)


def test_a_bank_with_other_blocks_or_a_checkpoint_is_a_config_error(env, tmp_path):
  from ia3_jax.peft import lora
  with pytest.raises(ConfigError, match=r"ADAPTERS holds \(IA\)\^3 adapters, but the run's PEFT "
                     r"method is lora; include peft/ia3.gin"):
    runs.bank_spec(runs.load_adapters(env["adapters"], TINY),
                   ModelSpec(TINY, peft=lora.LoraConfig()))
  with pytest.raises(ConfigError, match=r"CHECKPOINT_PATH='x' and ADAPTERS are both set"):
    runs.evaluate(output_dir=str(tmp_path), model=ModelSpec(TINY), data=_source(MIXTURE),
                  batch_size=4, checkpoint_path="x", adapters=env["adapters"])


# --------------------------------------------------------------------------- command line


def _cli(kind: str, env: dict, tmp_path: pathlib.Path, adapters: str, capsys) -> tuple[int, str]:
  rc = cli.main([kind, *LAYERS, f"--gin.INITIAL_CHECKPOINT_PATH='{env['base']}'",
                 "--gin.CHECKPOINT_PATH=None", f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'",
                 "--gin.BATCH_SIZE=4", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
                 f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'", f"--gin.ADAPTERS={adapters}"])
  return rc, capsys.readouterr().err


def test_cli_eval_with_adapters_writes_per_task_accuracy(env, alone, tmp_path, capsys):
  """`ia3-jax eval --gin.ADAPTERS=...` over the mixture: per-task accuracies equal those of
  each task alone; templates named per task."""
  rc, err = _cli("eval", env, tmp_path, repr(env["adapters"]), capsys)
  assert rc == 0, err
  saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
  assert set(saved["per_task"]) == set(KEYS) and "per_template" not in saved
  assert saved["adapters"][KEYS[1]] == {"task_id": 1, "source": env["adapters"][KEYS[1]]}
  for key, n in zip(KEYS, SIZES):
    task = saved["per_task"][key]
    mine = [r for k, r in alone.items() if k[0] == key]
    assert task["num_examples"] == 2 * n and task["task_id"] == KEYS.index(key)
    assert task["num_correct"] == sum(r["prediction"] == r["label"] for r in mine)
    assert set(task["per_template"]) == {"is it positive", "review sentiment"}
  assert saved["num_examples"] == 2 * sum(SIZES)
  assert saved["num_correct"] == sum(t["num_correct"] for t in saved["per_task"].values())


@pytest.mark.parametrize("case, line", [
    ("missing", f"error: {MIXTURE}: task 'bank_copa' has no adapter (ADAPTERS has bank_rte, "
                "bank_cb); add one for it"),
    ("shape", "error: adapter 'bank_cb': {wide}: vector for decoder/layers_0/mlp/ia3_ff has 48 "
              "entries, model expects 64"),
    ("duplicate", "error: {dir}: two adapters named 'bank_rte' (bank_rte and bank_rte.pt); "
                  "rename one"),
], ids=["missing", "shape", "duplicate"])
def test_cli_adapter_errors_are_one_line(env, tmp_path, capsys, case, line):
  adapters = dict(env["adapters"])
  wide = TINY.replace(mlp_dim=48)
  if case == "missing":
    del adapters[KEYS[2]]
  elif case == "shape":
    adapters[KEYS[1]] = str(ia3_adapters.export_peft_adapter(_vectors(8, cfg=wide), wide,
                                                             tmp_path / "wide"))
  else:
    folder = tmp_path / "adapters"
    ia3_adapters.export_peft_adapter(_vectors(9), TINY, folder / "bank_rte")
    _tfew_file(_vectors(10), folder / "bank_rte.pt")
    adapters = str(folder)
  rc, err = _cli("eval", env, tmp_path, repr(adapters), capsys)
  assert rc == 1 and "Traceback" not in err
  assert err.strip() == line.format(wide=tmp_path / "wide", dir=tmp_path / "adapters")


def test_eval_help_lists_adapters(capsys):
  with pytest.raises(SystemExit):
    cli.main(["eval", "--help"])
  assert "ADAPTERS                   = None" in capsys.readouterr().out
