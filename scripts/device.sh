#!/usr/bin/env bash
# One step of a GPU session, run on the device machine from the repository root.
# vLLM 0.26.0 must be staged into /tmp/site first (../shared/device/stage-vllm prints the calls).
#
#   bash scripts/device.sh check     install the plugin, GPU tests, kernel benchmark (+ best config)
#   bash scripts/device.sh ttft dense|trianglemix   one engine of the TTFT/ITL benchmark
#   bash scripts/device.sh breadth-tests            install the plugin, fp8 + FlashInfer GPU tests
#   bash scripts/device.sh breadth-bench fp8|flashinfer
#                                                   TTFT 32K/64K/128K + decode ITL, stock vs TriangleMix,
#                                                   on an fp8 KV cache (FA3) or on FlashInfer (forced);
#                                                   --fast-start engines (no torch.compile, decode graphs)
#
# Results accumulate in /tmp/tmx (kept while the machine is warm) and are copied to $OUT.
set -euo pipefail
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tmx-out}
mkdir -p /tmp/tmx "$OUT"
install_plugin() {
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/site . \
    > /tmp/tmx/install.log 2>&1 || { tail -5 /tmp/tmx/install.log; exit 1; }
}
case "$1" in
  check)
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/site . \
      > /tmp/tmx/install.log 2>&1 || { tail -5 /tmp/tmx/install.log; exit 1; }
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv > /tmp/tmx/gpu.txt
    python3 -m pytest -q -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_breadth_gpu.py \
      > /tmp/tmx/gpu_tests.log 2>&1 || true  # breadth-tests runs that one
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
  breadth-tests)
    install_plugin
    start=$(date +%s)
    python3 -m pytest -q -s -p no:cacheprovider -k "fp8 or flashinfer" \
      tests/gpu/test_kernel_gpu.py tests/gpu/test_breadth_gpu.py > /tmp/tmx/breadth_tests.log 2>&1 || true
    cp /tmp/tmx/breadth_tests.log "$OUT"/
    echo "breadth tests: $(( $(date +%s) - start )) s"
    grep -E "^BREADTH:|FAILED|Error" /tmp/tmx/breadth_tests.log | sed 's/^.*BREADTH: /  /' | tail -12
    tail -2 /tmp/tmx/breadth_tests.log
    ;;
  breadth-bench)
    case "${2:-}" in
      fp8) setup=(--kv-cache-dtype fp8) ;;
      flashinfer) setup=(--stock-backend FLASHINFER) ;;
      *) echo "usage: $0 breadth-bench fp8|flashinfer" >&2; exit 2 ;;
    esac
    install_plugin
    [ -f /tmp/tmx/kernel.env ] && source /tmp/tmx/kernel.env
    python3 -m vllm_trianglemix bench ttft --model benchmarks/models/llama-3.1-8b-instruct \
      --backends dense,trianglemix "${setup[@]}" --fast-start --repeats 1 --itl-tokens 64 \
      --append --out /tmp/tmx/breadth_ttft.json > "/tmp/tmx/breadth_$2.log" 2>&1 || true
    cp /tmp/tmx/breadth_ttft.json "/tmp/tmx/breadth_$2.log" "$OUT"/ 2>/dev/null || true
    grep -E "Error|Traceback" "/tmp/tmx/breadth_$2.log" | tail -3 || true
    python3 - <<'PY' || true
import json
r = json.load(open("/tmp/tmx/breadth_ttft.json"))["results"]
for k, v in r.items():
    print(f"{k}: engine start {v['engine_start_s']:.0f} s, first request {v['first_request_s']:.1f} s"
          + (f", new FlashInfer JIT modules {v['flashinfer_jit_new_files']}"
             if v.get("flashinfer_jit_new_files") is not None else ""))
PY
    tail -13 "/tmp/tmx/breadth_$2.log"
    ;;
  *) echo "usage: $0 check | ttft dense|trianglemix | breadth-tests | breadth-bench fp8|flashinfer" >&2; exit 2 ;;
esac
