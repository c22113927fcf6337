"""Where one long prefill's GPU time goes (GPU): every kernel's total time and the GPU's idle gaps.

One engine (dummy weights from a model folder's config.json, `bench ttft --fast-start`'s settings)
runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so that torch's profiler sees its
kernels); a prompt of ``--length`` random tokens is prefilled twice untimed, then once under the
profiler. Printed and written as JSON: the wall time, the kernels' total, the kernels by total
time, and the gaps between kernels (the GPU idle while the host prepares work)::

    python benchmarks/profile_prefill.py --backend dynamic@0.1 --length 128000 --out profile.json
    python benchmarks/profile_prefill.py --backend dense --length 128000 --out profile-dense.json

``--backend``: ``dense`` (vLLM's default attention), ``trianglemix`` (the model's bundled map) or
``dynamic@D`` (its ``-dynamic`` map at a fixed density D), as in ``bench ttft``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import types


def _kernels(trace_path: str) -> list[dict]:
    with open(trace_path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                  key=lambda e: e["ts"])


def _gaps(kernels: list[dict], min_us: float = 20.0) -> dict:
    """GPU idle time between kernels (gaps over ``min_us``), by (kernel before, kernel after)."""
    by_pair = collections.defaultdict(lambda: [0.0, 0])
    idle, end, prev = 0.0, kernels[0]["ts"] + kernels[0]["dur"], kernels[0]["name"]
    for e in kernels[1:]:
        gap = e["ts"] - end
        if gap > min_us:
            pair = by_pair[(prev[:60], e["name"][:60])]
            pair[0] += gap
            pair[1] += 1
            idle += gap
        if e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e["name"]
    top = sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:20]
    return dict(idle_ms=idle / 1e3, span_ms=(end - kernels[0]["ts"]) / 1e3, events=len(kernels),
                largest=[dict(before=a, after=b, ms=g / 1e3, count=n) for (a, b), (g, n) in top])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="benchmarks/models/llama-3-8b-instruct-262k")
    ap.add_argument("--backend", default="dynamic@0.1", help="dense, trianglemix or dynamic@D")
    ap.add_argument("--length", type=int, default=128000, help="prompt tokens")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    args = ap.parse_args(argv)

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_trianglemix.tools import bench_ttft

    kind = bench_ttft._backend_kind(args.backend)
    attention_backend, extra = bench_ttft.engine_backend(kind, "auto")
    if kind in ("dynamic", "dynamic-only"):
        map_args = types.SimpleNamespace(dynamic_map=None, model=args.model)
        extra.setdefault("additional_config", {})["trianglemix_config"] = bench_ttft._dynamic_map_file(
            map_args, args.backend)
    llm = LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True,
              max_model_len=args.length + 1024, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=0.9, attention_backend=attention_backend, seed=0, **extra,
              **bench_ttft.FAST_START)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0, detokenize=False)

    def prefill(n: int) -> float:
        prompt = TokensPrompt(prompt_token_ids=rng.integers(1000, 100000, size=n).tolist())
        t = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - t

    prefill(2048)
    untimed = [prefill(args.length) for _ in range(2)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = prefill(args.length)
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        kernels = _kernels(trace)
    totals = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        totals[e["name"]][0] += e["dur"] / 1e3
        totals[e["name"]][1] += 1
    by_kernel = [dict(kernel=k, ms=ms, count=n) for k, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    import vllm

    report = dict(gpu=torch.cuda.get_device_name(), vllm=vllm.__version__, torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), model=args.model, backend=args.backend, length=args.length,
                  command="python benchmarks/profile_prefill.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  untimed_s=untimed, profiled_wall_s=wall, kernels_ms=sum(r["ms"] for r in by_kernel),
                  gaps=_gaps(kernels), kernels=by_kernel[:40])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    w = sys.stdout.write
    w(f"{args.backend} at {args.length}: wall {wall * 1e3:.0f} ms under the profiler (untimed runs "
      f"{', '.join(f'{u * 1e3:.0f}' for u in untimed)} ms); kernels {report['kernels_ms']:.0f} ms; GPU idle "
      f"{report['gaps']['idle_ms']:.1f} ms between kernels over {report['gaps']['span_ms']:.0f} ms\n")
    for r in by_kernel[:25]:
        w(f"  {r['ms']:9.1f} ms  x{r['count']:<6d} {r['kernel'][:100]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
