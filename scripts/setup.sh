#!/usr/bin/env bash
# Sets up a fresh machine: the pinned torch (the local CPU wheel here; never an unpinned torch, which pulls a
# multi-GB CUDA build), then fne_fast built against it, with the test tools, and the data the training job uses.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==${FNE_FAST_TORCH_VERSION:-2.13.0}"
fi
# --no-build-isolation: compile against the torch installed above, not a fresh one in an isolated environment.
python -m pip install --quiet "setuptools>=77" wheel ninja
python -m pip install --quiet --no-build-isolation -e ".[test]"
if [ -f scripts/setup_data.sh ]; then
  bash scripts/setup_data.sh
fi
python -c "import fne_fast, torch; print(f'fne_fast {fne_fast.__version__} ready (torch {torch.__version__})')"
