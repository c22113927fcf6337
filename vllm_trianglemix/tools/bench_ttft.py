"""bench ttft: TTFT and decode inter-token latency, dense vs TriangleMix (end to end).

Each backend runs in its own engine (a subprocess, so GPU memory is freed in
between) with the same settings: the model's config.json with random weights
(``load_format="dummy"``), ``max_num_batched_tokens`` 16384, torch.compile and
CUDA graphs on (vLLM defaults), prefix caching on (default) with a fresh
random prompt for every run so nothing is reused.

* TTFT: ``generate(max_tokens=1)`` wall time for one request, one warm-up then
  the median of ``--repeats`` runs per length;
* ITL: one request at ``--itl-context`` tokens generating ``--itl-tokens``
  tokens; (last token time - first token time) / (tokens - 1) from vLLM's
  request metrics, median of ``--repeats``.

    vllm-trianglemix bench ttft --model benchmarks/models/llama-3.1-8b-instruct --out ttft.json

``--append`` merges into an existing JSON (when the two engines are run in
separate invocations).

Other set-ups (same settings for both engines): ``--kv-cache-dtype fp8`` (stock
FA3 fp8 vs TriangleMix on it) and ``--stock-backend FLASHINFER`` (stock
FlashInfer vs TriangleMix wrapping it); their results are stored as
``dense-fp8`` / ``trianglemix-fp8``, ``dense-flashinfer`` / ... and tabled
side by side. Each engine also records ``first_request_s``: one short request
(2048 tokens, 4 generated) right after start, before any timed run. Kernels
compiled on first use (FlashInfer's JIT, Triton) land there or in the engine
start, never in the timings; with FlashInfer the JIT cache's new modules are
counted (``flashinfer_jit_new_files``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from vllm_trianglemix.tools.bench import command_line

BACKENDS = {"dense": None, "trianglemix": "TRIANGLEMIX"}
FAST_START = dict(
    # No torch.compile (prefill runs eagerly), full CUDA graphs for decode batches of up
    # to 8 requests: an engine starts in well under a minute and decode keeps its graphs.
    compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                        "cudagraph_capture_sizes": [1, 2, 4, 8]},
    max_num_seqs=8,
)


def _worker(args) -> dict:
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(0)
    max_len = max(args.lengths + [args.itl_context + args.itl_tokens]) + 16
    backend, extra = engine_backend(args.worker, args.stock_backend)
    jit_files = _flashinfer_jit_files() if args.stock_backend == "FLASHINFER" else None
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=min(max_len, args.max_model_len),
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=backend,
        kv_cache_dtype=args.kv_cache_dtype,
        disable_log_stats=False,
        enforce_eager=args.enforce_eager,
        seed=0,
        **extra,
        **(FAST_START if args.fast_start else {}),
    )
    start_s = time.perf_counter() - t0

    def prompt(n):
        return TokensPrompt(prompt_token_ids=rng.integers(1000, 100000, size=n).tolist())

    def run(n, max_tokens):
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0, detokenize=False)
        t = time.perf_counter()
        out = llm.generate([prompt(n)], sp, use_tqdm=False)[0]
        return time.perf_counter() - t, out

    first_request_s = run(2048, 4)[0]  # kernels compiled on first use land here, untimed
    new_jit_files = None if jit_files is None else len(_flashinfer_jit_files() - jit_files)
    ttft = {}
    for n in args.lengths:
        run(n, 1)  # warm-up at this length
        ttft[n] = [run(n, 1)[0] for _ in range(args.repeats)]
    itl = []
    for _ in range(args.repeats + 1):
        _, out = run(args.itl_context, args.itl_tokens)
        m = out.metrics
        itl.append((m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1))
    itl = itl[1:]  # the first is a warm-up
    return dict(
        backend=args.worker,
        kv_cache_dtype=args.kv_cache_dtype,
        stock_backend=args.stock_backend,
        fast_start=args.fast_start,
        engine_start_s=start_s,
        first_request_s=first_request_s,
        flashinfer_jit_new_files=new_jit_files,
        ttft_s={str(n): statistics.median(v) for n, v in ttft.items()},
        ttft_runs_s={str(n): v for n, v in ttft.items()},
        itl_ms=statistics.median(itl) * 1e3,
        itl_runs_ms=[x * 1e3 for x in itl],
    )


def engine_backend(worker: str, stock_backend: str):
    """(attention_backend, extra LLM kwargs) for one engine of the benchmark."""
    if worker == "dense":
        return (None if stock_backend == "auto" else stock_backend), {}
    extra = {}
    if stock_backend != "auto":
        from vllm_trianglemix.stock_backend import STOCK_BACKEND_KEY

        extra["additional_config"] = {STOCK_BACKEND_KEY: stock_backend}
    return BACKENDS[worker], extra


def variant(kv_cache_dtype: str, stock_backend: str) -> str:
    """'' for the default set-up, else e.g. '-fp8', '-flashinfer', '-fp8-flashinfer'."""
    parts = ([kv_cache_dtype] if kv_cache_dtype != "auto" else []) + (
        [stock_backend.lower()] if stock_backend != "auto" else [])
    return "".join(f"-{p}" for p in parts)


def _flashinfer_jit_files() -> set[str]:
    try:
        from flashinfer.jit.env import FLASHINFER_CACHE_DIR
    except ImportError:
        return set()
    return {str(p) for p in FLASHINFER_CACHE_DIR.rglob("*.so")}


def _table(report: dict) -> str:
    res = report["results"]
    suffixes = sorted({k[len("dense"):] for k in res if k.startswith("dense")
                       and "trianglemix" + k[len("dense"):] in res})
    lines = ["| set-up | prompt tokens | dense TTFT s | TriangleMix TTFT s | change |",
             "|---|---|---|---|---|"]
    for sfx in suffixes:
        dense, tri = res["dense" + sfx], res["trianglemix" + sfx]
        for n in dense["ttft_s"]:
            d, t = dense["ttft_s"][n], tri["ttft_s"].get(n)
            if t is not None:
                lines.append(f"| {sfx[1:] or 'default'} | {n} | {d:.3f} | {t:.3f} | {100 * (t - d) / d:+.1f}% |")
    lines += ["", "| set-up | decode ITL at {} tokens | dense ms | TriangleMix ms | change | first request s (dense / TriangleMix) |".format(report["itl_context"]),
              "|---|---|---|---|---|---|"]
    for sfx in suffixes:
        dense, tri = res["dense" + sfx], res["trianglemix" + sfx]
        d, t = dense["itl_ms"], tri["itl_ms"]
        first = "{:.1f} / {:.1f}".format(dense.get("first_request_s", float("nan")),
                                         tri.get("first_request_s", float("nan")))
        lines.append(f"| {sfx[1:] or 'default'} | {report['itl_tokens']} tokens | {d:.3f} | {t:.3f} | "
                     f"{100 * (t - d) / d:+.2f}% | {first} |")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True,
                    help="a model folder (config.json is enough: weights are random)")
    ap.add_argument("--backends", default="dense,trianglemix")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32000, 64000, 128000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--itl-context", type=int, default=32000)
    ap.add_argument("--itl-tokens", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=131072)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--fast-start", action="store_true",
                    help="no torch.compile, full CUDA graphs for decode only (both engines)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="e.g. fp8 (both engines)")
    ap.add_argument("--stock-backend", default="auto", choices=["auto", "FLASH_ATTN", "FLASHINFER"],
                    help="the stock backend of the dense engine and the one TriangleMix wraps")
    ap.add_argument("--out", default="ttft.json")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--worker", choices=list(BACKENDS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)


def run(args) -> int:

    if args.worker:
        result = _worker(args)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return 0

    report = {"results": {}}
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            report = json.load(f)
    for backend in args.backends.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            path = tmp.name
        cmd = [sys.executable, "-m", "vllm_trianglemix", "bench", "ttft",
               "--worker", backend, "--worker-out", path]
        for flag in ("model", "repeats", "itl_context", "itl_tokens", "max_num_batched_tokens",
                     "max_model_len", "gpu_memory_utilization", "kv_cache_dtype", "stock_backend"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--lengths", *map(str, args.lengths)]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        if args.fast_start:
            cmd.append("--fast-start")
        subprocess.run(cmd, check=True)
        with open(path) as f:
            key = backend + variant(args.kv_cache_dtype, args.stock_backend)
            report["results"][key] = {**json.load(f), "command": command_line()}
    import torch

    report.update(
        date=time.strftime("%Y-%m-%d"),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        command=command_line(),
        itl_context=args.itl_context,
        itl_tokens=args.itl_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
        fast_start=args.fast_start,
        kernel_config=os.environ.get("VLLM_TRIANGLEMIX_KERNEL_CONFIG", "default"),
    )
    try:
        import vllm

        report["vllm"] = vllm.__version__
    except ImportError:
        pass
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    sys.stdout.write("\n" + _table(report) + "\n")
    return 0

