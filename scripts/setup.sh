#!/usr/bin/env bash
# Sets up .venv for llmcore on a fresh machine: torch first (the CPU build, torch==2.13.0, on
# machines without an NVIDIA GPU, so pip never pulls a multi-GB CUDA build), then llmcore in
# editable mode with its test/training extras, building llmcore._native from csrc/.
# Idempotent: re-running reuses the venv and rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }
pip_q --upgrade pip "setuptools>=64" wheel ninja
if ! python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip_q "torch>=2.4"
    else
        pip_q torch==2.13.0
    fi
fi
# --no-build-isolation: build the extension against the torch installed above.
pip_q --no-build-isolation -e ".[test]"
