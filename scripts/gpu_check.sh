#!/usr/bin/env bash
# Run the GPU tests (tests/test_gpu.py, marked `cuda`) on a machine with an NVIDIA GPU and a CUDA build
# of torch already installed in $PYTHON (default python3): installs nf4convert and its test extra
# around that torch, then runs the marked tests and the loader tests.   Usage: bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'NO GPU'); sys.exit(0 if ok else 1)" \
  || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 1; }
# no torch pin here: keep the machine's CUDA build
"$PYTHON" -m pip install -q -e ".[test]"
HF_HUB_OFFLINE=1 "$PYTHON" -m pytest -q -m cuda tests/test_gpu.py "$@"
