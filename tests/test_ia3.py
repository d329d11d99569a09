"""(IA)^3 module overrides, task banks, merging, counts and the gin file."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ia3_jax.model import network
from ia3_jax.model import params as params_lib
from ia3_jax.model.config import get_config
from ia3_jax.peft import ia3
from tests import hf_utils
from tests import tolerances

CONFIGS = {
    "gated": get_config("tiny"),
    "relu": get_config("tiny", mlp_activations=("relu",), logits_via_embedding=True),
}
ALL_SITES = ia3.SITES


@functools.lru_cache(maxsize=None)
def _base(kind):
  config = CONFIGS[kind]
  params = network.init_params(network.Transformer(config), jax.random.key(0))
  batch = hf_utils.random_batch(np.random.default_rng(0), config.vocab_size, batch=6,
                                enc_len=9, dec_len=5)
  return config, params, batch


def _logits(model, params, batch, task_id=None):
  return np.asarray(model.apply({"params": params}, batch["encoder_input_tokens"],
                                batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                                task_id=task_id))


def _random_ia3(config, sites, num_tasks, seed):
  """Non-identity vectors in [0.3, 1.7)."""
  flat = params_lib.flatten(ia3.init_ia3(config, sites, num_tasks))
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return params_lib.unflatten({path: jax.random.uniform(k, v.shape, minval=0.3, maxval=1.7)
                      for k, (path, v) in zip(keys, sorted(flat.items()))})


@pytest.mark.parametrize("kind", ["gated", "relu"])
def test_ones_equal_base_exactly(kind):
  config, base, batch = _base(kind)
  expected = _logits(network.Transformer(config), base, batch)
  single = ia3.with_ia3(base, config, ALL_SITES, 1)
  np.testing.assert_array_equal(_logits(ia3.ia3_model(config, ALL_SITES, 1), single, batch),
                                expected)
  bank = ia3.with_ia3(base, config, ALL_SITES, 3)
  task_id = jnp.array([0, 1, 2, 2, 1, 0])
  np.testing.assert_array_equal(
      _logits(ia3.ia3_model(config, ALL_SITES, 3), bank, batch, task_id), expected)


def test_param_names_shapes_axes():
  config = CONFIGS["gated"]
  model = ia3.ia3_model(config, num_tasks=2)
  axes = params_lib.flatten(network.logical_axes(model, with_task_id=True))
  params = network.init_params(model, jax.random.key(1), with_task_id=True)
  vectors, base = ia3.extract_ia3(params)
  kv, ff = ("tasks", "joined_kv"), ("tasks", "mlp")
  expected = {}
  for i in range(config.num_encoder_layers):
    expected.update({f"encoder/layers_{i}/attention/ia3_key": kv,
                     f"encoder/layers_{i}/attention/ia3_value": kv,
                     f"encoder/layers_{i}/mlp/ia3_ff": ff})
  for i in range(config.num_decoder_layers):
    for att in ("self_attention", "encoder_decoder_attention"):
      expected.update({f"decoder/layers_{i}/{att}/ia3_key": kv,
                       f"decoder/layers_{i}/{att}/ia3_value": kv})
    expected[f"decoder/layers_{i}/mlp/ia3_ff"] = ff
  flat = params_lib.flatten(vectors)
  assert sorted(flat) == sorted(expected)
  for path, names in expected.items():
    assert tuple(axes[path]) == names
    width = config.mlp_dim if names[1] == "mlp" else config.joined_kv
    assert flat[path].shape == (2, width)
    np.testing.assert_array_equal(flat[path], 1.0)
  # the base part is exactly the base network's tree
  plain = network.abstract_params(network.Transformer(config))
  assert params_lib.paths(base) == params_lib.paths(plain)
  assert ia3.sites_of(vectors) == ("k", "v", "ff") and ia3.num_tasks_of(vectors) == 2


def test_ablation_site_shapes():
  config = CONFIGS["gated"]
  flat = params_lib.flatten(ia3.init_ia3(config, ("q", "o", "attn_out", "mlp_out"), 1))
  att = "decoder/layers_0/encoder_decoder_attention/"
  assert flat[att + "ia3_query"].shape == (1, config.joined_kv)
  assert flat[att + "ia3_out_input"].shape == (1, config.joined_kv)
  assert flat[att + "ia3_attention_output"].shape == (1, config.emb_dim)
  assert flat["encoder/layers_1/mlp/ia3_mlp_output"].shape == (1, config.emb_dim)
  with pytest.raises(ValueError, match=r"ia3.IA3Config.sites=\('k', 'x'\): .*unknown \['x'\]"):
    ia3.ia3_blocks(sites=("k", "x"))
  with pytest.raises(ValueError, match="NUM_TASKS=0: must be a positive int"):
    ia3.ia3_blocks(num_tasks=0)


def test_ff_on_gated_mlp_equals_scaling_wi1_output():
  """l_ff scales wo's input; for a gated MLP that is the wi_1 (linear) branch's output."""
  config, base, batch = _base("gated")
  vec = _random_ia3(config, ("ff",), 1, seed=5)
  ours = _logits(ia3.ia3_model(config, ("ff",)), ia3.insert_ia3(base, vec), batch)
  scaled = jax.tree.map(lambda x: x, base)
  for stack in ("encoder", "decoder"):
    for i in range(2):
      mlp = scaled[stack][f"layers_{i}"]["mlp"]
      l_ff = vec[stack][f"layers_{i}"]["mlp"]["ia3_ff"][0]
      mlp["wi_1"] = {"kernel": mlp["wi_1"]["kernel"] * l_ff}
  reference = _logits(network.Transformer(config), scaled, batch)
  tolerances.assert_close(ours, reference)
  assert np.abs(ours - _logits(network.Transformer(config), base, batch)).max() > 1e-2


@pytest.mark.parametrize("kind", ["gated", "relu"])
def test_mixed_task_batch_equals_each_task_alone(kind):
  config, base, batch = _base(kind)
  bank = _random_ia3(config, ia3.DEFAULT_SITES, 3, seed=1)
  task_id = np.array([2, 0, 1, 1, 2, 0])
  mixed = _logits(ia3.ia3_model(config, num_tasks=3), ia3.insert_ia3(base, bank), batch, task_id)
  single_model = ia3.ia3_model(config)
  for t in range(3):
    rows = np.flatnonzero(task_id == t)
    sub = {k: v[rows] for k, v in batch.items()}
    alone = _logits(single_model, ia3.insert_ia3(base, ia3.select_task(bank, t)), sub)
    tolerances.assert_close(mixed[rows], alone)
  # tasks really differ, so the check above is not vacuous
  assert np.abs(_logits(single_model, ia3.insert_ia3(base, ia3.select_task(bank, 0)), batch)
                - _logits(single_model, ia3.insert_ia3(base, ia3.select_task(bank, 1)), batch)
                ).max() > 1e-2


def test_task_id_errors_and_out_of_range_nan():
  config, base, batch = _base("gated")
  model = ia3.ia3_model(config, num_tasks=2)
  params = ia3.with_ia3(base, config, num_tasks=2)
  with pytest.raises(ValueError, match="bank has 2 tasks: pass task_id"):
    _logits(model, params, batch)
  with pytest.raises(ValueError, match=r"task_id must have shape \[batch=6\]"):
    _logits(model, params, batch, jnp.zeros((3,), jnp.int32))
  out = _logits(model, params, batch, jnp.array([0, 1, 2, 0, 1, 0]))
  assert np.isnan(out[2]).all() and np.isfinite(np.delete(out, 2, axis=0)).all()


def test_decode_cache_with_task_bank():
  config, base, batch = _base("gated")
  model = ia3.ia3_model(config, num_tasks=2)
  params = ia3.insert_ia3(base, _random_ia3(config, ia3.DEFAULT_SITES, 2, seed=3))
  task_id = jnp.array([1, 0, 1, 0, 0, 1])
  full = _logits(model, params, batch, task_id)
  encoded, valid = model.apply({"params": params}, batch["encoder_input_tokens"], task_id=task_id,
                               method=network.Transformer.encode)
  dec_in = batch["decoder_input_tokens"]
  cache = network.init_decode_cache(model, params, encoded, valid, dec_in.shape[1], task_id=task_id)
  steps = []
  for t in range(dec_in.shape[1]):
    logits, mut = model.apply({"params": params, "cache": cache}, encoded, valid,
                              dec_in[:, t:t + 1], task_id=task_id, decode=True,
                              mutable=["cache"], method=network.Transformer.decode)
    cache = mut["cache"]
    steps.append(np.asarray(logits[:, 0]))
  # steps see no target padding mask; compare where targets are real
  valid_t = batch["decoder_target_tokens"] > 0
  tolerances.assert_close(np.stack(steps, 1)[valid_t], full[valid_t])


@pytest.mark.parametrize("kind", ["gated", "relu"])
def test_merge_matches_unmerged_and_unmerge_is_exact(kind):
  config, base, batch = _base(kind)
  params = ia3.insert_ia3(base, _random_ia3(config, ALL_SITES, 2, seed=2))
  task_id = jnp.ones((6,), jnp.int32)
  expected = _logits(ia3.ia3_model(config, ALL_SITES, 2), params, batch, task_id)
  merged, originals = ia3.merge(params, task=1)
  assert params_lib.paths(merged) == params_lib.paths(base)
  tolerances.assert_close(_logits(network.Transformer(config), merged, batch), expected)
  # merging changes only the kernels the vectors multiply
  changed = sorted(p for p in params_lib.paths(base)
                   if not np.array_equal(params_lib.flatten(base)[p], params_lib.flatten(merged)[p]))
  assert changed == sorted(params_lib.paths(originals["kernels"]))
  assert {p.rsplit("/", 2)[-2] for p in changed} == {"query", "key", "value", "out", "wo"}
  restored = ia3.unmerge(merged, originals)
  assert params_lib.paths(restored) == params_lib.paths(params)
  for path, value in params_lib.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(params_lib.flatten(restored)[path]), np.asarray(value))
  with pytest.raises(ValueError, match="task 2 out of range"):
    ia3.merge(params, task=2)
  with pytest.raises(ValueError, match="no \\(IA\\)\\^3 vectors"):
    ia3.merge(base)


def test_extract_insert_select_stack():
  config, base, _ = _base("gated")
  bank = _random_ia3(config, ia3.DEFAULT_SITES, 3, seed=4)
  params = ia3.insert_ia3(base, bank)
  got, rest = ia3.extract_ia3(params)
  assert params_lib.paths(rest) == params_lib.paths(base) and params_lib.paths(got) == params_lib.paths(bank)
  restacked = ia3.stack_tasks([ia3.select_task(bank, t) for t in range(3)])
  jax.tree.map(np.testing.assert_array_equal, restacked, bank)
  # inserting replaces existing vectors
  again = ia3.insert_ia3(params, ia3.init_ia3(config))
  assert ia3.num_tasks_of(ia3.extract_ia3(again)[0]) == 1
  with pytest.raises(ValueError, match="not \\(IA\\)\\^3 params"):
    ia3.insert_ia3(base, {"encoder": {"encoder_norm": {"scale": np.ones(3)}}})


def test_trainable_mask_selects_vectors_only():
  config, base, _ = _base("gated")
  params = ia3.with_ia3(base, config)
  trainable, frozen = params_lib.partition(params, ia3.trainable_mask(params))
  assert params_lib.paths(trainable) == params_lib.paths(ia3.init_ia3(config))
  assert params_lib.count(frozen) == params_lib.count(base)


def test_param_counts_via_eval_shape():
  # Encoder layer: d_k + d_v + d_ff; decoder layer: 2 d_k + 2 d_v + d_ff.
  abstract = {name: ia3.abstract_ia3(get_config(name)) for name in ("t0_3b", "t0_11b")}
  counts = {name: params_lib.count(a) for name, a in abstract.items()}
  assert counts == {"t0_3b": 540_672, "t0_11b": 1_081_344}
  for name, c in counts.items():
    cfg = get_config(name)
    kv, ff = cfg.joined_kv, cfg.mlp_dim
    assert c == cfg.num_encoder_layers * (2 * kv + ff) + cfg.num_decoder_layers * (4 * kv + ff)
  # 2.2 MB and 4.3 MB in fp32 (the paper quotes 4.2 MB for T0)
  assert {n: params_lib.nbytes(a) for n, a in abstract.items()} == {"t0_3b": 2_162_688, "t0_11b": 4_325_376}
  tiny = CONFIGS["gated"]
  assert ia3.count_ia3(tiny, num_tasks=4) == 4 * ia3.count_ia3(tiny)


def test_gin_file_builds_blocks():
  import gin
  from ia3_jax import gin_configurables
  root = pathlib.Path(gin_configurables.gin_dir())

  @gin.configurable("test_ia3_consumer")
  def consumer(model=None):
    return model

  try:
    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [str(root / "models" / "base.gin"), str(root / "models" / "tiny.gin"), str(root / "peft" / "ia3.gin")],
        ["NUM_TASKS = 3", "INITIAL_CHECKPOINT_PATH = None", "test_ia3_consumer.model = %MODEL"])
    spec = consumer()
  finally:
    gin.clear_config()
  blocks, trainable = spec.blocks(), spec.trainable_patterns
  assert isinstance(blocks, network.Blocks) and spec.use_task_id
  assert blocks.attention.func is ia3.IA3Attention and blocks.mlp.func is ia3.IA3Mlp
  assert blocks.attention.keywords == {"sites": ("k", "v", "ff"), "num_tasks": 3}
  config = CONFIGS["gated"]
  params = network.init_params(network.Transformer(config, blocks), jax.random.key(0),
                               with_task_id=True)
  mask = params_lib.trainable_mask(params, trainable)
  assert params_lib.count(params, mask) == 3 * ia3.count_ia3(config)


def test_merge_checkpoint_writes_hf_dir(tmp_path):
  from transformers import T5ForConditionalGeneration
  from ia3_jax.interop import hf_checkpoints, ia3_adapters
  hf_utils.make_hf_model(tmp_path / "base", "t5_1_1")
  config, base = hf_checkpoints.load_hf_checkpoint(tmp_path / "base")
  bank = _random_ia3(config, ia3.DEFAULT_SITES, 2, seed=7)
  hf_checkpoints.save_params(tmp_path / "ia3", bank)
  out = ia3_adapters.merge_checkpoint(tmp_path / "base", tmp_path / "ia3", tmp_path / "merged", task=1)
  batch = hf_utils.random_batch(np.random.default_rng(2), config.vocab_size)
  expected = _logits(ia3.ia3_model(config), ia3.insert_ia3(base, ia3.select_task(bank, 1)), batch)
  torch_model = T5ForConditionalGeneration.from_pretrained(out).eval()
  valid = batch["decoder_target_tokens"] > 0
  tolerances.assert_close_to_torch(expected[valid],
                                    hf_utils.torch_logits(torch_model, batch)[valid])
