#!/usr/bin/env bash
# One-shot GPU check (issue 12 item 8). On a CUDA machine with this repository:
#
#     bash bench/gpu_check.sh              # everything, about 8 minutes on one datacenter GPU
#     bash bench/gpu_check.sh --dry-run    # the same steps at tiny shapes on the CPU (CI runs this)
#
# Steps, each with its own time budget (seconds; a step that would not fit in what is left of the total
# is skipped and marked so, never cut off half-written):
#   env        torch / CUDA / GPU / CPU description                       -> env.json
#   tests      tests/test_cuda.py and every CUDA-marked test               -> tests.xml (JUnit)
#   kernels    bench/kernels.py --device cuda                              -> kernels.json
#   unet-sd15  bench/unet.py SD1.5 512px: fp16, W8A8, W4A8 (+ compiled)    -> unet-sd15-512.json
#   unet-sdxl  bench/unet.py SDXL 1024px: the same modes                   -> unet-sdxl-1024.json
#   calibrate  bench/calibrate.py SD1.5 W4A8, 2 prompts x 4 steps, phases  -> calibrate-sd15.json
# then summary.md (a table of every step: status, seconds, the main figures) from bench/gpu_summary.py.
#
# Output folder: $OUT, else bench/out/gpu/ (dry run: bench/out/gpu-dry/). Python: $PYTHON, else .venv/bin/python,
# else python3. Installs nothing except, when an import fails, requirements.txt + requirements-dev.txt (never torch).
# Options: --dry-run, --budget SECONDS (total, default 480), --out DIR.
set -u
cd "$(dirname "$0")/.." || exit 2

DRY=0
TOTAL=480
OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --budget) TOTAL="$2"; shift ;;
        --out) OUT_DIR="$2"; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$OUT_DIR" ]; then
    if [ "$DRY" = 1 ]; then OUT_DIR=bench/out/gpu-dry; else OUT_DIR=bench/out/gpu; fi
fi
mkdir -p "$OUT_DIR"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
STATUS="$OUT_DIR/status.tsv"
printf 'step\tstatus\tseconds\tbudget\tfile\n' > "$STATUS"

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
else
    DEVICE=cuda
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False); try --dry-run" >&2
        exit 3
    fi
    if ! "$PY" -c 'import safetensors, numpy, diffusers, tqdm, transformers, pytest' 2>/dev/null; then
        echo "installing requirements.txt + requirements-dev.txt (torch is never installed here)"
        "$PY" -m pip install -q -r requirements.txt -r requirements-dev.txt || exit 4
    fi
fi

START=$SECONDS
# step NAME BUDGET FILE COMMAND...: runs COMMAND under `timeout BUDGET` if BUDGET still fits in the total.
step() {
    local name="$1" budget="$2" file="$3"
    shift 3
    local left=$(( TOTAL - (SECONDS - START) ))
    if [ "$left" -lt "$budget" ]; then
        echo "== $name: SKIPPED (needs ${budget} s, ${left} s of the ${TOTAL} s budget left)"
        printf '%s\tskipped-time\t0\t%s\t%s\n' "$name" "$budget" "$file" >> "$STATUS"
        return 0
    fi
    echo "== $name (budget ${budget} s): $*"
    local begin=$SECONDS
    timeout --kill-after=10 "$budget" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local took=$(( SECONDS - begin ))
    local status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status="failed-rc$rc"; fi
    echo "   $status in ${took} s (log: $OUT_DIR/$name.log)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$budget" "$file" >> "$STATUS"
}

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$( [ "$DRY" = 1 ] && echo 1 || nproc )}"
COMPILE_ARGS=()
COMPILED_MODES=""
if grep -q -- '"--compile"' bench/unet.py; then  # item 6 rows, where bench/unet.py has them
    COMPILE_ARGS=(--compile)
    COMPILED_MODES=",HALF-compiled,w8a8-compiled,w4a8-compiled"
fi

step env 30 env.json "$PY" - "$OUT_DIR/env.json" <<'EOF'
import json, platform, sys
import torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(), "cpu": platform.processor() or platform.machine()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
EOF

if [ "$DRY" = 1 ]; then
    step tests 120 tests.xml "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py --junitxml="$OUT_DIR/tests.xml"
    step kernels 120 kernels.json "$PY" bench/kernels.py --device cpu --quick --reps 1 \
        --shapes linear_m154_k768_n320 --json "$OUT_DIR/kernels.json"
    step unet-tiny 180 unet-tiny-64.json "$PY" bench/unet.py --arch tiny --res 64 --device cpu --rounds 1 \
        --modes "fp32,bf16,w8a8,w4a8" --json "$OUT_DIR/unet-tiny-64.json"
    step calibrate 180 calibrate-tiny.json "$PY" bench/calibrate.py --arch tiny --res 64 --prompts 1 --steps 2 \
        --preset W4A8 --device cpu --json "$OUT_DIR/calibrate-tiny.json"
else
    step tests 75 tests.xml "$PY" -m pytest -q -p no:cacheprovider -m cuda tests --junitxml="$OUT_DIR/tests.xml"
    step kernels 60 kernels.json "$PY" bench/kernels.py --device cuda --reps 10 --json "$OUT_DIR/kernels.json"
    step unet-sd15 100 unet-sd15-512.json "$PY" bench/unet.py --arch sd15 --res 512 --device cuda --rounds 5 \
        --modes "fp16,w8a8,w4a8${COMPILED_MODES//HALF/fp16}" "${COMPILE_ARGS[@]}" --json "$OUT_DIR/unet-sd15-512.json"
    step unet-sdxl 120 unet-sdxl-1024.json "$PY" bench/unet.py --arch sdxl --res 1024 --device cuda --rounds 3 \
        --modes "fp16,w8a8,w4a8${COMPILED_MODES//HALF/fp16}" "${COMPILE_ARGS[@]}" --json "$OUT_DIR/unet-sdxl-1024.json"
    step calibrate 110 calibrate-sd15.json "$PY" bench/calibrate.py --arch sd15 --res 512 --prompts 2 --steps 4 \
        --preset W4A8 --device cuda --json "$OUT_DIR/calibrate-sd15.json"
fi

"$PY" bench/gpu_summary.py "$OUT_DIR" > "$OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"
echo "total $(( SECONDS - START )) s of the ${TOTAL} s budget; everything is in $OUT_DIR/"
# Exit status: 0 when every step ran and passed, 1 otherwise (skips for time count as not passed).
if grep -q -v -P '^step\t|\tok\t' "$STATUS"; then exit 1; fi
exit 0
