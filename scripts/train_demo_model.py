"""Regenerates a bundled demo model (ia3_jax/assets/demo/ or demo_llama/) from scratch.

    python scripts/train_demo_model.py                 # the tiny T5: ia3_jax/assets/demo/
    python scripts/train_demo_model.py --model llama   # the tiny Llama: ia3_jax/assets/demo_llama/
    python scripts/train_demo_model.py --out /tmp/demo_model --steps 200   # a quick try

What it does, all with ia3-jax's own code:
  1. T5: trains a SentencePiece vocabulary (T5 ids: pad 0, eos 1, unk 2) on the
     rendered text of the synthetic suite (`ia3_jax.data.synthetic`); Llama:
     takes the bundled T5's (`--vocabulary`), so both models read the same
     seqio tasks;
  2. registers the suite as seqio tasks (`ia3_jax.tasks.demo`);
  3. trains a tiny T5 1.1-style encoder-decoder (or a tiny Llama-architecture
     decoder-only model: the prompt, then the answer scored as its
     continuation) from a random init with `loop.train` (every param
     trainable, L_LM only) on the multitask mixture of the TRAINING families,
     one random template per example: T0-style multitask prompted training;
     the held-out families are never seen;
  4. exports it as an HF directory (config.json + model.safetensors) next to
     the SentencePiece model and tokenizer_config.json, and writes
     `training.json` (settings, wall time, accuracy of every family).

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

# The tokenizer files per model: (SentencePiece file name, tokenizer_config.json).
TOKENIZER_FILES = {
    "t5": ("spiece.model", {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>",
                            "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 512}),
    "llama": ("tokenizer.model", {"tokenizer_class": "LlamaTokenizer", "eos_token": "</s>",
                                  "unk_token": "<unk>", "pad_token": "<pad>", "bos_token": None,
                                  "add_bos_token": False, "add_eos_token": False,
                                  "model_max_length": 256}),
}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="t5", choices=sorted(demo.BUNDLED_MODELS),
                 help="family of the model: t5 (encoder-decoder) or llama (decoder-only)")
  p.add_argument("--out", default=None, help="output HF directory (default: the bundled one)")
  p.add_argument("--vocabulary", default=None,
                 help="SentencePiece model to reuse instead of training one (default for "
                      "llama: the bundled T5's)")
  p.add_argument("--work_dir", default="/tmp/ia3_jax_demo_model_train",
                 help="training checkpoints and TensorBoard logs (deleted first)")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps (default: demo.PRETRAIN[model])")
  p.add_argument("--batch_size", type=int, default=demo.PRETRAIN["batch_size"])
  p.add_argument("--learning_rate", type=float, default=demo.PRETRAIN["learning_rate"])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--vocab_size", type=int, default=demo.PRETRAIN["vocab_size"])
  p.add_argument("--corpus_size", type=int, default=2000,
                 help="examples per family rendered for the vocabulary's training text")
  p.add_argument("--eval_size", type=int, default=200,
                 help="examples per family for the accuracy check at the end")
  p.add_argument("--eval_families", default=",".join(synthetic.FAMILIES),
                 help="comma-separated families of the accuracy check (default: all)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  t0 = time.time()
  args.steps = args.steps or demo.PRETRAIN["train_steps"][args.model]
  if args.model == "llama" and args.vocabulary is None:
    args.vocabulary = str(pathlib.Path(demo.BUNDLED_MODELS["t5"]) / "spiece.model")
  out = pathlib.Path(args.out or demo.BUNDLED_MODELS[args.model])
  out.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(args.work_dir)
  if work.exists():
    shutil.rmtree(work)

  import jax  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from ia3_jax.data import batches
  from ia3_jax.interop import hf_families
  from ia3_jax.train import assembly, loop, optimizers
  from ia3_jax.objectives import losses  # pylint: disable=g-import-not-at-top
  from ia3_jax.tasks import demo as demo_tasks  # pylint: disable=g-import-not-at-top

  spm_name, tokenizer_config = TOKENIZER_FILES[args.model]
  if args.vocabulary:
    print(f"[1/4] SentencePiece vocabulary: {args.vocabulary}", flush=True)
    shutil.copyfile(args.vocabulary, out / spm_name)
  else:
    print(f"[1/4] SentencePiece vocabulary ({args.vocab_size} pieces)", flush=True)
    lines = synthetic.corpus(demo_tasks.TEMPLATE_DIR, num_per_family=args.corpus_size,
                             seed=args.seed)
    trained = synthetic.train_sentencepiece(lines, str(out / "spiece"), args.vocab_size)
    if pathlib.Path(trained) != out / spm_name:
      pathlib.Path(trained).rename(out / spm_name)
  vocabulary = seqio.SentencePieceVocabulary(str(out / spm_name))
  (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

  print("[2/4] seqio tasks of the synthetic suite", flush=True)
  demo_tasks.register(vocabulary)

  config = demo.demo_model_config(vocabulary.vocab_size, args.model)
  print(f"[3/4] multitask training: {args.steps} steps x batch {args.batch_size} on "
        f"{', '.join(synthetic.TRAINING_FAMILIES)}", flush=True)
  results = loop.train(
      model_dir=str(work), model=assembly.ModelSpec(config),  # every param trains
      train_data=batches.SeqioBatches(
          demo_tasks.PRETRAIN_MIXTURE, dict(demo.PRETRAIN["feature_lengths"], num_choices=1),
          seed=args.seed),
      train_config=loop.TrainConfig(
          train_steps=args.steps, batch_size=args.batch_size, seed=args.seed, log_period=50,
          enable_dropout=False, eval_at_end=False, progress=True),
      loss=losses.LossConfig(lm_weight=1.0, ul_weight=0.0, ln_weight=0.0),
      optimizer=optimizers.OptimizerConfig(
          name="adam", learning_rate=args.learning_rate, warmup_ratio=0.03,
          schedule="linear", grad_clip_norm=1.0),
      results_file="results.json")
  params = jax.device_get(results["state"].params)
  hf_families.of(config).export(params, config, out)
  train_time = time.time() - t0

  print("[4/4] accuracy of every family (rank classification, median over templates)",
        flush=True)
  accuracy = demo.family_accuracies(out, families=tuple(args.eval_families.split(",")),
                                    eval_size=args.eval_size)
  record = {
      "settings": {**{k: v for k, v in vars(args).items()
                      if k not in ("out", "work_dir", "vocabulary", "eval_families")},
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
