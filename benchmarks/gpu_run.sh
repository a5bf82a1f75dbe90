#!/usr/bin/env bash
# The GPU checks of issue 12 as one prepared run, for a session that is lent a GPU machine
# (the device tool: one NVIDIA H200, Python 3.12 with torch, torchvision, matplotlib,
# tqdm, lightning and tensorboard, but not pyro-ppl, pyro-api, arviz or lightning-fabric,
# and no network). Device time is short, so everything runs in one call.
#
# Here, once (needs pip's index; about 14 MB into .gpu/, which git ignores):
#     bash benchmarks/gpu_run.sh prepare
# There, in one call of the device tool's run, with carry [".gpu"] and timeout_s 560 (the
# steps' own limits add up to 470 s):
#     bash benchmarks/gpu_run.sh run
# Everything it prints is also written under $OUT (the device tool brings it back): the
# GPU's name, the CUDA tests, benchmarks/speed.py and benchmarks/fused_step.py on CUDA,
# and fit with --compile reduce-overhead (CUDA graphs). Copy the figures, with the GPU's
# name and these commands, into docs/benchmarks.md.
#
# To try the run part without a GPU (a smoke test of this script, not a measurement):
#     DEVICE=cpu EPOCHS=2 OUT=/tmp/gpu_out bash benchmarks/gpu_run.sh run
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pyro-ppl==1.9.2 pyro-api==0.1.2 arviz==0.23.4 xarray-einstats==0.9.1 h5netcdf==1.8.2
        platformdirs lightning-fabric==2.6.6)

prepare() {
    local exclude
    exclude=$(git rev-parse --git-path info/exclude) || exit 1
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
    mkdir -p .gpu/whl .gpu/data/MNIST/raw
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation py --platform any -d .gpu/whl "${WHEELS[@]}" || exit 1
    cp "${MNIST_RAW:-../shared/data/MNIST/raw}"/*.gz .gpu/data/MNIST/raw/ || exit 1
    du -sh .gpu
}

run() {
    local out=${OUT:?set OUT to the folder for the results} device=${DEVICE:-cuda}
    local epochs=${EPOCHS:-6}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if [ -d .gpu/whl ] && ! python3 -c "import pyro, arviz, lightning_fabric" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .gpu/whl/*.whl || exit 1
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    local data=.gpu/data
    [ -d "$data/MNIST/raw" ] || data=../shared/data
    {
        date -u
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
        python3 -c "import torch; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available() and torch.cuda.get_device_name())"
    } 2>&1 | tee "$out/gpu.txt"
    # only the files that hold CUDA tests: collecting the others imports more packages
    step "CUDA tests" cuda_tests.txt 120 python3 -m pytest -m cuda -q -p no:cacheprovider \
        tests/test_cuda.py tests/test_discrete.py
    step "speed.py" speed.txt 190 python3 benchmarks/speed.py --data-dir "$data" \
        --epochs "$epochs" --device "$device"
    step "fused_step.py" fused_step.txt 80 python3 benchmarks/fused_step.py --data-dir "$data" \
        --rounds 5 --steps 200 --device "$device"
    step "fit --compile reduce-overhead" compile.txt 80 python3 scripts/fit.py \
        --data-dir "$data" --out /tmp/gpu_compiled --epochs 3 --compile reduce-overhead \
        --device "$device" --no-progress
}

# step TITLE FILE SECONDS COMMAND...: run COMMAND with a time limit, its output to the
# screen and to $OUT/FILE; a failure is reported and the next step still runs
step() {
    local title=$1 file=$2 limit=$3
    shift 3
    echo "== $title: $*" | tee "$OUT/$file"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$file"
    echo "== $title: exit status ${PIPESTATUS[0]}" | tee -a "$OUT/$file"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_run.sh prepare|run" >&2; exit 2 ;;
esac
