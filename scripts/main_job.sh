#!/usr/bin/env bash
# The README's main job on the bundled default. Until the self-trained demo model lands
# (issue 7), this runs the T-Few recipe -- (IA)^3 on the tiny preset, L_LM + L_UL + L_LN,
# Adafactor with warm-up and linear decay, rank-classification eval -- on the bundled toy
# sentiment task (examples/toy: JSONL splits, promptsource-style templates, its own
# SentencePiece vocabulary), from a random initialisation. Output: runs/toy/ (checkpoints,
# TensorBoard logs, results.json). About 40 s on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf runs/toy
PYTHONPATH=examples/toy${PYTHONPATH:+:$PYTHONPATH} .venv/bin/ia3-jax train \
  --gin_file=models/tiny.gin --gin_file=recipes/t_few.gin --gin_file=peft/ia3.gin \
  --gin.MIXTURE_OR_TASK_MODULES="['toy_tasks']" \
  --gin.MIXTURE_OR_TASK_NAME="'toy_fewshot_seed0'" \
  --gin.EVAL_MIXTURE_OR_TASK_NAME="'toy_eval'" \
  --gin.MODEL_DIR="'runs/toy'" --gin.INITIAL_CHECKPOINT_PATH=None \
  --gin.TRAIN_STEPS=100 --gin.EVAL_PERIOD=50 \
  --gin.TASK_FEATURE_LENGTHS="{'inputs': 32, 'targets': 4, 'num_choices': 2}" "$@"
