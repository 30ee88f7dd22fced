#!/usr/bin/env bash
# The device check: everything a GPU window should measure, in one call of under 8 minutes.
#
# On the device machine, from the repository root, with the kit carried (make device-kit here):
#   bash tools/device_check.sh
# Dry run on a CPU (tiny models in bf16, 64², 2 steps; what tests/engines/test_device_kit.py runs):
#   DEVICE_CHECK_DRY_RUN=1 PYTHON=.venv/bin/python bash tools/device_check.sh
#
# Stages, in order, each under its own `timeout` so that a slow one is cut and recorded, and the
# next still runs (docs/ENGINES.md, "Device kit"):
#   install        what the image lacks, from the kit, offline (tools/device_kit.py)
#   gpu_tests      pytest -m gpu tests/engines (tiny model, both capture paths)
#   sd15, sdxl     benchmarks/gpu_bench.py: three-call vs batched eager vs compiled + CUDA graphs
#   sd15_inductor  the same with inductor kernels, only when enough of the total is left
#   lora           (only when selected) benchmarks/lora_bench.py: per-row LoRA vs fused weights,
#                  SDXL 1024² bf16, rows 1,2,4,8 x ranks 8,32,64,128 (DEVICE_CHECK_STAGES=install,lora)
# Each finished (or cut) stage appends one line to stages.jsonl; gpu_bench.py rewrites
# gpu-bench.json after every measured row. Outputs go to $OUT (the device tool brings it back)
# when set, else outputs/device-check/.
#
# Environment: PYTHON (python3), DEVICE_KIT (outputs/device-kit), DEVICE_CHECK_TOTAL_S (460),
# DEVICE_CHECK_STAGES (comma list; default all), DEVICE_CHECK_BUDGET_<STAGE> (seconds, e.g.
# DEVICE_CHECK_BUDGET_SDXL=200), DEVICE_CHECK_DRY_RUN (1: CPU, tiny models).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PYTHON=${PYTHON:-python3}
KIT=${DEVICE_KIT:-outputs/device-kit}
DRY_RUN=${DEVICE_CHECK_DRY_RUN:-0}
TOTAL_S=${DEVICE_CHECK_TOTAL_S:-460}
# (lora runs only when named: the default stages fill the budget)
SELECTED=${DEVICE_CHECK_STAGES:-install,gpu_tests,sd15,sdxl,sd15_inductor}
OUT_DIR=${OUT:-outputs/device-check}
# The inductor stage starts only with this much of the total left (an SD-1.5 compile takes minutes).
INDUCTOR_MIN_S=120
# A stage cut by its budget gets this long after SIGTERM before SIGKILL.
KILL_AFTER_S=10

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STAGES="$OUT_DIR/stages.jsonl"
# Each check starts from empty result files (gpu_bench.py would add to an existing one).
rm -f "$OUT_DIR"/{gpu-bench.json,gpu-bench.md,gpu-tests.xml,environment.json,lora-bench.json,lora-bench.md}
: >"$STAGES"
# The project runs from source: the image cannot install it (it pins another torch).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
START=$SECONDS

if [ "$DRY_RUN" = 1 ]; then
    # bf16 as on the GPU: a dtype mismatch between loops and UNet fails here, not in a device window.
    BENCH_OPTIONS=(--device cpu --dtype bf16 --size 64 --steps 2 --mask-reused-step 1 --runs 1)
    # The compile stage runs its control flow only: a CPU inductor compile takes many minutes.
    SD15=tiny-sd15 SDXL=tiny INDUCTOR=none INSTALL=(--dry-run)
    LORA_OPTIONS=(--device cpu --dtype bf16 --model tiny --size 64 --rows 1,2 --ranks 4 --runs 1)
else
    BENCH_OPTIONS=()
    SD15=sd15 SDXL=sdxl INDUCTOR=inductor INSTALL=()
    LORA_OPTIONS=(--device cuda --dtype bf16 --model sdxl --size 1024 --rows 1,2,4,8 --ranks 8,32,64,128 --runs 10)
fi

FAILED=0
record() { # name status rc budget seconds note
    printf '{"stage": "%s", "status": "%s", "rc": %s, "budget_s": %s, "seconds": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "$6" >>"$STAGES"
    echo "=== stage $1: $2 (rc $3, ${5}s of ${4}s) $6"
}

# stage NAME DEFAULT_BUDGET_S MIN_S COMMAND...: run COMMAND under min(budget, time left).
stage() {
    local name=$1 budget=$2 min_s=$3
    shift 3
    local override="DEVICE_CHECK_BUDGET_${name^^}"
    budget=${!override:-$budget}
    if [[ ",$SELECTED," != *",$name,"* ]]; then
        record "$name" skipped null "$budget" 0 "not selected (DEVICE_CHECK_STAGES)"
        return
    fi
    local left=$((TOTAL_S - (SECONDS - START)))
    if ((left < min_s)); then
        record "$name" skipped null "$budget" 0 "${left}s of the total left, needs ${min_s}s"
        return
    fi
    ((budget > left)) && budget=$left
    echo "=== stage $name (budget ${budget}s): $*"
    local began=$SECONDS rc
    timeout --kill-after="$KILL_AFTER_S" "$budget" "$@"
    rc=$?
    local took=$((SECONDS - began))
    case $rc in
    0) record "$name" passed "$rc" "$budget" "$took" "" ;;
    124 | 137) record "$name" timed_out "$rc" "$budget" "$took" "cut by its budget; rows so far kept" ;;
    *) record "$name" failed "$rc" "$budget" "$took" "see device-check.log" ;;
    esac
    ((rc == 0)) || FAILED=1
}

main() {
    echo "device check: $(date -u +%FT%TZ), dry run $DRY_RUN, total budget ${TOTAL_S}s, out $OUT_DIR"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    fi

    stage install 90 1 "$PYTHON" tools/device_kit.py install --kit "$KIT" \
        --report "$OUT_DIR/environment.json" "${INSTALL[@]}"
    # A test module that cannot be imported there must not stop the GPU tests of the others.
    stage gpu_tests 120 30 "$PYTHON" -m pytest -m gpu tests/engines -q -p no:cacheprovider \
        --continue-on-collection-errors --junitxml "$OUT_DIR/gpu-tests.xml"
    local gpu_bench=("$PYTHON" benchmarks/gpu_bench.py --out "$OUT_DIR")
    stage sd15 120 30 "${gpu_bench[@]}" --model "$SD15" --runs 10 "${BENCH_OPTIONS[@]}"
    stage sdxl 180 60 "${gpu_bench[@]}" --model "$SDXL" --runs 5 "${BENCH_OPTIONS[@]}"
    stage sd15_inductor 600 "$INDUCTOR_MIN_S" "${gpu_bench[@]}" --model "$SD15" --runs 3 \
        --compile-backend "$INDUCTOR" --loops batched,compiled "${BENCH_OPTIONS[@]}"
    stage lora 150 30 "$PYTHON" benchmarks/lora_bench.py --out "$OUT_DIR" "${LORA_OPTIONS[@]}"

    echo "=== stages ($((SECONDS - START))s in all)"
    cat "$STAGES"
    for table in gpu-bench.md lora-bench.md; do
        if [ -f "$OUT_DIR/$table" ]; then
            cat "$OUT_DIR/$table"
        fi
    done
    return "$FAILED"
}

# Status: 0 when every stage that ran passed.
main 2>&1 | tee "$OUT_DIR/device-check.log"
