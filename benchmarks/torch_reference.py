"""The PyTorch reference stack (transformers + peft IA3, CPU) used by the benchmarks.

Written from the T-Few recipe: peft's IA3 on k, v, wo (wo as a feedforward
module: its input is scaled, the same site as ia3-jax's "ff"); HF Adafactor
(scale_parameter, no relative step, fixed learning rate) with gradient
clipping 1.0; the T-Few losses from the paper's formulas; and two rank
classifiers: the T-Few repo's (encoder once per example, its output repeated
for the choices) and a naive one (a full forward pass per choice).

Batches are the numpy dicts of `harness.make_batch` (0 = padding, padding
choices have choice_mask 0).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


def build_model(config, *, ia3: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str = "cpu"):
  """Random HF T5 with the shape of an ia3-jax `T5Config`, optionally wrapped with peft IA3.

  For T5 1.1 shapes (`logits_via_embedding=False`) the LM head is untied
  from the embedding, as in real T5 1.1 / T0 checkpoints (transformers 5 ties
  them by default), so both frameworks hold the same parameters.
  """
  from transformers import T5Config, T5ForConditionalGeneration
  torch.manual_seed(seed)
  gated = len(config.mlp_activations) == 2
  act = config.mlp_activations[0]
  if gated and act != "gelu":
    raise ValueError(f"torch reference: gated MLP with {act!r} is not an HF T5 option")
  hf = T5Config(vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
                d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
                num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
                relative_attention_num_buckets=config.relative_attention_num_buckets,
                relative_attention_max_distance=config.relative_attention_max_distance,
                feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0,
                tie_word_embeddings=config.logits_via_embedding,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  with torch.device(device):
    model = T5ForConditionalGeneration(hf)
  if not config.logits_via_embedding:
    model.config.tie_word_embeddings = False
    with torch.no_grad():
      head = torch.empty_like(model.shared.weight).normal_(0.0, config.emb_dim ** -0.5)
    model.lm_head.weight = torch.nn.Parameter(head)
  model = model.to(dtype)
  if ia3:
    from peft import IA3Config, get_peft_model
    model = get_peft_model(model, IA3Config(task_type="SEQ_2_SEQ_LM",
                                            target_modules=["k", "v", "wo"],
                                            feedforward_modules=["wo"]))
  return model


def base_model(model):
  """The HF T5 inside a peft wrapper (or the model itself)."""
  return model.get_base_model() if hasattr(model, "get_base_model") else model


def jax_params(model, config) -> dict:
  """The base weights as an ia3-jax (T5X-named) numpy param tree, via `hf_checkpoints.hf_name_map`."""
  from ia3_jax.interop import hf_checkpoints
  state = {k.replace("base_layer.", ""): v for k, v in base_model(model).state_dict().items()}
  tree: dict = {}
  for path, (name, transposed) in hf_checkpoints.hf_name_map(config).items():
    value = state[name].detach().float().cpu().numpy()
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(value.T if transposed else value)
  return tree


def _shift_right(t: torch.Tensor) -> torch.Tensor:
  return torch.cat([torch.zeros_like(t[..., :1]), t[..., :-1]], dim=-1)


def choice_token_logp(model, enc: torch.Tensor, choices: torch.Tensor, *,
                      reuse_encoder: bool = True) -> torch.Tensor:
  """Per-token log-probs [B, C, T] of every choice; encoder once per example when `reuse_encoder`."""
  b, c, t = choices.shape
  mask = (enc > 0).long()
  if reuse_encoder:  # the T-Few repo's scorer
    encoder = model.get_encoder()
    hidden = encoder(input_ids=enc, attention_mask=mask).last_hidden_state
    hidden = hidden.repeat_interleave(c, dim=0)
    out = model(encoder_outputs=(hidden,), attention_mask=mask.repeat_interleave(c, dim=0),
                decoder_input_ids=_shift_right(choices.reshape(b * c, t)))
    logits = out.logits.reshape(b, c, t, -1)
  else:  # one full forward pass (encoder included) per choice
    logits = torch.stack([
        model(input_ids=enc, attention_mask=mask,
              decoder_input_ids=_shift_right(choices[:, i])).logits for i in range(c)], dim=1)
  logp = F.log_softmax(logits.float(), dim=-1)
  return logp.gather(-1, choices.unsqueeze(-1)).squeeze(-1)


def tfew_loss(logp: torch.Tensor, choices: torch.Tensor, choice_mask: torch.Tensor,
              label: torch.Tensor, lm_only: bool = False) -> torch.Tensor:
  """L_LM + L_UL + L_LN (alpha = 1) from the paper's formulas; padding choices excluded."""
  mask = ((choices > 0) & (choice_mask[..., None] > 0)).float()
  onehot = F.one_hot(label, choices.shape[1]).float()[..., None]
  lm = -(logp * mask * onehot).sum() / (mask * onehot).sum()
  if lm_only:
    return lm
  wrong = mask * (1 - onehot)
  ul = -(torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-6)) * wrong).sum() / wrong.sum().clamp(min=1)
  lengths = mask.sum(-1)
  scores = (logp * mask).sum(-1) / lengths.clamp(min=1)
  scores = scores.masked_fill(lengths == 0, float("-inf"))
  ln = F.cross_entropy(scores, label)
  return lm + ul + ln


def autocast(tensor: torch.Tensor, dtype: Optional[torch.dtype]):
  """`torch.autocast` on the tensor's device type (no-op context when `dtype` is None)."""
  if dtype is None:
    return contextlib.nullcontext()
  return torch.autocast(device_type=tensor.device.type, dtype=dtype)


def make_train_step(model, *, lm_only: bool, lr: float = 3e-3,
                    autocast_dtype: Optional[torch.dtype] = None) -> Callable:
  """One T-Few update (HF Adafactor, clip 1.0) over the trainable params; returns the loss.

  `lm_only`: decode the labelled choice only and train on L_LM (a plain
  seq2seq LM step); otherwise all choices with L_LM + L_UL + L_LN.
  `autocast_dtype` (e.g. torch.bfloat16): mixed precision, float32 params.
  """
  from transformers.optimization import Adafactor
  params = [p for p in model.parameters() if p.requires_grad]
  opt = Adafactor(params, lr=lr, scale_parameter=True, relative_step=False, warmup_init=False,
                  weight_decay=0.0)

  def step(enc, choices, choice_mask, label):
    opt.zero_grad(set_to_none=True)
    with autocast(enc, autocast_dtype):
      if lm_only:
        tgt = choices[torch.arange(len(label), device=label.device), label][:, None]
        ones = torch.ones_like(choice_mask[:, :1])
        loss = tfew_loss(choice_token_logp(model, enc, tgt), tgt, ones, torch.zeros_like(label),
                         True)
      else:
        loss = tfew_loss(choice_token_logp(model, enc, choices), choices, choice_mask, label)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()

  return step


def rank_classify(model, enc, choices, choice_mask, *, reuse_encoder: bool,
                  autocast_dtype: Optional[torch.dtype] = None) -> np.ndarray:
  """Length-normalised rank classification: predictions [B] (ties to the first choice)."""
  with torch.inference_mode(), autocast(enc, autocast_dtype):
    logp = choice_token_logp(model, enc, choices, reuse_encoder=reuse_encoder)
    mask = ((choices > 0) & (choice_mask[..., None] > 0)).float()
    lengths = mask.sum(-1)
    scores = (logp * mask).sum(-1) / lengths.clamp(min=1)
    scores = scores.masked_fill(lengths == 0, float("-inf"))
    return scores.argmax(-1).cpu().numpy()


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7,
                device: str = "cpu") -> float:
  """Best FLOP/s of an n^3 torch matmul (current thread settings on CPU)."""
  a = torch.randn(n, n, device=device).to(dtype)
  b = torch.randn(n, n, device=device).to(dtype)
  sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
  a @ b
  sync()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    sync()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def timeit(fn: Callable, *, warmup: int = 1, iters: int = 3) -> float:
  """Median seconds per call after warm-up."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def to_torch(batch: dict[str, np.ndarray], device: str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
  """(encoder_input_tokens, choice_tokens, choice_mask, label) as long tensors."""
  return tuple(torch.as_tensor(np.asarray(batch[k]), dtype=torch.long, device=device)
               for k in ("encoder_input_tokens", "choice_tokens", "choice_mask", "label"))
