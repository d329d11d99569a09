#!/usr/bin/env bash
# Creates .venv (if needed) and installs ia3-jax with its test extras, pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
