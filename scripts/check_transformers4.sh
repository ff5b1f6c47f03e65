#!/usr/bin/env bash
# Check that the default MoE output (experts quantized per expert) loads in stock transformers 4.57 exactly
# like bitsandbytes quantizing on load. Builds its own environment (.venv-tf4) with transformers<5; the
# conversion runs in the test environment (.venv, from scripts/test.sh). Not part of CI.
# Usage: bash scripts/check_transformers4.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d)}
V4=${V4:-.venv-tf4}
python3 -m venv "$V4"
"$V4/bin/python" -m pip install -q --upgrade pip
"$V4/bin/python" -m pip install -q torch==2.13.0
"$V4/bin/python" -m pip install -q "transformers==4.57.*" bitsandbytes==0.50.2 "accelerate>=1.0"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
"$V4/bin/python" scripts/check_transformers4.py make "$WORK"
.venv/bin/python scripts/check_transformers4.py convert "$WORK"
"$V4/bin/python" scripts/check_transformers4.py check "$WORK"
