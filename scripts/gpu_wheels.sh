#!/usr/bin/env bash
# Download what scripts/gpu_check.sh needs on a GPU machine that has Python, a CUDA build of torch and
# transformers, but no network and no bitsandbytes: manylinux x86-64 wheels of bitsandbytes and of this
# checkout's transformers and diffusers (the GPU check runs the versions the CPU suite ran), into an ignored folder.
# Run it where PyPI is reachable.     Usage: bash scripts/gpu_wheels.sh [PYTHON_VERSION (3.12)] [DEST (.whl)]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
DEST=${2:-.whl}
PYTHON=${PYTHON:-.venv/bin/python}
TRANSFORMERS=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('transformers'))")
BITSANDBYTES=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('bitsandbytes'))")
DIFFUSERS=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('diffusers'))")
mkdir -p "$DEST"  # .whl/ is in .gitignore: the device tool carries it when asked (carry: [".whl"])
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
# --no-deps: torch, numpy, packaging, huggingface_hub, tokenizers and safetensors are already there
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
  -d "$DEST" "bitsandbytes==$BITSANDBYTES" "transformers==$TRANSFORMERS" "diffusers==$DIFFUSERS" importlib_metadata  # diffusers needs it; the image lacks it
ls -l "$DEST"
du -sh "$DEST"
