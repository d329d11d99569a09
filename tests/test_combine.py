"""Combining (IA)^3 and LoRA adapters (`ia3_jax.peft.combine`, `ia3-jax combine`).

linear and multiplicative are checked against peft (PyTorch, CPU); task arithmetic
and TIES against NumPy transcriptions of the papers' formulas written here, on
vectors drawn from a few dyadic values so that exact ties in magnitude, zero task
vectors and sign sums of exactly 0 occur.
"""

import math

import numpy as np
import pytest
import torch
from peft import IA3Config, TaskType, get_peft_model
from transformers import T5ForConditionalGeneration

from ia3_jax import cli
from ia3_jax.errors import AdapterError, ConfigError
from ia3_jax.interop import adapter_files, hf_checkpoints, ia3_adapters
from ia3_jax.model import params as params_lib
from ia3_jax.peft import combine, ia3, lora
from tests import hf_utils
from tests import tolerances


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(HF dir, config, base params, batch) of a tiny random T5 1.1."""
  d = tmp_path_factory.mktemp("t5_1_1")
  hf_utils.make_hf_model(d, "t5_1_1", seed=3)
  config, params = hf_checkpoints.load_hf_checkpoint(d)
  batch = hf_utils.random_batch(np.random.default_rng(0), config.vocab_size, batch=3,
                                enc_len=9, dec_len=5)
  return d, config, params, batch


def _random(config, seed, values=None, sites=ia3.DEFAULT_SITES, num_tasks=1):
  """A one-task (IA)^3 tree: uniform in [0.3, 1.7], or drawn from `values`."""
  rng = np.random.default_rng(seed)
  flat = params_lib.flatten(ia3.init_ia3(config, sites, num_tasks))
  draw = (lambda s: rng.uniform(0.3, 1.7, s)) if values is None else (
      lambda s: rng.choice(values, s))
  return params_lib.unflatten({p: draw(v.shape).astype(np.float32) for p, v in flat.items()})


def _logits(config, base_params, vectors, batch):
  model = ia3.ia3_model(config, ia3.sites_of(vectors))
  return np.asarray(model.apply({"params": ia3.insert_ia3(base_params, vectors)},
                                batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                batch["decoder_target_tokens"]))


def _flat(tree):
  return {p: np.asarray(v, np.float64) for p, v in params_lib.flatten(tree).items()}


def _assert_trees_close(actual, desired):
  actual, desired = _flat(actual), _flat(desired)
  assert sorted(actual) == sorted(desired)
  for path in desired:
    tolerances.assert_close(actual[path], desired[path], err_msg=path)


# --------------------------------------------------------------------------- peft


def test_linear_and_multiplicative_match_peft(base, tmp_path):
  """linear == peft's add_weighted_adapter; multiplicative == peft with both adapters active."""
  base_dir, config, params, batch = base
  hf = T5ForConditionalGeneration.from_pretrained(base_dir).eval()
  settings = dict(task_type=TaskType.SEQ_2_SEQ_LM, init_ia3_weights=False)
  torch.manual_seed(0)
  model = get_peft_model(hf, IA3Config(**settings)).eval()
  model.add_adapter("b", IA3Config(**settings))  # random too (standard normal)
  model.save_pretrained(tmp_path / "saved")      # default at the root, b in saved/b
  a_vec = ia3_adapters.import_peft_adapter(tmp_path / "saved", config)
  b_vec = ia3_adapters.import_peft_adapter(tmp_path / "saved" / "b", config)
  valid = batch["decoder_target_tokens"] > 0

  weights = [0.7, -0.4]  # peft allows any reals (no sum-to-one or sign requirement)
  model.add_weighted_adapter(["default", "b"], weights, "combo")
  model.set_adapter("combo")
  ours = combine.linear({"a": a_vec, "b": b_vec}, weights)
  model.save_pretrained(tmp_path / "combo", selected_adapters=["combo"])
  _assert_trees_close(ours, ia3_adapters.import_peft_adapter(tmp_path / "combo" / "combo", config))
  theirs = hf_utils.torch_logits(model, batch)
  tolerances.assert_close_to_torch(_logits(config, params, ours, batch)[valid], theirs[valid])

  model.base_model.set_adapter(["default", "b"])
  both = hf_utils.torch_logits(model, batch)
  assert np.abs(both - theirs).max() > 0.1  # another adapter: the checks are not vacuous
  product = combine.multiplicative([a_vec, b_vec])
  tolerances.assert_close_to_torch(_logits(config, params, product, batch)[valid], both[valid])


def test_multiplicative_is_applying_both_in_sequence(base):
  """The product vectors on the base == b's vectors on the base with a's folded in."""
  _, config, params, batch = base
  a, b, c = (_random(config, s) for s in (1, 2, 3))
  folded, _ = ia3.merge(ia3.insert_ia3(params, a))
  folded_twice, _ = ia3.merge(ia3.insert_ia3(folded, b))
  in_sequence = _logits(config, folded_twice, c, batch)
  tolerances.assert_close(_logits(config, params, combine.multiplicative([a, b, c]), batch),
                          in_sequence)


# --------------------------------------------------------------------------- NumPy references

DYADIC = np.array([0.25, 0.5, 0.75, 1.0, 1.0, 1.25, 1.5, 1.75])  # l - 1 in {+-0.75, ..., 0}


def _task_matrix(trees):
  """[tasks, entries]: each adapter's tau = l - 1, all params in sorted-path order."""
  flats = [_flat(t) for t in trees]
  paths = sorted(flats[0])
  return np.stack([np.concatenate([f[p].reshape(-1) for p in paths]) - 1.0 for f in flats]), paths


def _as_matrix(tree, paths):
  f = _flat(tree)
  return np.concatenate([f[p].reshape(-1) for p in paths])


def _task_arithmetic_reference(trees, lam, weights):
  """Ilharco et al. 2023: theta = theta_0 + lambda sum_i w_i (theta_i - theta_0), theta_0 = 1."""
  taus, _ = _task_matrix(trees)
  return 1.0 + lam * sum(w * t for w, t in zip(weights, taus))


def _ties_reference(trees, k, lam):
  """Yadav et al. 2023, Algorithm 1, entry by entry (k a percentage; ties at the threshold kept)."""
  taus, _ = _task_matrix(trees)
  d = taus.shape[1]
  keep = -(-k * d // 100)  # ceil(k% of d) on integers
  trimmed = []
  for tau in taus.tolist():  # plain Python floats from here on
    threshold = sorted((abs(t) for t in tau), reverse=True)[keep - 1]
    trimmed.append([t if abs(t) >= threshold else 0.0 for t in tau])
  out = []
  for j in range(d):
    column = [t[j] for t in trimmed]
    total = sum(column)
    gamma = (total > 0) - (total < 0)
    agree = [v for v in column if v != 0 and (v > 0) - (v < 0) == gamma]
    out.append(1.0 + lam * (sum(agree) / len(agree) if agree else 0.0))
  return np.array(out)


@pytest.mark.parametrize("lam,weights", [(1.0, None), (0.5, [1.0, -2.0, 0.25])])
def test_task_arithmetic_matches_the_formula(base, lam, weights):
  _, config, _, _ = base
  trees = [_random(config, s, DYADIC) for s in (4, 5, 6)]
  _, paths = _task_matrix(trees)
  got = combine.task_arithmetic(trees, lam, weights)
  want = _task_arithmetic_reference(trees, lam, weights or [1.0] * 3)
  tolerances.assert_close(_as_matrix(got, paths), want)
  if weights is None:  # weights summing to 1: the same as linear
    _assert_trees_close(combine.task_arithmetic(trees, 1.0, [0.5, 0.25, 0.25]),
                        combine.linear(trees, [0.5, 0.25, 0.25]))


@pytest.mark.parametrize("k", [5, 20, 37, 100])
@pytest.mark.parametrize("lam", [1.0, 1.5])
def test_ties_matches_algorithm_1(base, k, lam):
  _, config, _, _ = base
  trees = [_random(config, s, DYADIC) for s in (7, 8, 9, 10)]
  taus, paths = _task_matrix(trees)
  assert (taus == 0).any() and (taus.sum(axis=0) == 0).any()  # zeros and zero sign sums occur
  got = combine.ties(trees, k, lam)
  tolerances.assert_close(_as_matrix(got, paths), _ties_reference(trees, k, lam))
  assert all(np.asarray(v).dtype == np.float32 and np.shape(v)[0] == 1
             for v in params_lib.flatten(got).values())


def _hand(key, ff):
  return {"encoder": {"layers_0": {"attention": {"ia3_key": np.array([key], np.float32) + 1},
                                   "mlp": {"ia3_ff": np.array([ff], np.float32) + 1}}}}


@pytest.mark.parametrize("k,lam,key,ff", [
    # keep 3 of 6 per adapter (trimmed over the whole adapter: a's ff entries go, although
    # per tensor its 0.125 would stay); entries 0, 1 tie at |0.5| and their sum is 0 -> 1
    (50, 1.0, [1, 1, 1, 1.25], [1, 1]),
    # nothing trimmed: a's -0.0625 disagrees with the elected + and is left out of the mean
    (100, 2.0, [1, 1, 1, 1.5], [1.25, 1.25]),
    # keep 1: both |0.5| entries tie at the threshold and are kept; they cancel -> ones
    (10, 1.0, [1, 1, 1, 1], [1, 1]),
])
def test_ties_by_hand(k, lam, key, ff):
  a = _hand([0.5, -0.5, 0.0, 0.25], [0.125, -0.0625])
  b = _hand([-0.5, 0.5, 0.0, 0.25], [0.0, 0.125])
  got = _flat(combine.ties([a, b], k, lam))
  np.testing.assert_array_equal(got["encoder/layers_0/attention/ia3_key"], [key])
  np.testing.assert_array_equal(got["encoder/layers_0/mlp/ia3_ff"], [ff])


# --------------------------------------------------------------------------- LoRA


def _lora_tree(rng, rank, out=16):
  return {"encoder": {"layers_0": {"attention": {
      "query_lora_a": rng.normal(size=(8, rank)).astype(np.float32),
      "query_lora_b": rng.normal(size=(rank, out)).astype(np.float32)}}}}


def test_lora_linear_concatenates_ranks():
  rng = np.random.default_rng(0)
  trees = [_lora_tree(rng, 2), _lora_tree(rng, 3)]
  weights, scalings = [0.5, -1.5], [2.0, 4.0 / 3.0]
  cat = combine.lora_linear(trees, weights, scalings)
  site = "encoder/layers_0/attention/query"
  assert np.shape(params_lib.flatten(cat)[site + "_lora_a"]) == (8, 5)
  want = sum(w * s * np.asarray(t["encoder"]["layers_0"]["attention"]["query_lora_a"], np.float64)
             @ np.asarray(t["encoder"]["layers_0"]["attention"]["query_lora_b"], np.float64)
             for w, s, t in zip(weights, scalings, trees))
  delta = params_lib.flatten(combine.lora_deltas(cat))[site + "/kernel"]
  tolerances.assert_close(delta, want)
  kernel = rng.normal(size=(8, 16)).astype(np.float32)
  merged = lora.merge_lora(params_lib.combine(
      params_lib.unflatten({site + "/kernel": kernel}), cat), alpha=5.0)  # rank 5, scaling 1
  tolerances.assert_close(params_lib.flatten(merged)[site + "/kernel"], kernel + want)


def test_lora_bad_inputs():
  rng = np.random.default_rng(1)
  a, b = _lora_tree(rng, 2), _lora_tree(rng, 2, out=12)
  with pytest.raises(AdapterError, match=r"adapter 1: encoder/layers_0/attention/query maps "
                                         r"8 -> 12, adapter 0 8 -> 16"):
    combine.lora_linear([a, b], [1.0, 1.0])
  other = {"encoder": {"layers_0": {"attention": {
      "key" + s: v for s, v in (("_lora_a", rng.normal(size=(8, 2))),
                                ("_lora_b", rng.normal(size=(2, 16))))}}}}
  with pytest.raises(AdapterError, match="adapter 'x' has other LoRA targets than adapter 'w'"):
    combine.lora_linear({"w": a, "x": other}, [1.0, 1.0])
  with pytest.raises(ConfigError, match="scalings: 1 given for 2 adapters"):
    combine.lora_linear([a, a], [1.0, 1.0], scalings=[1.0])
  with pytest.raises(AdapterError, match="adapter 0: not LoRA params .*ia3_key"):
    combine.lora_linear([_hand([0.0] * 4, [0.0] * 2)], [1.0])


# --------------------------------------------------------------------------- bad input

METHODS = {
    "linear": lambda ads: combine.linear(ads, [0.5] * len(ads)),
    "multiplicative": combine.multiplicative,
    "task_arithmetic": combine.task_arithmetic,
    "ties": combine.ties,
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_adapters_that_do_not_fit_name_the_adapter(base, method):
  _, config, _, _ = base
  run = METHODS[method]
  good = _random(config, 0)
  with pytest.raises(AdapterError, match="adapters: none given"):
    run([])
  with pytest.raises(AdapterError, match=r"adapter 1 has other params than adapter 0: sites "
                                         r"\['k', 'v'\] vs \['k', 'v', 'ff'\]"):
    run([good, _random(config, 1, sites=("k", "v"))])
  wider = _random(config.replace(mlp_dim=48), 2)
  with pytest.raises(AdapterError, match=r"adapter 'wide': decoder/layers_0/mlp/ia3_ff has shape "
                                         r"\(48,\), adapter 'rte' has \(64,\) .*another base"):
    run({"rte": good, "wide": wider})
  deeper = _random(config.replace(num_decoder_layers=3), 3)
  with pytest.raises(AdapterError, match="adapter 1 has other params .*other layers"):
    run([good, deeper])
  with pytest.raises(AdapterError, match="adapter 'bank': a bank of 2 tasks .*select_task"):
    run({"one": good, "bank": _random(config, 4, num_tasks=2)})
  with pytest.raises(AdapterError, match="adapter 0: not \\(IA\\)\\^3 params: .*query/kernel"):
    run([{"encoder": {"layers_0": {"attention": {"query": {"kernel": np.ones((2, 2))}}}}}])
  with pytest.raises(AdapterError, match="adapter 0: holds no \\(IA\\)\\^3 vectors"):
    run([{}])
  with pytest.raises(AdapterError, match="got one param tree"):
    run(good)


def test_bad_arguments_name_the_argument(base):
  _, config, _, _ = base
  a, b = _random(config, 0), _random(config, 1)
  with pytest.raises(ConfigError, match=r"weights: 1 given for 2 adapters"):
    combine.linear([a, b], [1.0])
  with pytest.raises(ConfigError, match=r"weights: 3 given for 2 adapters"):
    combine.task_arithmetic([a, b], 1.0, [1.0, 1.0, 1.0])
  with pytest.raises(ConfigError, match=r"weights\[1\] = nan: must be a finite real number"):
    combine.linear([a, b], [1.0, float("nan")])
  with pytest.raises(ConfigError, match=r"weights\[0\] = '1': must be a finite real number"):
    combine.linear([a, b], ["1", 2.0])
  with pytest.raises(ConfigError, match=r"weights: expected a list of one number per adapter"):
    combine.linear([a, b], 0.5)
  with pytest.raises(ConfigError, match=r"lambda_ = inf: must be a finite"):
    combine.task_arithmetic([a, b], math.inf)
  with pytest.raises(ConfigError, match=r"lambda_ = nan: must be a finite"):
    combine.ties([a, b], 20, math.nan)
  for k in (0, -5, 100.5, 1000):
    with pytest.raises(ConfigError, match=rf"k = {float(k)!r}: must be in \(0, 100\]"):
      combine.ties([a, b], k)
  with pytest.raises(ConfigError, match=r"k = nan: must be a finite"):
    combine.ties([a, b], math.nan)


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def adapter_paths(base, tmp_path_factory):
  """Two peft adapter directories and a T-Few state dict, with random vectors."""
  base_dir, config, _, _ = base
  root = tmp_path_factory.mktemp("adapters")
  paths = []
  for i in range(2):
    paths.append(str(ia3_adapters.export_peft_adapter(_random(config, 20 + i, DYADIC), config,
                                                      root / f"peft{i}")))
  state = {}
  modules = {target: module for module, target in adapter_files.hf_module_map(config).items()}
  for path, vec in params_lib.flatten(_random(config, 22, DYADIC)).items():
    block, leaf = path.rsplit("/", 1)
    proj = {"ia3_key": "key", "ia3_value": "value", "ia3_ff": "wi_1"}[leaf]
    module = modules[(block, proj)]
    state[f"{module}.multi_lora_b"] = torch.tensor(np.asarray(vec).reshape(-1, 1))
  torch.save(state, root / "tfew.pt")
  paths.append(str(root / "tfew.pt"))
  return paths


@pytest.mark.parametrize("method,flags,call", [
    ("ties", ["--k", "30", "--lambda", "1.5"], lambda ads: combine.ties(ads, 30, 1.5)),
    ("linear", ["--weights", "0.5", "0.3", "0.2"],
     lambda ads: combine.linear(ads, [0.5, 0.3, 0.2])),
    ("task_arithmetic", ["--weights", "1", "-1", "0.5", "--lambda", "0.8"],
     lambda ads: combine.task_arithmetic(ads, 0.8, [1, -1, 0.5])),
    ("multiplicative", [], combine.multiplicative),
])
@pytest.mark.parametrize("shape", [["--base", "{base}"], ["--model", "tiny"]])
def test_combine_command_writes_the_combined_adapter(base, adapter_paths, tmp_path, capsys, method,
                                                     flags, call, shape):
  base_dir, config, _, _ = base
  out = tmp_path / "out"
  argv = ["combine", "--method", method, "--adapters", *adapter_paths, *flags,
          *[s.format(base=base_dir) for s in shape], "--out", str(out)]
  assert cli.main(argv) == 0, capsys.readouterr().err
  assert f"wrote peft adapter {out}" in capsys.readouterr().out
  want = call([ia3_adapters.import_adapter(p, config) for p in adapter_paths])
  got = ia3_adapters.import_peft_adapter(out, config)
  for path, vec in _flat(want).items():
    np.testing.assert_array_equal(_flat(got)[path], vec, err_msg=path)  # float32 both ways


@pytest.mark.parametrize("args,message", [
    (["--method", "linear", "--weights", "1"], "weights: 1 given for 3 adapters"),
    (["--method", "linear"], "--weights: --method linear needs one weight per adapter"),
    (["--method", "ties", "--k", "0"], r"k = 0.0: must be in (0, 100]"),
    (["--method", "multiplicative", "--lambda", "2"], "--lambda: not used by --method "
                                                      "multiplicative"),
])
def test_combine_command_bad_input_is_one_line(base, adapter_paths, tmp_path, capsys, args,
                                               message):
  base_dir, _, _, _ = base
  rc = cli.main(["combine", "--adapters", *adapter_paths, *args, "--base", str(base_dir),
                 "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert rc == 1, err
  assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {message}"), err
  assert not (tmp_path / "out").exists()


def test_combine_command_names_the_adapter_that_does_not_fit(base, adapter_paths, tmp_path, capsys):
  base_dir, config, _, _ = base
  kv = ia3_adapters.export_peft_adapter(_random(config, 30, sites=("k", "v")), config,
                                        tmp_path / "kv")
  rc = cli.main(["combine", "--method", "ties", "--adapters", adapter_paths[0], str(kv),
                 "--base", str(base_dir), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert rc == 1 and len(err.strip().splitlines()) == 1
  assert err.startswith(f"error: adapter '{kv}' has other params than adapter "
                        f"'{adapter_paths[0]}': sites ['k', 'v'] vs ['k', 'v', 'ff']"), err
