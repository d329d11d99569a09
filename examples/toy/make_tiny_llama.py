"""Writes a randomly initialised tiny Llama as an HF model directory, sized for the toy task's
vocabulary: the base that README's decoder-only commands fine-tune.

    python examples/toy/make_tiny_llama.py models/tiny-llama

(2 layers, hidden size 32, grouped-query attention 4 x 2 heads of 8; made by ia3-jax itself,
so it needs no PyTorch and no download.)
"""

import sys

import jax

from ia3_jax.interop import hf_decoder
from ia3_jax.model import families
from ia3_jax.model.decoder_config import DecoderConfig

CONFIG = DecoderConfig(vocab_size=97, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                       mlp_dim=48, num_layers=2, rms_norm_eps=1e-5, max_position_embeddings=128)


def main(out: str) -> None:
  family = families.of(CONFIG)
  params = family.init_params(family.build(CONFIG), jax.random.PRNGKey(0))
  print(f"wrote {hf_decoder.export_hf_decoder(params, CONFIG, out)}")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python examples/toy/make_tiny_llama.py OUT_DIR")
  main(sys.argv[1])
