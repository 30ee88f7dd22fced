#!/usr/bin/env bash
# The device check: everything a GPU window should measure, in one call of about 7 minutes.
#
# On the device machine, from the repository root, with the kit carried (make device-kit here):
#   bash tools/device_check.sh
# Dry run on a CPU (tiny models in bf16, 64², 2 steps; what tests/engines/test_device_kit.py runs):
#   DEVICE_CHECK_DRY_RUN=1 PYTHON=.venv/bin/python bash tools/device_check.sh
#
# Stages, in order, each under its own `timeout -s INT` (a cut pytest still writes its report and a
# cut Python stage prints where it was), so that a slow one is cut and recorded and the next still
# runs (docs/ENGINES.md, "Device kit", has each budget and how it was estimated):
#   install        what the image lacks, from the kit, offline, then an import check of every
#                  module the later stages import (tools/device_kit.py)
#   gpu_tests      pytest -m "gpu and not inductor" tests/engines (tiny model, CUDA graphs over
#                  eager kernels, fp32 and bf16, the runner)
#   sd15, sdxl     benchmarks/gpu_bench.py: three-call vs batched eager vs compiled + CUDA graphs
#   gpu_inductor   pytest -m "gpu and inductor" tests/engines: the tiny model compiled cold by
#                  inductor, last, with what is left
#   sd15_inductor  the SD-1.5 bench with inductor kernels: never in the default plan (a cold
#                  full-size compile does not fit a 7-minute window); name it in DEVICE_CHECK_STAGES
#                  for a window of its own
#   lora           (only when named) benchmarks/lora_bench.py: per-row LoRA vs fused weights,
#                  SDXL 1024² bf16, rows 1,2,4,8 x ranks 8,32,64,128 (DEVICE_CHECK_STAGES=install,lora)
# A stage starts only when its minimum fits in what is left of the total (else it is recorded as
# skipped); it runs for at most min(budget, what is left). Each finished, cut or skipped stage
# appends one line to stages.jsonl; gpu_bench.py logs each phase as it starts and ends and rewrites
# gpu-bench.json after every measured row. Outputs go to $OUT (the device tool brings it back)
# when set, else outputs/device-check/.
#
# Environment: PYTHON (python3), DEVICE_KIT (outputs/device-kit), DEVICE_SITE (where the kit goes
# when the image's environment is read-only; /tmp/realcustom-site), DEVICE_CHECK_TOTAL_S (420),
# DEVICE_CHECK_STAGES (comma list; default all but sd15_inductor and lora), DEVICE_CHECK_BUDGET_<STAGE>
# (seconds, e.g. DEVICE_CHECK_BUDGET_SDXL=200), DEVICE_CHECK_BENCH_ARGS (more gpu_bench.py flags,
# e.g. "--runs 20"), DEVICE_CHECK_DRY_RUN (1: CPU, tiny models).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PYTHON=${PYTHON:-python3}
KIT=${DEVICE_KIT:-outputs/device-kit}
SITE=${DEVICE_SITE:-/tmp/realcustom-site}
DRY_RUN=${DEVICE_CHECK_DRY_RUN:-0}
TOTAL_S=${DEVICE_CHECK_TOTAL_S:-420}
SELECTED=${DEVICE_CHECK_STAGES:-install,gpu_tests,sd15,sdxl,gpu_inductor}
OUT_DIR=${OUT:-outputs/device-check}
# A stage cut by its budget gets SIGINT (pytest writes its report, Python prints its traceback),
# then this long before SIGKILL.
KILL_AFTER_S=10

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STAGES="$OUT_DIR/stages.jsonl"
# Each check starts from empty result files (gpu_bench.py would add to an existing one).
rm -f "$OUT_DIR"/{gpu-bench.json,gpu-bench.md,gpu-tests.xml,gpu-inductor-tests.xml,environment.json,lora-bench.json,lora-bench.md}
: >"$STAGES"
# The project runs from source: the image cannot install it (it pins another torch). SITE holds
# the kit only when the image's environment is read-only (tools/device_kit.py decides).
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
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

# Extra gpu_bench.py flags, after the stage's own (e.g. "--runs 20" in a longer window).
read -r -a BENCH_EXTRA <<<"${DEVICE_CHECK_BENCH_ARGS:-}"
BENCH_OPTIONS+=("${BENCH_EXTRA[@]}")

FAILED=0
MODE=plan
record() { # name status rc budget seconds note
    printf '{"stage": "%s", "status": "%s", "rc": %s, "budget_s": %s, "seconds": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "$6" >>"$STAGES"
    echo "=== stage $1: $2 (rc $3, ${5}s of ${4}s) $6"
}

# stage NAME DEFAULT_BUDGET_S MIN_S COMMAND...: with MODE=plan, print the plan line; with MODE=run,
# run COMMAND under min(budget, time left), or skip it when less than MIN_S is left.
stage() {
    local name=$1 budget=$2 min_s=$3
    shift 3
    local override="DEVICE_CHECK_BUDGET_${name^^}"
    budget=${!override:-$budget}
    local selected=1
    [[ ",$SELECTED," == *",$name,"* ]] || selected=0
    if [ "$MODE" = plan ]; then
        local what=run
        [ $selected = 1 ] || what="not selected"
        printf 'plan: %-13s %-12s budget %3ss, starts with >= %3ss left: timeout -s INT -k %s %s' \
            "$name" "$what" "$budget" "$min_s" "$KILL_AFTER_S" "$budget"
        printf ' %q' "$@"
        printf '\n'
        return
    fi
    if [ $selected = 0 ]; then
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
    timeout -s INT --kill-after="$KILL_AFTER_S" "$budget" "$@"
    rc=$?
    local took=$((SECONDS - began))
    case $rc in
    0) record "$name" passed "$rc" "$budget" "$took" "" ;;
    124 | 137) record "$name" timed_out "$rc" "$budget" "$took" "cut by its budget (SIGINT); rows so far kept" ;;
    *) record "$name" failed "$rc" "$budget" "$took" "see device-check.log" ;;
    esac
    ((rc == 0)) || FAILED=1
}

stages() {
    local gpu_bench=("$PYTHON" benchmarks/gpu_bench.py --out "$OUT_DIR")
    local pytest=("$PYTHON" -m pytest tests/engines -q -p no:cacheprovider --continue-on-collection-errors)
    # Import check: every module the later stages' entry points import must import after install.
    stage install 45 1 "$PYTHON" tools/device_kit.py install --kit "$KIT" --site "$SITE" \
        --report "$OUT_DIR/environment.json" --check-imports benchmarks/gpu_bench.py benchmarks/lora_bench.py \
        tests/conftest.py tests/engines/conftest.py tests/engines/test_engines_gpu.py "${INSTALL[@]}"
    # No inductor here: a cold inductor compile per dtype would eat the stage (it runs last).
    stage gpu_tests 90 30 "${pytest[@]}" -m "gpu and not inductor" --junitxml "$OUT_DIR/gpu-tests.xml"
    stage sd15 110 60 "${gpu_bench[@]}" --model "$SD15" --runs 10 "${BENCH_OPTIONS[@]}"
    stage sdxl 170 120 "${gpu_bench[@]}" --model "$SDXL" --runs 5 "${BENCH_OPTIONS[@]}"
    stage gpu_inductor 150 90 "${pytest[@]}" -m "gpu and inductor" \
        --junitxml "$OUT_DIR/gpu-inductor-tests.xml"
    stage sd15_inductor 420 360 "${gpu_bench[@]}" --model "$SD15" --runs 3 \
        --compile-backend "$INDUCTOR" --loops batched,compiled "${BENCH_OPTIONS[@]}"
    stage lora 150 60 "$PYTHON" benchmarks/lora_bench.py --out "$OUT_DIR" "${LORA_OPTIONS[@]}"
}

main() {
    echo "device check: $(date -u +%FT%TZ), dry run $DRY_RUN, total budget ${TOTAL_S}s, out $OUT_DIR"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    fi
    MODE=plan stages
    MODE=run
    stages

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
