"""Regenerates the bundled demo model (ia3_jax/assets/demo/) from scratch.

    python scripts/train_demo_model.py                 # writes ia3_jax/assets/demo/
    python scripts/train_demo_model.py --out /tmp/demo_model --steps 200   # a quick try

What it does, all with ia3-jax's own code:
  1. trains a SentencePiece vocabulary (T5 ids: pad 0, eos 1, unk 2) on the
     rendered text of the synthetic suite (`ia3_jax.data.synthetic`);
  2. registers the suite as seqio tasks (`ia3_jax.tasks.demo`);
  3. trains a tiny T5 1.1-style model from a random init with `loop.train`
     (every param trainable, L_LM only) on the multitask mixture of the
     TRAINING families, one random template per example: T0-style multitask
     prompted training; the held-out families are never seen;
  4. exports it with `hf_checkpoints.export_hf_checkpoint` (config.json +
     model.safetensors) next to spiece.model and tokenizer_config.json, and
     writes `training.json` (settings, wall time, accuracy of every family).

Deterministic for a given machine and seed (data, templates and init are
seeded; XLA on CPU may still differ in the last bits between machines).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

from ia3_jax import demo
from ia3_jax.data import synthetic

DEFAULT_OUT = pathlib.Path(demo.__file__).parent / "assets" / "demo"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=str(DEFAULT_OUT), help="output HF directory")
  p.add_argument("--work_dir", default="/tmp/ia3_jax_demo_model_train",
                 help="training checkpoints and TensorBoard logs (deleted first)")
  p.add_argument("--steps", type=int, default=demo.PRETRAIN["train_steps"])
  p.add_argument("--batch_size", type=int, default=demo.PRETRAIN["batch_size"])
  p.add_argument("--learning_rate", type=float, default=demo.PRETRAIN["learning_rate"])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--vocab_size", type=int, default=demo.PRETRAIN["vocab_size"])
  p.add_argument("--corpus_size", type=int, default=2000,
                 help="examples per family rendered for the vocabulary's training text")
  p.add_argument("--eval_size", type=int, default=200,
                 help="examples per family for the accuracy check at the end")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  t0 = time.time()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(args.work_dir)
  if work.exists():
    shutil.rmtree(work)

  import jax  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from ia3_jax.data import batches
  from ia3_jax.interop import hf_checkpoints
  from ia3_jax.train import loop, optimizers
  from ia3_jax.objectives import losses  # pylint: disable=g-import-not-at-top
  from ia3_jax.tasks import demo as demo_tasks  # pylint: disable=g-import-not-at-top

  print(f"[1/4] SentencePiece vocabulary ({args.vocab_size} pieces)", flush=True)
  lines = synthetic.corpus(demo_tasks.TEMPLATE_DIR, num_per_family=args.corpus_size,
                           seed=args.seed)
  spm_path = synthetic.train_sentencepiece(lines, str(out / "spiece"), args.vocab_size)
  vocabulary = seqio.SentencePieceVocabulary(spm_path)
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>",
       "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 512}, indent=2) + "\n")

  print("[2/4] seqio tasks of the synthetic suite", flush=True)
  demo_tasks.register(vocabulary)

  config = demo.demo_model_config(vocabulary.vocab_size)
  print(f"[3/4] multitask training: {args.steps} steps x batch {args.batch_size} on "
        f"{', '.join(synthetic.TRAINING_FAMILIES)}", flush=True)
  results = loop.train(
      model_dir=str(work), config=config,
      train_data=batches.SeqioBatches(
          demo_tasks.PRETRAIN_MIXTURE, dict(demo.PRETRAIN["feature_lengths"], num_choices=1),
          seed=args.seed),
      trainable=loop.ALL_PARAMS,
      train_config=loop.TrainConfig(
          train_steps=args.steps, batch_size=args.batch_size, seed=args.seed, log_period=50,
          enable_dropout=False, eval_at_end=False, progress=True),
      loss=losses.LossConfig(lm_weight=1.0, ul_weight=0.0, ln_weight=0.0),
      optimizer=optimizers.OptimizerConfig(
          name="adam", learning_rate=args.learning_rate, warmup_ratio=0.03,
          schedule="linear", grad_clip_norm=1.0),
      results_file="results.json")
  params = jax.device_get(results["state"].params)
  hf_checkpoints.export_hf_checkpoint(params, config, out)
  train_time = time.time() - t0

  print("[4/4] accuracy of every family (rank classification, median over templates)",
        flush=True)
  accuracy = demo.family_accuracies(out, families=tuple(synthetic.FAMILIES),
                                    eval_size=args.eval_size)
  record = {
      "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
                   "feature_lengths": demo.PRETRAIN["feature_lengths"]},
      "model_config": config.to_dict(),
      "num_params": int(sum(v.size for v in jax.tree.leaves(params))),
      "train_wall_time_s": round(train_time, 1),
      "first_loss": results["first_loss"], "last_loss": results["last_loss"],
      "zero_shot_accuracy": accuracy,
  }
  (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
  size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
  print(json.dumps(accuracy, indent=2))
  print(f"wrote {out} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
