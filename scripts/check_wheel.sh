#!/usr/bin/env bash
# What a user gets is the wheel: build it, check that it holds every module of the source tree, install it into
# a fresh virtual environment with the pinned torch, and run the console scripts and an import of every
# subpackage from there (an editable install would hide a missing package).
set -euo pipefail
cd "$(dirname "$0")/.."

work=build/wheel-check
rm -rf "$work"
mkdir -p "$work"
python -m pip wheel --quiet --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/fne_fast-*.whl)
python scripts/wheel_modules.py "$wheel"

python -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install --quiet --upgrade pip
torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
"$venv_python" -m pip install --quiet "torch==$torch_version" "$wheel"
# Outside the source tree, so that only the installed copy can be imported.
(cd "$work" && venv/bin/fne-fast --help >/dev/null && echo "fne-fast --help: ok")
(cd "$work" && venv/bin/python -m fne_fast.cli --help >/dev/null && echo "python -m fne_fast.cli --help: ok")
(cd "$work" && venv/bin/fne-fast-demo --bank-size 2000 --dim 64 --repeats 1 >/dev/null && echo "fne-fast-demo: ok")
(cd "$work" && "$OLDPWD/$venv_python" - "$OLDPWD/$wheel" <<'PY'
import importlib
import sys
import zipfile

import fne_fast

names = sorted({name[:-len(".py")].replace("/", ".").removesuffix(".__init__")
                for name in zipfile.ZipFile(sys.argv[1]).namelist() if name.endswith(".py")})
# Not imported: the Triton kernels (Triton is not installed here) and `python -m` entry points (importing one runs
# the program; the console scripts above ran it).
skipped = [name for name in names if name.startswith("fne_fast.kernels.") or name.endswith(".__main__")]
for name in names:
    if name not in skipped:
        importlib.import_module(name)
assert fne_fast.__file__.startswith(sys.prefix), f"imported {fne_fast.__file__}, not the installed wheel"
print(f"imported {len(names) - len(skipped)} modules from the installed wheel")
PY
)
