#!/usr/bin/env bash
# Every GPU check in one go, offline, on a bare GPU machine (Python with a CUDA build of torch; no network,
# no bitsandbytes): installs the wheels of scripts/gpu_wheels.sh into a private folder, runs the project
# from this checkout (no build step), then the GPU tests (tests/test_gpu.py, marked `cuda`) and a short
# benchmark (scripts/bench_load.py --device cuda). Writes gpu_check.log and gpu_check.json (and the
# tests' JUnit XML, the benchmark's JSON) to $OUT, else ./gpu-check-out. Exits non-zero naming each
# failed step. The steps' time limits add up to under 8 minutes.   Usage: bash scripts/gpu_check.sh [WHEELS (.whl)]
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${1:-.whl}
DEST=${OUT:-gpu-check-out}
SITE=${SITE:-/tmp/nf4convert-site}
mkdir -p "$DEST"
exec > >(tee "$DEST/gpu_check.log") 2>&1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
steps=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, record ok/failed and the time taken
  local name=$1 limit=$2 start status
  shift 2
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  if timeout "$limit" "$@"; then status=ok; else status=failed; fi
  steps+=("$name $status $(( $(date +%s) - start ))")
  echo "== $name: $status"
  [ "$status" = ok ]
}

step gpu 30 "$PYTHON" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'NO GPU'); sys.exit(0 if ok else 1)"
gpu=$?
step install 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ $gpu -eq 0 ]; then
  step tests 200 "$PYTHON" -m pytest -q -m cuda tests/test_gpu.py --junitxml "$DEST/gpu_tests.xml"
  step bench 180 "$PYTHON" scripts/bench_load.py --device cuda --layers 4 --moe-layers 4 --batches 1,16 --workdir /tmp/nf4convert-bench
  cp /tmp/nf4convert-bench/bench_load.json "$DEST/" 2>/dev/null
fi

"$PYTHON" - "$DEST" "${steps[@]}" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
dest, steps = Path(sys.argv[1]), [s.split() for s in sys.argv[2:]]
summary = {"steps": [{"name": n, "status": s, "seconds": int(t)} for n, s, t in steps]}
junit = dest / "gpu_tests.xml"
if junit.is_file():
    cases = ET.parse(junit).getroot().iter("testcase")
    results = {f"{c.get('classname')}::{c.get('name')}": next((x.tag for x in c if x.tag in ("failure", "error", "skipped")), "passed") for c in cases}
    summary["tests"] = {"counts": {k: list(results.values()).count(k) for k in ("passed", "failure", "error", "skipped")},
                        "not_passed": {k: v for k, v in results.items() if v != "passed"}}
bench = dest / "bench_load.json"
if bench.is_file():
    summary["bench"] = json.loads(bench.read_text())
failed = [s["name"] for s in summary["steps"] if s["status"] != "ok"]
summary["ok"] = not failed
(dest / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=2))
if failed:
    print("gpu_check: failed:", ", ".join(failed), file=sys.stderr)
    sys.exit(1)
PY
