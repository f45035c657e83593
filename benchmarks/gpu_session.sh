#!/usr/bin/env bash
# Every check that needs a GPU, in one run: a session lent a CUDA machine runs this once.
#
#   OUT=/path/for/results bash benchmarks/gpu_session.sh
#
# It uses the machine's own python3 (torch, transformers, accelerate preinstalled) with
# PYTHONPATH=src, writes each step's log and tables under $OUT, and gives each step a time
# limit so that the whole run stays under about 9 minutes on an H100. Liger Kernel is taken from
# a wheel in .whl/ when one is there (pip download --no-deps liger-kernel==0.8.5; the machine
# reaches no registry), otherwise its rows read "failed".
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=src
if ls .whl/*.whl >/dev/null 2>&1; then
    pip install --quiet --no-index --no-deps --target /tmp/dk_site .whl/*.whl && PYTHONPATH=src:/tmp/dk_site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, never abort
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start))s; tail:"
    tail -n 12 "$OUT/$name.log" | sed 's/^/   /'
}

if python3 -m pytest --version >/dev/null 2>&1; then
    step cuda_tests 150 python3 -m pytest -q -p no:cacheprovider tests/train/test_train_cuda.py \
        tests/losses/test_fused.py -k "cuda"
fi
step llm_gpu_check 90 python3 tests/llm/gpu_check.py
step kd_loss_cuda 90 python3 benchmarks/kd_loss.py --device cuda --repeats 3 --inner 10 \
    --output "$OUT/kd_loss_cuda.md"
step fused_cuda_float32 120 python3 benchmarks/fused_kd.py --device cuda --threads 0 --repeats 3 \
    --cases naive,liger,fused,roofline --liger-chunk-size 1024
step fused_cuda_bfloat16 120 python3 benchmarks/fused_kd.py --device cuda --threads 0 --repeats 3 \
    --dtype bfloat16 --cases naive,liger,fused,roofline --liger-chunk-size 1024
