"""Prompt and prefix tuning against explicit references (HF PyTorch, NumPy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ia3_jax.interop import hf_checkpoints
from ia3_jax.model import network
from ia3_jax.model import params as params_lib
from ia3_jax.peft import prefix_tuning, prompt_tuning, registry
from tests import hf_utils
from tests import tolerances


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """A tiny random HF T5 1.1, our params for it, and a padded batch (enc_len 25 > max_distance)."""
  directory = tmp_path_factory.mktemp("hf_t5")
  torch_model = hf_utils.make_hf_model(directory, "t5_1_1", "small")
  config, params = hf_checkpoints.load_hf_checkpoint(directory)
  batch = hf_utils.random_batch(np.random.default_rng(0), config.vocab_size, batch=3,
                                enc_len=25, dec_len=6)
  return torch_model, config, params, batch


def _with_new_params(model, base, rng=1, with_task_id=False):
  # Eager init: far cheaper on CPU than compiling an init (its ops are cached across tests).
  init = network.init_params(model, jax.random.key(rng), with_task_id=with_task_id)
  new = {p: v for p, v in params_lib.flatten(init).items() if p not in params_lib.flatten(base)}
  return params_lib.combine(base, params_lib.unflatten(new))


# --------------------------------------------------------------------------- prompt tuning


def _hf_logits_with_prompt(torch_model, prompt, batch):
  """HF T5 fed `inputs_embeds = [prompt; embed(tokens)]`, mask extended with ones."""
  enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
  with torch.no_grad():
    emb = torch_model.get_input_embeddings()(enc)
    p = torch.tensor(np.asarray(prompt), dtype=emb.dtype)
    embeds = torch.cat([p, emb], dim=1)
    mask = torch.cat([torch.ones(p.shape[:2], dtype=torch.long), (enc > 0).long()], dim=1)
    out = torch_model(inputs_embeds=embeds, attention_mask=mask,
                      decoder_input_ids=torch.tensor(batch["decoder_input_tokens"],
                                                     dtype=torch.long))
  return out.logits.numpy()


def test_prompt_tuning_first_output_equals_prepended_tokens(hf):
  torch_model, config, base, batch = hf
  ids = [5, 17, 9, 44]
  kw = dict(length=4, init_token_ids=ids)
  method = registry.make("prompt_tuning", **kw)
  model = network.Transformer(config, blocks=method.blocks(config, network.Blocks()))
  params = _with_new_params(model, base)  # new params made with another (random) embedding
  prompt = prompt_tuning.prompt_vectors(params, config, **kw)
  np.testing.assert_array_equal(prompt[0], base["token_embedder"]["embedding"][ids])
  ours = jax.jit(model.apply)({"params": params}, batch["encoder_input_tokens"],
                     batch["decoder_input_tokens"])
  # Reference 1: the base network on the tokens [ids; input].
  enc = batch["encoder_input_tokens"]
  prepended = np.concatenate([np.tile(ids, (enc.shape[0], 1)), enc], axis=1)
  base_out = jax.jit(network.Transformer(config).apply)({"params": base}, prepended,
                                               batch["decoder_input_tokens"])
  tolerances.assert_close(ours, base_out)
  # Reference 2: HF PyTorch with the prompt as input embeddings.
  prompt = np.broadcast_to(prompt, (enc.shape[0], 4, config.emb_dim))
  tolerances.assert_close_to_torch(ours, _hf_logits_with_prompt(torch_model, prompt, batch))


def test_prompt_tuning_arbitrary_prompts_match_hf(hf):
  """After training the prompt is no longer vocabulary rows: check a random one per task."""
  torch_model, config, base, batch = hf
  kw = dict(length=3, num_tasks=2, init_seed=7)
  model = network.Transformer(config, blocks=prompt_tuning.prompt_tuning_blocks(config, **kw))
  params = _with_new_params(model, base, with_task_id=True)
  delta = jax.random.normal(jax.random.key(3), (2, 3, config.emb_dim))
  params = params_lib.combine(params_lib.select(params, ".*prompt_delta")[1], {"encoder": {"prompt_delta": delta}})
  bank = prompt_tuning.prompt_vectors(params, config, **kw)
  ids = prompt_tuning.prompt_init_ids(config.vocab_size, 3, 2, init_seed=7)
  tolerances.assert_close(bank, base["token_embedder"]["embedding"][ids] + delta, rtol=1e-6,
                          scale_tol=1e-7)
  task_id = np.array([1, 0, 1])
  ours = jax.jit(model.apply)({"params": params}, batch["encoder_input_tokens"],
                     batch["decoder_input_tokens"], task_id=jnp.asarray(task_id))
  ref = _hf_logits_with_prompt(torch_model, np.asarray(bank)[task_id], batch)
  tolerances.assert_close_to_torch(ours, ref)


def test_prompt_init_samples_vocabulary_rows():
  ids = prompt_tuning.prompt_init_ids(32128, 100, 2, init_seed=0)
  assert ids.shape == (2, 100) and ids.min() >= 3 and ids.max() < 5003
  assert not np.array_equal(ids[0], ids[1])
  np.testing.assert_array_equal(ids, prompt_tuning.prompt_init_ids(32128, 100, 2, init_seed=0))


# --------------------------------------------------------------------------- prefix tuning


def _np_bucket(rel, bidirectional, num_buckets, max_distance):
  """HF T5's relative-position bucket of `memory - query`, in NumPy."""
  out = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    out += (rel > 0) * num_buckets
    n = np.abs(rel)
  else:
    n = -np.minimum(rel, 0)
  exact = num_buckets // 2
  far = exact + (np.log(np.maximum(n, 1) / exact) / np.log(max_distance / exact)
                 * (num_buckets - exact)).astype(rel.dtype)
  return out + np.where(n < exact, n, np.minimum(far, num_buckets - 1))


def _np_t5(params, config, enc, dec_in, prefixes=None):
  """T5 1.1 forward in NumPy (HF semantics: only keys are masked).

  `prefixes[(stack, layer, attention)] = (k [P, H, D], v [P, H, D])` adds prefix
  keys/values with a zero position bias.
  """
  f64 = lambda x: np.asarray(x, np.float64)
  h, d = config.num_heads, config.head_dim
  emb = f64(params["token_embedder"]["embedding"])
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  rms = lambda x, s: x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * f64(s)

  def relpos(stack, q_len, k_len, bidirectional):
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    b = _np_bucket(rel, bidirectional, config.relative_attention_num_buckets,
                   config.relative_attention_max_distance)
    return f64(params[stack]["relpos_bias"]["rel_embedding"])[:, b][None]  # [1, H, q, k]

  def attention(p, xq, xkv, bias, prefix):
    split = lambda t: t.reshape(t.shape[:2] + (h, d))
    q, k, v = (split(x @ f64(p[n]["kernel"])) for x, n in
               ((xq, "query"), (xkv, "key"), (xkv, "value")))
    bias = np.broadcast_to(bias, (xq.shape[0], h, xq.shape[1], xkv.shape[1]))
    if prefix is not None:
      pk, pv = (np.broadcast_to(f64(t), (xq.shape[0],) + t.shape) for t in prefix)
      k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
      bias = np.concatenate([np.zeros(bias.shape[:3] + (pk.shape[1],)), bias], -1)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(xq.shape[:2] + (h * d,))
    return o @ f64(p["out"]["kernel"])

  def mlp(p, x):
    return (gelu(x @ f64(p["wi_0"]["kernel"])) * (x @ f64(p["wi_1"]["kernel"]))) @ f64(
        p["wo"]["kernel"])

  prefixes = prefixes or {}
  neg = np.where(enc > 0, 0.0, -1e9)[:, None, None, :]
  x = emb[enc]
  bias = relpos("encoder", enc.shape[1], enc.shape[1], True) + neg
  for i in range(config.num_encoder_layers):
    p = params["encoder"][f"layers_{i}"]
    y = rms(x, p["pre_attention_layer_norm"]["scale"])
    x = x + attention(p["attention"], y, y, bias, prefixes.get(("encoder", i, "attention")))
    x = x + mlp(p["mlp"], rms(x, p["pre_mlp_layer_norm"]["scale"]))
  encoded = rms(x, params["encoder"]["encoder_norm"]["scale"])
  t = dec_in.shape[1]
  causal = np.where(np.tril(np.ones((t, t))) > 0, 0.0, -1e9)[None, None]
  self_bias = relpos("decoder", t, t, False) + causal
  x = emb[dec_in]
  for i in range(config.num_decoder_layers):
    p = params["decoder"][f"layers_{i}"]
    y = rms(x, p["pre_self_attention_layer_norm"]["scale"])
    x = x + attention(p["self_attention"], y, y, self_bias,
                      prefixes.get(("decoder", i, "self_attention")))
    y = rms(x, p["pre_cross_attention_layer_norm"]["scale"])
    x = x + attention(p["encoder_decoder_attention"], y, encoded, neg,
                      prefixes.get(("decoder", i, "encoder_decoder_attention")))
    x = x + mlp(p["mlp"], rms(x, p["pre_mlp_layer_norm"]["scale"]))
  x = rms(x, params["decoder"]["decoder_norm"]["scale"])
  return x @ f64(params["decoder"]["logits_dense"]["kernel"])


def _prefixes(params, config, task=0, sites=tuple(prefix_tuning.SITES.values())):
  out = {}
  for stack, n in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
    for i in range(n):
      for name in sites:
        block = params[stack][f"layers_{i}"].get(name, {})
        if prefix_tuning.KEY in block:
          out[(stack, i, name)] = (np.asarray(block[prefix_tuning.KEY][task]),
                                   np.asarray(block[prefix_tuning.VALUE][task]))
  return out


def test_numpy_reference_matches_hf(hf):
  torch_model, config, base, batch = hf
  ref = _np_t5(base, config, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  tolerances.assert_close_to_torch(ref, hf_utils.torch_logits(torch_model, batch))


@pytest.mark.parametrize("sites", [("encoder", "decoder", "cross"), ("cross",)])
def test_prefix_tuning_first_output_matches_reference(hf, sites):
  _, config, base, batch = hf
  method = registry.make("prefix_tuning", length=3, sites=sites)
  model = network.Transformer(config, blocks=method.blocks(config, network.Blocks()))
  params = _with_new_params(model, base)
  prefixes = _prefixes(params, config)
  assert len(prefixes) == sum(
      {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers,
       "cross": config.num_decoder_layers}[s] for s in sites)
  ours = jax.jit(model.apply)({"params": params}, batch["encoder_input_tokens"],
                     batch["decoder_input_tokens"])
  ref = _np_t5(params, config, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
               prefixes)
  tolerances.assert_close_to_torch(ours, ref)
  base_ref = _np_t5(base, config, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  assert np.abs(ref - base_ref).max() > 1e-2  # the prefixes do change the output


def test_prefix_tuning_cached_and_grouped_decoding_equal_full_forward(hf):
  _, config, base, batch = hf
  model = network.Transformer(config, blocks=prefix_tuning.prefix_tuning_blocks(length=2))
  params = _with_new_params(model, base)
  enc, dec_in = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
  full = jax.jit(model.apply)({"params": params}, enc, dec_in)
  encoded, valid = model.apply({"params": params}, enc, method=network.Transformer.encode)
  cache = network.init_decode_cache(model, params, encoded, valid, dec_in.shape[1])

  @jax.jit
  def step(cache, tokens):
    logits, mutated = model.apply({"params": params, "cache": cache}, encoded, valid, tokens,
                                  decode=True, mutable=["cache"],
                                  method=network.Transformer.decode)
    return logits, mutated["cache"]

  for t in range(dec_in.shape[1]):
    logits, cache = step(cache, dec_in[:, t:t + 1])
    tolerances.assert_close(logits[:, 0], full[:, t])

  # Grouped cross-attention (rank classification: one encoder row serves g decoder rows).
  grouped = jax.jit(lambda e, v, d: model.apply({"params": params}, e, v, d,
                                                method=network.Transformer.decode))
  g = dec_in.shape[0]
  tolerances.assert_close(grouped(encoded[:1], valid[:1], dec_in),
                          grouped(jnp.repeat(encoded[:1], g, 0), jnp.repeat(valid[:1], g, 0), dec_in))
