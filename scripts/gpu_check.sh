#!/usr/bin/env bash
# The GPU check: measure sweeps/gpu_check.json on this machine's CUDA GPU within about 8 minutes.
#
#   scripts/gpu_check.sh [--out DIR] [--budget SECONDS] [--device cuda|cpu] [--sweep FILE] [--list] [-- SWEEP ARGS]
#
# - Runs `python3 -m lora_budget sweep` from this checkout (PYTHONPATH = the repository; nothing is installed,
#   nothing is downloaded: models are built from the catalog with random weights).  Without click it falls back to
#   `python3 -m lora_budget.measure.sweep` (the same sweep, argparse front end).
# - Every configuration runs in its own process (--isolate): an OOM is recorded as a result, a crash as a failed
#   record, and neither loses another configuration.  Records land in --out (default
#   measurements/<date>-<gpu>/) the moment each run ends; running the script again with the same --out resumes.
# - Time: the sweep starts no configuration after --budget seconds (default 420) and kills one still running at
#   that point (no record; a resume measures it); `timeout` guards the whole sweep at budget + 45 s.
# - A copy of the repository without .git can record its commit: LORA_BUDGET_GIT_COMMIT=<sha>
#   LORA_BUDGET_GIT_DIRTY=0|1 scripts/gpu_check.sh ...
# - PYTHON=python3.12 picks another interpreter.  --device cpu --sweep <tiny sweep> is the dry invocation the
#   tests run.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"

OUT_DIR="measurements/{date}-{gpu}"
BUDGET=420
DEVICE=cuda
SWEEP=sweeps/gpu_check.json
LIST=0
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT_DIR="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --sweep) SWEEP="$2"; shift 2 ;;
        --list) LIST=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# ---- preflight: what is installed, is there a GPU, where do records go ------------------------------------------------
"$PY" - "$DEVICE" <<'EOF' || exit 2
import importlib.util, platform, sys
from importlib import metadata
device = sys.argv[1]
print(f"python {platform.python_version()} ({sys.executable})")
for module, dist in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"),
                     ("accelerate", "accelerate"), ("bitsandbytes", "bitsandbytes"), ("pynvml", "nvidia-ml-py"),
                     ("click", "click")):
    if importlib.util.find_spec(module) is None:
        print(f"  {module:<13} MISSING")
        continue
    try:
        print(f"  {module:<13} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        print(f"  {module:<13} installed")
import torch
if device == "cuda":
    if not torch.cuda.is_available():
        print("gpu_check.sh: torch sees no CUDA device (use --device cpu for a dry invocation)", file=sys.stderr)
        sys.exit(2)
    print(f"  CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s); cuda:0 is checked in the sweep")
EOF

if "$PY" -c "import click" 2>/dev/null; then
    SWEEP_CMD=("$PY" -m lora_budget sweep)
else
    echo "click is not installed: using python -m lora_budget.measure.sweep"
    SWEEP_CMD=("$PY" -m lora_budget.measure.sweep)
fi
# fill {date} / {gpu} once so that the run and the listing use the same folder (NVML only: CUDA stays untouched)
OUT_DIR="$("$PY" - "$OUT_DIR" "$DEVICE" <<'EOF'
import datetime, sys
template, device = sys.argv[1], sys.argv[2]
from lora_budget.measure.env import gpu_slug
gpu = "cpu"
if device == "cuda" and "{gpu}" in template:
    from lora_budget.gpus import detect_gpus
    found = detect_gpus()
    gpu = gpu_slug(found[0].name) if found else "cuda"
print(template.format(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), gpu=gpu, name="gpu_check"))
EOF
)" || exit 2
echo "records: $OUT_DIR"

if [[ $LIST -eq 1 ]]; then
    "${SWEEP_CMD[@]}" "$SWEEP" --device "$DEVICE" --out "$OUT_DIR" --list
    exit $?
fi

# ---- the sweep ------------------------------------------------------------------------------------------------------
START=$(date +%s)
timeout --signal=INT --kill-after=15 "$((${BUDGET%.*} + 45))" \
    "${SWEEP_CMD[@]}" "$SWEEP" --device "$DEVICE" --out "$OUT_DIR" --isolate --time-budget "$BUDGET" "${EXTRA[@]}"
RC=$?
echo "sweep finished with exit code $RC after $(( $(date +%s) - START )) s"
echo
"${SWEEP_CMD[@]}" "$SWEEP" --device "$DEVICE" --out "$OUT_DIR" --list
exit $RC
