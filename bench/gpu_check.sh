#!/usr/bin/env bash
# The one prepared run for a lent GPU machine: every CUDA figure the issues ask for, most wanted first,
# each step under its own time limit so that one slow or failing step never costs the others.
#
#   bash bench/gpu_check.sh                      # every step: about 10 minutes on an H100/H200
#   STEPS="fsdp kv" bash bench/gpu_check.sh      # a rerun of some steps only
#
# Steps (seconds allowed):
#   tests  (75)  the CUDA tests and the loss/packing tests on the GPU
#   1.5b   (190) bench.run --preset 1.5b: tokens/s and MFU of each step, distill / SFT (issue 14)
#   fsdp   (75)  1-GPU FSDP2 / plain SFT step under torchrun (issue 11, target <= 1.05)
#   gpu    (110) bench.run --preset gpu: distill / SFT, distill / live teacher (issue 14)
#   kv     (45)  bench.kv_cache on CUDA: dynamic / static / preallocated KV-cache decode, rows kept, host
#                check every 8 steps (to decide what --kv-cache auto picks on CUDA)
#   prec   (30)  bench.teacher_precision --device cuda: the float32 heads' step-time cost (issue 10)
#   base   (150) bench.baselines --preset gpu: SimPO, TDPO1, TDPO2 step time and peak memory / DPO's (issue 25)
# Every entry point below has a CPU smoke run in `make test` (tests/integration/test_bench_smoke.py).
# Every result lands under $OUT (default /tmp/gpu-out), which the device tool brings back.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
STEPS=${STEPS:-"tests 1.5b fsdp gpu kv prec base"}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run COMMAND when NAME is in $STEPS, log to $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/gpu.txt"
  tail -25 "$OUT/$name.txt"
}

step tests 75 python3 -m pytest -p no:cacheprovider tests/unit/test_cuda.py tests/unit/test_fused.py \
  tests/unit/test_losses.py tests/unit/test_packing.py
step 1.5b 190 python3 -m bench.run --preset 1.5b --out "$OUT/bench-1.5b.json"
step fsdp 75 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m bench.fsdp_step --preset gpu --out "$OUT/fsdp.json"
step gpu 110 python3 -m bench.run --preset gpu --out "$OUT/bench-gpu.json"
step kv 45 python3 -m bench.kv_cache --device cuda --out "$OUT/kv_cache.json"
step prec 30 python3 -m bench.teacher_precision --device cuda
step base 150 python3 -m bench.baselines --device cuda --preset gpu --out "$OUT/baselines.json"
