#!/usr/bin/env bash
# One step of a GPU session, run on the device machine from the repository root.
# vLLM 0.26.0 must be staged into /tmp/site first (../shared/device/stage-vllm prints the calls).
#
#   bash scripts/device.sh check     install the plugin, GPU tests, kernel benchmark (+ best config)
#   bash scripts/device.sh ttft dense|trianglemix   one engine of the TTFT/ITL benchmark
#   bash scripts/device.sh dynamic   install, dynamic-layer (XAttention) GPU tests, bench dynamic (~4 min)
#
# Results accumulate in /tmp/tmx (kept while the machine is warm) and are copied to $OUT.
set -euo pipefail
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tmx-out}
mkdir -p /tmp/tmx "$OUT"
case "$1" in
  check)
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/site . \
      > /tmp/tmx/install.log 2>&1 || { tail -5 /tmp/tmx/install.log; exit 1; }
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv > /tmp/tmx/gpu.txt
    python3 -m pytest -q -p no:cacheprovider tests/gpu > /tmp/tmx/gpu_tests.log 2>&1 || true
    python3 -m vllm_trianglemix bench kernel --out /tmp/tmx/kernel.json --best-env /tmp/tmx/kernel.env \
      > /tmp/tmx/kernel.log 2>&1 || true
    cp /tmp/tmx/* "$OUT"/
    tail -4 /tmp/tmx/gpu_tests.log; tail -8 /tmp/tmx/kernel.log
    ;;
  ttft)
    [ -f /tmp/tmx/kernel.env ] && source /tmp/tmx/kernel.env
    python3 -m vllm_trianglemix bench ttft --model benchmarks/models/llama-3.1-8b-instruct \
      --backends "$2" --append --out /tmp/tmx/ttft.json > "/tmp/tmx/ttft_$2.log" 2>&1 || true
    cp /tmp/tmx/ttft.json "/tmp/tmx/ttft_$2.log" "$OUT"/ 2>/dev/null || true
    grep -E "Error|Traceback" "/tmp/tmx/ttft_$2.log" | tail -3 || true
    tail -9 "/tmp/tmx/ttft_$2.log"
    ;;
  dynamic)
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/site . \
      > /tmp/tmx/install.log 2>&1 || { tail -5 /tmp/tmx/install.log; exit 1; }
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_xattention_gpu.py \
      > /tmp/tmx/dynamic_tests.log 2>&1 || true
    timeout 200 python3 -m vllm_trianglemix bench dynamic --out /tmp/tmx/dynamic.json --best-env /tmp/tmx/dynamic.env \
      > /tmp/tmx/dynamic.log 2>&1 || true
    cp /tmp/tmx/dynamic_tests.log /tmp/tmx/dynamic.log /tmp/tmx/dynamic.json /tmp/tmx/dynamic.env "$OUT"/ 2>/dev/null || true
    grep -E "^(FAILED|ERROR)|Error" /tmp/tmx/dynamic_tests.log | head -5 || true
    tail -2 /tmp/tmx/dynamic_tests.log
    grep -E "Error|Traceback" /tmp/tmx/dynamic.log | tail -3 || true
    grep -E "^(sweep|config:)" /tmp/tmx/dynamic.log || true
    grep -E "^\|" /tmp/tmx/dynamic.log || tail -5 /tmp/tmx/dynamic.log
    ;;
  *) echo "usage: $0 check | ttft dense|trianglemix | dynamic" >&2; exit 2 ;;
esac
