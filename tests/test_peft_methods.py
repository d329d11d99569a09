"""PEFT baselines: identity at init, what trains, loss goes down, mixed tasks, counts."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ia3_jax import errors
from ia3_jax.model import network
from ia3_jax.model import params as params_lib
from ia3_jax.model.config import get_config
from ia3_jax.peft import counts, registry
from tests import tolerances

# Small hyper-parameters for the tiny preset (defaults elsewhere are for T0); every
# registered method is tested, with its defaults where it is not named here.
SMALL_KW = {"lora": dict(rank=2, alpha=3.0), "prompt_tuning": dict(length=3),
            "prefix_tuning": dict(length=2)}
METHODS = registry.method_names()
# Methods whose model starts as the base model (prompt/prefix tuning: explicit references in
# test_peft_prompt_prefix.py).
IDENTITY_AT_INIT = ("ia3", "lora", "bitfit", "layernorm", "full")


@pytest.fixture(scope="module")
def tiny():
  config = get_config("tiny")
  base = network.init_params(network.Transformer(config), jax.random.key(0))
  rng = np.random.default_rng(0)
  enc = rng.integers(2, config.vocab_size, (4, 9)).astype(np.int32)
  enc[1:, 6:] = 0  # padding
  targets = rng.integers(2, config.vocab_size, (4, 5)).astype(np.int32)
  targets[2, 3:] = 0
  batch = dict(enc=jnp.asarray(enc), dec_in=network.shift_right(jnp.asarray(targets)),
               targets=jnp.asarray(targets))
  base_model = network.Transformer(config)
  batch["base_logits"] = jax.jit(lambda p: base_model.apply(
      {"params": p}, batch["enc"], batch["dec_in"], batch["targets"]))(base)
  return config, base, batch


def _method_params(name, config, base, **kw):
  """(model, params): the method's fresh params on top of `base`."""
  num_tasks = kw.pop("num_tasks", 1)
  method = registry.make(name, **{**SMALL_KW.get(name, {}), **kw})
  model = network.Transformer(config, blocks=method.blocks(config, network.Blocks(), num_tasks))
  with_task_id = num_tasks > 1
  # Eager init: far cheaper on CPU than compiling an init (its ops are cached across tests).
  init = network.init_params(model, jax.random.key(1), with_task_id=with_task_id)
  new = {p: v for p, v in params_lib.flatten(init).items() if p not in params_lib.flatten(base)}
  return model, params_lib.combine(base, params_lib.unflatten(new))


def _loss(model, params, batch):
  """(token cross-entropy on the targets, logits)."""
  logits = model.apply({"params": params}, batch["enc"], batch["dec_in"], batch["targets"])
  mask = batch["targets"] > 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(ce * mask) / jnp.sum(mask), logits


def test_registry_names_and_uniform_signature(tiny):
  config, _, _ = tiny
  assert {"ia3", "lora", "bitfit", "layernorm", "prompt_tuning", "prefix_tuning",
          "full"} <= set(METHODS)
  for name, cls in registry.methods().items():
    method = cls()  # the defaults are valid
    assert method.name == name and registry.make(name) == method
    assert isinstance(method.blocks(config, network.Blocks()), network.Blocks), name
    assert registry.defaults(name) == method.hyperparameters()
  for name in ("ia3", "prompt_tuning", "prefix_tuning", "lora", "full"):
    assert registry.get_method(name).supports_mixed_tasks == (name in (
        "ia3", "prompt_tuning", "prefix_tuning"))
  with pytest.raises(errors.ConfigError, match="PEFT_METHOD='lorra': unknown PEFT method; "
                     "known: .*lora"):
    registry.get_method("lorra")
  with pytest.raises(errors.ConfigError, match="PEFT_OPTIONS: lora has no hyper-parameter "
                     "'rnak'"):
    registry.make("lora", rnak=2)


def test_readme_method_table_lists_every_registered_method():
  import pathlib
  import re
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  table = readme[readme.index("| method (`PEFT_METHOD`) |"):]
  table = table[:table.index("\n\n")]
  listed = set(re.findall(r"^\| [^|`]*`([a-z_0-9]+)` \|", table, re.M))
  assert listed == set(METHODS)


def test_registry_reads_each_method_module():
  from ia3_jax.peft import ia3, lora
  assert registry.get_method("ia3").trainable_patterns == ia3.TRAINABLE_PATTERNS
  assert registry.trainable_patterns("lora") == list(lora.TRAINABLE_PATTERNS)


def test_a_method_registered_outside_the_package_is_used_everywhere(tmp_path):
  """A new method is its module alone: registering it makes it a choice of the registry,
  `peft-counts` and gin's peft/method.gin, and it trains through `loop.train`."""
  import dataclasses

  from ia3_jax import errors as errors_lib
  from ia3_jax.train import assembly, loop
  from tests import trainer_utils as tu

  @registry.register
  @dataclasses.dataclass(frozen=True)
  class FinalNorms(registry.PeftMethod):  # train only the two final layer norms
    name = "final_norms_test"
    trainable_patterns = (r"(encoder/encoder_norm|decoder/decoder_norm)/scale",)
    scale: float = 1.0

    def validate(self):
      if self.scale <= 0:
        raise self.invalid("scale", "must be positive")
  try:
    assert "final_norms_test" in registry.method_names()
    with pytest.raises(errors_lib.ConfigError, match=r"test_peft_methods.FinalNorms.scale=0: "
                       "must be positive"):
      registry.make("final_norms_test", scale=0)
    [count] = counts.count_all(get_config("tiny"), ["final_norms_test"])
    assert count.trainable == 2 * 32 and count.hparams == "scale=1.0"
    spec = assembly.ModelSpec(get_config("tiny"), peft=registry.make("final_norms_test"))
    res = loop.train(model_dir=str(tmp_path), model=spec, train_data=tu.SyntheticBatches(4),
                     train_config=loop.TrainConfig(train_steps=1, batch_size=4,
                                                   tensorboard=False, progress=False),
                     initial_params=tu.random_base_params(get_config("tiny")))
    assert set(params_lib.flatten(res["state"].trainable)) == {
        "encoder/encoder_norm/scale", "decoder/decoder_norm/scale"}
    peft, _ = _parse_peft_gin("method", ["PEFT_METHOD = 'final_norms_test'",
                                         "registry.make.scale = 2.0"])
    assert peft == FinalNorms(scale=2.0)
  finally:
    registry._METHODS.pop("final_norms_test", None)  # pylint: disable=protected-access


def _check_trainable(name, trainable, flat_params, base_paths):
  """Full fine-tuning trains everything, LayerNorm tuning the norms; every other method
  trains every param it adds and of the base at most the layer norms (T-Few's adapters)."""
  norms = {p for p in base_paths if p.endswith("norm/scale")}
  if name == "full":
    assert trainable == set(flat_params)
  elif name == "layernorm":
    assert trainable == norms
  else:
    added = set(flat_params) - base_paths
    assert added and added <= trainable and trainable - added <= norms, name


@pytest.mark.parametrize("name", METHODS)
def test_starts_as_base_trains_only_its_params_and_lowers_loss(tiny, name):
  config, base, batch = tiny
  method = registry.get_method(name)
  model, params = _method_params(name, config, base)
  trainable, frozen = params_lib.select(params, method.trainable_patterns)
  _check_trainable(name, set(params_lib.flatten(trainable)), params_lib.flatten(params),
                   set(params_lib.flatten(base)))
  opt = optax.adam(3e-2 if name != "full" else 3e-3)

  @jax.jit
  def step(t, s):  # returns the loss and logits before the update
    (loss, logits), grads = jax.value_and_grad(
        lambda t: _loss(model, params_lib.combine(t, frozen), batch), has_aux=True)(t)
    updates, s = opt.update(grads, s, t)
    return optax.apply_updates(t, updates), s, loss, logits

  t, state = trainable, opt.init(trainable)
  losses = []
  for i in range(12):
    t, state, loss, logits = step(t, state)
    losses.append(float(loss))
    if i == 0 and name in IDENTITY_AT_INIT:  # initial logits are the base model's
      tolerances.assert_close(logits, batch["base_logits"])
  assert losses[-1] < losses[0] - 0.05, (name, losses)
  before, after = params_lib.flatten(trainable), params_lib.flatten(t)
  unchanged = [p for p in before if np.array_equal(before[p], after[p])]
  assert not unchanged, f"{name}: never trained: {unchanged}"


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning", "ia3"])
def test_mixed_task_batch_equals_per_task_runs(tiny, name):
  config, base, batch = tiny
  model, params = _method_params(name, config, base, num_tasks=3)
  # Make the tasks differ (init gives identical or random rows depending on the method).
  method = registry.make(name)
  trainable, frozen = params_lib.select(params, method.trainable_patterns)
  noise = jax.tree.map(
      lambda x: x + 0.3 * jax.random.normal(jax.random.key(x.size), x.shape), trainable)
  params = params_lib.combine(noise, frozen)
  run = jax.jit(lambda ids: model.apply({"params": params}, batch["enc"], batch["dec_in"],
                                        task_id=ids))
  task_id = jnp.array([2, 0, 1, 2])
  mixed = run(task_id)
  for b, t in enumerate(np.asarray(task_id)):
    tolerances.assert_close(mixed[b], run(jnp.full((4,), t))[b])
  assert np.abs(np.asarray(mixed[0] - run(jnp.zeros(4, jnp.int32))[0])).max() > 1e-3
  method.check_task_ids(np.asarray(task_id), num_tasks=3)
  with pytest.raises(errors.DataError, match=rf"task_id 3 is out of range: the {name} bank has "
                     r"3 rows \(NUM_TASKS=3\)"):
    method.check_task_ids(np.array([0, 3]), num_tasks=3)


@pytest.mark.parametrize("name", ["lora", "bitfit", "layernorm", "full"])
def test_mixed_tasks_rejected_clearly(tiny, name):
  config, _, _ = tiny
  method = registry.make(name)
  with pytest.raises(errors.ConfigError, match=f"NUM_TASKS=2: {name} does not support "
                     "mixed-task batches"):
    method.blocks(config, network.Blocks(), num_tasks=2)
  with pytest.raises(errors.DataError, match=f"task_id 1: {name} has one set of params "
                     r"\(no mixed-task batches\)"):
    method.check_task_ids(np.array([0, 1, 0]))
  method.check_task_ids(np.zeros(3, np.int32))  # a single-task batch is fine
  method.check_task_ids(None)


def _abstract_params(model, with_task_id=False):
  return jax.eval_shape(lambda k: network.init_params(model, k, with_task_id=with_task_id),
                        jax.random.key(0))


def test_bank_without_task_id_is_an_error(tiny):
  config, _, batch = tiny
  model = network.Transformer(config, blocks=registry.make("prompt_tuning", length=2).blocks(
      config, network.Blocks(), num_tasks=2))
  params = _abstract_params(model, with_task_id=True)
  with pytest.raises(ValueError, match="bank of 2 tasks needs task_id"):
    jax.eval_shape(lambda p: model.apply({"params": p}, batch["enc"], batch["dec_in"]), params)


def test_bad_hyper_parameters_are_named(tiny):
  config, _, _ = tiny
  from ia3_jax.peft import bitfit, lora, prefix_tuning, prompt_tuning
  with pytest.raises(errors.ConfigError, match="lora.LoraConfig.targets: unknown target 'qq'"):
    lora.lora_blocks(targets=["qq"])
  with pytest.raises(errors.ConfigError, match="lora.LoraConfig.rank=0: must be a positive int"):
    lora.lora_blocks(rank=0)
  with pytest.raises(errors.ConfigError, match=r"prefix_tuning.PrefixTuningConfig.sites=\["
                     r"'encoder', 'both'\]: unknown \['both'\]"):
    prefix_tuning.prefix_tuning_blocks(sites=["encoder", "both"])
  with pytest.raises(errors.ConfigError, match=r"init_token_ids.*must lie in \[1, 128\)"):
    prompt_tuning.prompt_tuning_blocks(config, length=2, init_token_ids=[5, 500])
  with pytest.raises(errors.ConfigError,
                     match="lora.LoraConfig.targets: this model's MLP has no wi "):
    lora.lora_blocks(config, targets=["q", "wi"])  # T5 1.1 is gated: wi_0, wi_1
  blocks = lora.lora_blocks(targets=["wi"])  # without a config: checked at model init
  with pytest.raises(errors.ConfigError,
                     match="lora.LoraConfig.targets: this model's MLP has no wi "):
    _abstract_params(network.Transformer(config, blocks=blocks))
  # HF names and groups are accepted and normalised.
  b = bitfit.bitfit_blocks(targets=["q", "mlp"])
  assert b.attention.keywords["targets"] == ("query",)
  assert b.mlp.keywords["targets"] == ("wi", "wi_0", "wi_1", "wo")


def test_bitfit_and_layernorm_params(tiny):
  config, base, _ = tiny
  params = _abstract_params(network.Transformer(config, blocks=registry.make(
      "bitfit").blocks(config, network.Blocks())))
  biases = {p: v.shape for p, v in params_lib.flatten(params).items() if p.endswith("_bias")}
  assert biases["encoder/layers_0/attention/query_bias"] == (config.joined_kv,)
  assert biases["decoder/layers_1/mlp/wi_1_bias"] == (config.mlp_dim,)
  assert biases["decoder/layers_1/encoder_decoder_attention/out_bias"] == (config.emb_dim,)
  layers_ = config.num_encoder_layers + config.num_decoder_layers
  assert len(biases) == 4 * layers_ + 4 * config.num_decoder_layers + 3 * layers_
  norms = params_lib.flatten(params_lib.select(base, registry.get_method("layernorm").trainable_patterns)[0])
  assert len(norms) == 2 * config.num_encoder_layers + 3 * config.num_decoder_layers + 2


# --------------------------------------------------------------------------- counts


def _t0_3b_formulas():
  """Hand-computed trainable counts for T0-3B (= T5 1.1 XL) with the default settings."""
  d, d_kv, d_ff, n_enc, n_dec, vocab = 2048, 32 * 64, 5120, 24, 24, 32128
  n_attn = n_enc + 2 * n_dec                       # self + self + cross attentions
  mlp_kernels = [(d, d_ff), (d, d_ff), (d_ff, d)]  # wi_0, wi_1, wo
  attn_kernels = [(d, d_kv)] * 3 + [(d_kv, d)]     # q, k, v, o
  rank = 4
  lora = rank * (n_attn * sum(i + o for i, o in attn_kernels)
                 + (n_enc + n_dec) * sum(i + o for i, o in mlp_kernels))
  bitfit = n_attn * sum(o for _, o in attn_kernels) + (n_enc + n_dec) * sum(
      o for _, o in mlp_kernels)
  layernorm = d * (2 * n_enc + 3 * n_dec + 2)
  base = (vocab * d * 2 + 2 * 32 * 32 + layernorm
          + n_attn * 4 * d * d_kv + (n_enc + n_dec) * 3 * d * d_ff)
  return {
      "ia3": n_enc * (2 * d_kv + d_ff) + n_dec * (4 * d_kv + d_ff),
      "lora": lora, "bitfit": bitfit, "layernorm": layernorm,
      "prompt_tuning": 100 * d,
      "prefix_tuning": n_attn * 2 * 10 * d_kv,
      "full": base,
  }


def test_t0_3b_counts_match_hand_formulas():
  expected = _t0_3b_formulas()
  assert expected["ia3"] == 540_672  # the paper's figure (docs/design.md)
  assert expected["full"] == 2_849_757_184
  got = counts.count_all(get_config("t0_3b"), list(expected))  # others: their own tests
  assert {c.method: c.trainable for c in got} == expected
  assert all(c.base == expected["full"] for c in got)
  table = counts.markdown_table(got, "t0_3b")
  assert "| lora | rank=4 alpha=4.0 dropout=0.0 targets=all use_rslora=False | 8,847,360 |" in table


def test_counts_command_prints_table(capsys):
  out = subprocess.run([sys.executable, "-m", "ia3_jax.peft.counts", "--model", "tiny",
                        "--methods", "lora,prompt_tuning"], capture_output=True, text=True,
                       check=True).stdout
  rows = [l for l in out.splitlines() if l.startswith("| lora") or l.startswith("| prompt")]
  assert len(rows) == 2
  # tiny: emb 32, joined_kv 32, mlp 64, 2+2 layers; rank 4 on all projections.
  lora = 4 * (6 * 4 * (32 + 32) + 4 * 3 * (32 + 64))
  assert f"| {lora:,} |" in rows[0]
  assert f"| {100 * 32:,} |" in rows[1]
  with pytest.raises(SystemExit) as exit_info:
    counts.main(["--methods", "x"])
  assert exit_info.value.code == 2 and "unknown PEFT method" in capsys.readouterr().err


# --------------------------------------------------------------------------- gin files


def _consumer(peft=None, lr=None):
  return peft, lr


@functools.lru_cache(maxsize=None)
def _gin_consumer():
  import gin
  return gin.external_configurable(_consumer, "test_peft_consumer")


def _parse_peft_gin(name, bindings=()):
  """(PEFT, LEARNING_RATE or None) of gin/peft/<name>.gin with `bindings` after it."""
  import gin
  from ia3_jax import gin_configurables
  gin.clear_config()  # unlocks a config an entry point finalized
  consumer = _gin_consumer()
  path = f"{gin_configurables.gin_dir()}/peft/{name}.gin"
  try:
    gin.clear_config()
    gin.parse_config("LEARNING_RATE = None")  # a file may set it
    gin.parse_config_files_and_bindings([path], list(bindings) + [
        "test_peft_consumer.peft = %PEFT", "test_peft_consumer.lr = %LEARNING_RATE"])
    return consumer()
  finally:
    gin.clear_config()


# gin/peft/<file>.gin -> (method, the T-Few learning rate; None: the recipe's 3e-3)
GIN_FILES = {"ia3": ("ia3", None), "lora": ("lora", 3e-3), "bitfit": ("bitfit", 3e-4),
             "layernorm": ("layernorm", 3e-4), "prompt_tuning": ("prompt_tuning", 0.3),
             "prefix_tuning": ("prefix_tuning", 1e-2), "full_finetune": ("full", 3e-4)}


def test_every_gin_peft_file_is_known():
  from ia3_jax import gin_configurables
  import pathlib
  files = {p.stem for p in pathlib.Path(gin_configurables.gin_dir(), "peft").glob("*.gin")}
  assert files == set(GIN_FILES) | {"method"}


@pytest.mark.parametrize("name", list(GIN_FILES))
def test_gin_file_binds_the_method_with_its_defaults(name):
  """A PEFT gin file holds no hyper-parameter values: the config class is their one home."""
  method, lr = GIN_FILES[name]
  peft, got_lr = _parse_peft_gin(name)
  assert peft == registry.make(method) and got_lr == lr


def test_gin_method_file_takes_any_method_and_its_options():
  from ia3_jax.peft import lora
  peft, _ = _parse_peft_gin("method", ["PEFT_METHOD = 'lora'", "registry.make.rank = 8"])
  assert peft == lora.LoraConfig(rank=8)


def test_gin_prompt_tuning_trains_with_the_trainer(tmp_path):
  """gin/peft/prompt_tuning.gin through loop.train: only the prompt trains, and the prompt
  starts from the rows of the given (not the random-init) embedding."""
  from ia3_jax.objectives import losses
  from ia3_jax.train import assembly, checkpointer, loop, optimizers
  from tests import trainer_utils as tu
  config = get_config("tiny")
  peft, _ = _parse_peft_gin("prompt_tuning", ["prompt_tuning.PromptTuningConfig.length = 4"])
  base = tu.random_base_params(config)
  res = loop.train(
      model_dir=str(tmp_path), model=assembly.ModelSpec(config, peft=peft, dropout_rate=0.0),
      train_data=tu.SyntheticBatches(8, num_distinct=1),
      train_config=loop.TrainConfig(train_steps=3, batch_size=8, log_period=1,
                                       tensorboard=False, progress=False),
      loss=losses.LossConfig(ul_weight=0.0),
      optimizer=optimizers.OptimizerConfig(learning_rate=0.3, warmup_steps=0,
                                           multiply_by_parameter_scale=False),
      checkpoint=checkpointer.CheckpointConfig(period=0),
      initial_params=base)
  state = jax.device_get(res["state"])
  assert set(params_lib.flatten(state.trainable)) == {"encoder/prompt_delta"}
  delta = state.trainable["encoder"]["prompt_delta"]
  assert delta.shape == (1, 4, config.emb_dim) and np.abs(delta).max() > 0
  for path, value in params_lib.flatten(state.frozen).items():
    np.testing.assert_array_equal(value, params_lib.flatten(base)[path])
