#!/usr/bin/env bash
# The GPU check, one command on one H100/H200, bounded to BUDGET_S seconds (default 450, under 8 minutes):
#   1. the CUDA tests (tests/model/test_cuda.py, tests/server/test_cuda_server.py, any other test named or marked cuda);
#   2. dense vs eventful, both captured as CUDA graphs (--execution graph), bfloat16, r = 64, at 1, 8 and 32 streams,
#      for DeiT-Tiny (the ../shared weights when present, else the named architecture), ViT-B/16 at 224 and ViT-L/16 at
#      384 (named architectures: random weights; speed does not depend on them, fidelity does);
#   3. the live server on CUDA (eventful-serve --device cuda --dtype bfloat16, and --execution graph where
#      eventful-serve has that flag);
#   4. a summary table from the JSON files (python -m bench.gpu_summary).
#
#   bash bench/gpu_check.sh [OUT_DIR [VIDEO]]
#
# On a lent GPU machine (nothing can be fetched there): run bench/gpu_wheels.sh here first and carry .whl (and the
# video, copied into the repository) with the working tree; this script installs the wheels into /tmp/site.
#
# OUT_DIR: $1, else $OUT, else ./gpu_check_out. Reports and logs go to OUT_DIR/runs, the step outcomes to
# OUT_DIR/steps.tsv, the table to OUT_DIR/summary.txt and everything packed to OUT_DIR/gpu_check.tar.gz
# (KEEP_RUNS=0 removes OUT_DIR/runs afterwards, leaving three files). VIDEO: $2, else
# ../shared/data/videos/slow_traffic_small.mp4 (paths relative to the repository root).
# DEVICE=cpu runs every step small on the CPU (a 64x64 DeiT-Tiny, eager float32, 1 and 3 streams, a few frames, the
# server for a few seconds): a check of the script itself, in about two minutes.
# Each step runs under `timeout` with at most the time left; a step with under 20 s left is skipped. The exit status
# is 0 when every step passed, 1 otherwise; the summary is printed either way.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

OUT_DIR=${1:-${OUT:-gpu_check_out}}
VIDEO=${2:-../shared/data/videos/slow_traffic_small.mp4}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
KEEP_RUNS=${KEEP_RUNS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RUNS="$OUT_DIR/runs"
mkdir -p "$RUNS" || exit 2
: >"$OUT_DIR/steps.tsv"
DEADLINE=$((SECONDS + BUDGET_S))
FAILED=0

# step NAME LIMIT_S COMMAND...: run it with its output in runs/NAME.log, under min(LIMIT_S, time left)
step() {
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) start=$SECONDS rc
    shift 2
    if ((left < 20)); then
        echo "== $name: skipped, ${left} s left"
        printf '%s\tskipped\t0\n' "$name" >>"$OUT_DIR/steps.tsv"
        FAILED=1
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" >"$RUNS/$name.log" 2>&1
    rc=$?
    # rc 5: pytest collected nothing (no other test named cuda)
    if ((rc != 0)) && ! [[ $name == tests_named_cuda && $rc == 5 ]]; then
        FAILED=1
        echo "   exit $rc; the log's end:"
        tail -n 25 "$RUNS/$name.log" | sed 's/^/   | /'
    else
        rc=0
        grep -E '^(dense:|[0-9]+ passed|.* passed|.* skipped)' "$RUNS/$name.log" | tail -n 3 | sed 's/^/   /'
    fi
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$OUT_DIR/steps.tsv"
}

# ---- what the run needs (on a lent GPU machine: the wheels bench/gpu_wheels.sh downloaded, carried as .whl)
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if ! "$PYTHON" -c 'import torch, av, fastapi, uvicorn, httpx, pydantic_settings, websockets, prometheus_client, pytest'
then
    echo "error: $PYTHON lacks a package the check needs (above); install the project: pip install -e '.[test]'" >&2
    exit 2
fi
if [[ ! -r $VIDEO ]]; then
    echo "error: no video at $VIDEO (pass one: bash bench/gpu_check.sh OUT_DIR VIDEO)" >&2
    exit 2
fi
if [[ $DEVICE == cuda ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "error: torch sees no CUDA device (DEVICE=cpu runs the small CPU version)" >&2
    exit 2
fi
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'

DEIT=deit-tiny-patch16-224
[[ -r ../shared/weights/deit_tiny_patch16_224.pth ]] && DEIT=../shared/weights/deit_tiny_patch16_224.pth
if [[ $DEVICE == cuda ]]; then
    MODELS=("deit_tiny|$DEIT|" "vit_base|vit-base-patch16-224|" "vit_large_384|vit-large-patch16-224|384x384")
    STREAMS=(1 8 32)
    MODEL_ARGS=(--device cuda --dtype bfloat16 --execution graph --budgets 64 --frames 40 --warmup 2)
    SERVER_ARGS=(--streams 1,8 --duration 5 --repeats 1 --budget-tokens 64
                 --server-arg=--device=cuda --server-arg=--dtype=bfloat16)
    TEST_LIMIT=180 MODEL_LIMIT=90 SERVER_LIMIT=150
    if "$PYTHON" -m server.cli --help 2>/dev/null | grep -q -- '--execution'; then
        SERVER_ARGS+=(--server-arg=--execution=graph)
    fi
else
    MODELS=("deit_tiny_64|deit-tiny-patch16-224|64x64")
    STREAMS=(1 3)
    MODEL_ARGS=(--device cpu --dtype float32 --execution eager --budgets 8 --frames 6 --warmup 1 --threads 1)
    SERVER_ARGS=(--streams 1,2 --duration 2 --repeats 1 --budget-tokens 64
                 --server-arg=--device=cpu --server-arg=--threads=1)
    TEST_LIMIT=120 MODEL_LIMIT=60 SERVER_LIMIT=90
fi

# ---- 1. the CUDA tests (skipped on the CPU, which still checks that they collect)
step tests_cuda "$TEST_LIMIT" "$PYTHON" -m pytest -q tests/model/test_cuda.py tests/server/test_cuda_server.py
step tests_named_cuda "$TEST_LIMIT" "$PYTHON" -m pytest -q tests -k cuda \
    --ignore=tests/model/test_cuda.py --ignore=tests/server/test_cuda_server.py

# ---- 2. dense vs eventful, per model and stream count
for entry in "${MODELS[@]}"; do
    IFS='|' read -r name model size <<<"$entry"
    for b in "${STREAMS[@]}"; do
        args=(--model "$model" --video "$VIDEO" --streams "$b" "${MODEL_ARGS[@]}" --json "$RUNS/model_${name}_b$b.json")
        [[ -n $size ]] && args+=(--image-size "$size")
        step "model_${name}_b$b" "$MODEL_LIMIT" "$PYTHON" -m bench.cli model "${args[@]}"
    done
done

# ---- 3. the live server
step server "$SERVER_LIMIT" "$PYTHON" -m bench.cli server --model "$DEIT" --video "$VIDEO" "${SERVER_ARGS[@]}" \
    --json "$RUNS/server_$DEVICE.json"

# ---- 4. the summary
echo
"$PYTHON" -m bench.gpu_summary "$OUT_DIR" | tee "$OUT_DIR/summary.txt"
tar -czf "$OUT_DIR/gpu_check.tar.gz" -C "$OUT_DIR" runs steps.tsv summary.txt
[[ $KEEP_RUNS == 0 ]] && rm -rf "$RUNS"
echo "wrote $OUT_DIR/summary.txt and $OUT_DIR/gpu_check.tar.gz in $SECONDS s"
exit "$FAILED"
