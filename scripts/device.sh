#!/usr/bin/env bash
# One step of a GPU session, run on the device machine from the repository root.
# vLLM 0.26.0 must be staged into /tmp/site first (../shared/device/stage-vllm prints the calls).
#
#   bash scripts/device.sh check     install the plugin, GPU tests, kernel benchmark (+ best config)
#   bash scripts/device.sh ttft dense|trianglemix   one engine of the TTFT/ITL benchmark
#   bash scripts/device.sh hybrid-check               install the plugin, GPU hybrid tests (tiny Qwen3-Next)
#   bash scripts/device.sh hybrid-ttft dense|trianglemix   TTFT 32K-256K + decode ITL, Qwen3.5-4B shape
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
  hybrid-check)
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/site . \
      > /tmp/tmx/install.log 2>&1 || { tail -5 /tmp/tmx/install.log; exit 1; }
    python3 -m pytest -q -p no:cacheprovider tests/gpu/test_hybrid_gpu.py > /tmp/tmx/gpu_hybrid_tests.log 2>&1 || true
    python3 -c "import vllm.model_executor.models.qwen3_5" > /tmp/tmx/qwen3_5_import.log 2>&1 \
      && echo "Qwen3.5 class: importable" || { echo "Qwen3.5 class: not importable"; tail -1 /tmp/tmx/qwen3_5_import.log; }
    cp /tmp/tmx/gpu_hybrid_tests.log /tmp/tmx/qwen3_5_import.log "$OUT"/
    grep -E "^E .*(L=|step)" /tmp/tmx/gpu_hybrid_tests.log | head -5 || true
    tail -3 /tmp/tmx/gpu_hybrid_tests.log
    ;;
  hybrid-ttft)
    # Qwen3.5-4B as published (multimodal class, language model only) where vLLM can import its
    # Qwen3.5 module (needs torchvision), else the same text shapes on the Qwen3-Next class.
    # Eager mode for both engines (same settings) to stay within about 2.5 minutes per engine.
    [ -f /tmp/tmx/kernel.env ] && source /tmp/tmx/kernel.env
    if python3 -c "import vllm.model_executor.models.qwen3_5" 2>/dev/null; then
      model=(--model benchmarks/models/qwen3.5-4b --language-model-only)
    else
      model=(--model benchmarks/models/qwen3.5-4b-text)
    fi
    python3 -m vllm_trianglemix bench ttft "${model[@]}" --trianglemix-config configs/qwen3.5-4b-9b.yaml \
      --lengths 32000 64000 128000 256000 --max-model-len 262144 --repeats 1 --enforce-eager \
      --backends "$2" --append --out /tmp/tmx/hybrid_ttft.json > "/tmp/tmx/hybrid_ttft_$2.log" 2>&1 || true
    cp /tmp/tmx/hybrid_ttft.json "/tmp/tmx/hybrid_ttft_$2.log" "$OUT"/ 2>/dev/null || true
    grep -E "Error|Traceback" "/tmp/tmx/hybrid_ttft_$2.log" | tail -3 || true
    tail -10 "/tmp/tmx/hybrid_ttft_$2.log"
    ;;
  *) echo "usage: $0 check | ttft dense|trianglemix | hybrid-check | hybrid-ttft dense|trianglemix" >&2; exit 2 ;;
esac
