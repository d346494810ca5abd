#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with hf_posvariants and its test tools.
#
# torch is installed first, pinned to 2.13.0: on a machine that carries a local CPU wheel of that
# version pip takes it (no multi-GB CUDA download); elsewhere pip fetches the normal 2.13.0 build for
# the platform (with CUDA on a Linux GPU machine). Set TORCH_SPEC to choose another torch, e.g.
# TORCH_SPEC="torch==2.9.1" bash scripts/setup.sh. The package's own `torch>=2.4` is then satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev,plots]"
.venv/bin/python -c "import torch, transformers, hf_posvariants; print('torch', torch.__version__, '| transformers', transformers.__version__, '| hf_posvariants', hf_posvariants.__version__)"
