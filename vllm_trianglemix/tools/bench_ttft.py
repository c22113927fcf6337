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


def _worker(args) -> dict:
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(0)
    max_len = max(args.lengths + [args.itl_context + args.itl_tokens]) + 16
    extra = {}
    if args.language_model_only:
        extra["language_model_only"] = True
    if args.worker == "trianglemix" and args.trianglemix_config:
        extra["additional_config"] = {"trianglemix_config": args.trianglemix_config}
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=min(max_len, args.max_model_len),
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=BACKENDS[args.worker],
        disable_log_stats=False,
        enforce_eager=args.enforce_eager,
        seed=0,
        **extra,
    )
    start_s = time.perf_counter() - t0

    def prompt(n):
        return TokensPrompt(prompt_token_ids=rng.integers(1000, 100000, size=n).tolist())

    def run(n, max_tokens):
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0, detokenize=False)
        t = time.perf_counter()
        out = llm.generate([prompt(n)], sp, use_tqdm=False)[0]
        return time.perf_counter() - t, out

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
        engine_start_s=start_s,
        ttft_s={str(n): statistics.median(v) for n, v in ttft.items()},
        ttft_runs_s={str(n): v for n, v in ttft.items()},
        itl_ms=statistics.median(itl) * 1e3,
        itl_runs_ms=[x * 1e3 for x in itl],
    )


def _table(report: dict) -> str:
    res = report["results"]
    lines = ["| prompt tokens | dense TTFT s | TriangleMix TTFT s | change |", "|---|---|---|---|"]
    if "dense" in res and "trianglemix" in res:
        for n in res["dense"]["ttft_s"]:
            d, t = res["dense"]["ttft_s"][n], res["trianglemix"]["ttft_s"].get(n)
            if t is not None:
                lines.append(f"| {n} | {d:.3f} | {t:.3f} | {100 * (t - d) / d:+.1f}% |")
        d, t = res["dense"]["itl_ms"], res["trianglemix"]["itl_ms"]
        lines.append("")
        lines.append("| decode ITL at {} tokens | dense ms | TriangleMix ms | change |".format(report["itl_context"]))
        lines.append("|---|---|---|---|")
        lines.append(f"| {report['itl_tokens']} tokens | {d:.3f} | {t:.3f} | {100 * (t - d) / d:+.2f}% |")
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
    ap.add_argument("--trianglemix-config", default=None,
                    help="layer map for the TriangleMix engine (default: the bundled map)")
    ap.add_argument("--language-model-only", action="store_true",
                    help="serve a multimodal model's language model only (e.g. Qwen3.5)")
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
                     "max_model_len", "gpu_memory_utilization"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--lengths", *map(str, args.lengths)]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        if args.language_model_only:
            cmd.append("--language-model-only")
        if args.trianglemix_config:
            cmd += ["--trianglemix-config", args.trianglemix_config]
        subprocess.run(cmd, check=True)
        with open(path) as f:
            report["results"][backend] = {**json.load(f), "command": command_line()}
    import torch

    report.update(
        date=time.strftime("%Y-%m-%d"),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        command=command_line(),
        itl_context=args.itl_context,
        itl_tokens=args.itl_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kernel_config=os.environ.get("VLLM_TRIANGLEMIX_KERNEL_CONFIG", "default"),
        model=args.model,
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

