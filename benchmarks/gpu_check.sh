#!/usr/bin/env bash
# The prepared accelerator check (issue 30): the gradient checks, the engine against autodiff,
# fit in float32 and bfloat16, the sharded step, fbp's step against jax.grad, the diagnostics,
# the private and K-FAC steps against the plain one, and the peers that are installed — one
# JSON report (benchmarks/gpu_check.py; each section runs even when another fails).
#
#   bash benchmarks/gpu_check.sh [REPORT.json]             where a GPU is lent
#   bash benchmarks/gpu_check.sh --dry-run [REPORT.json]   here, on the CPU: every section at
#                                                           the smallest sizes, end to end
#
# Exit status: 0 when every section ran ("status": "ok"), 1 otherwise (the report says which).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=()
if [ "${1:-}" = "--dry-run" ]; then DRY=(--dry-run); shift; fi
REPORT="${1:-gpu_check.json}"
PYTHON="${PYTHON:-python}"
"$PYTHON" -c "import jax; print('devices:', jax.devices())"
"$PYTHON" benchmarks/gpu_check.py "${DRY[@]}" --out "$REPORT" || exit 1
"$PYTHON" - "$REPORT" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
failed = [k for k, v in report.items() if k.startswith("section ") and v["status"] != "ok"]
print(f"{sys.argv[1]}: {len(report)} entries; sections failed: {failed or 'none'}")
sys.exit(1 if failed else 0)
PY
