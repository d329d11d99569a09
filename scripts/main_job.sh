#!/usr/bin/env bash
# The README's main job: the demo on the bundled default (gin/demo.gin).
# ia3-jax's own tiny T5 (ia3_jax/assets/demo, trained from scratch by
# scripts/train_demo_model.py on the training families of a synthetic multitask
# suite) is evaluated zero-shot on held-out tasks, then fine-tuned with the T-Few
# recipe ((IA)^3, L_LM + L_UL + L_LN, rank classification) on 32-shot splits for
# 3 seeds, and evaluated again. Prints the table; writes runs/demo/ (results.json,
# results.png, tensorboard/, adapters/). A few minutes on 2 CPU cores.
# Extra flags go to gin, e.g. --gin.DEMO_SEEDS="(0, 1, 2, 3, 4)".
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ia3-jax demo --gin.MODEL_DIR="'runs/demo'" "$@"
