#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README "Measured performance"):
# the CUDA tests, the smoke pipeline on CUDA (bf16 autocast), then `make bench`'s gpu preset.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest tests/unit/test_cuda.py tests/unit/test_fused.py tests/unit/test_losses.py -q 2>&1 | tail -3 | tee "$OUT/tests.txt"
( time timeout 150 python3 -m aligndistil_cli run pipelines/smoke.yaml --root /tmp/smk ) > "$OUT/smoke.txt" 2>&1
tail -12 "$OUT/smoke.txt"
timeout 300 python3 -m bench.run --preset gpu --out "$OUT/results.json" 2>&1 | tee "$OUT/bench.txt" | tail -40
