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

Backends: ``dense`` (the stock backend), ``trianglemix`` (the bundled map),
``dynamic`` (TriangleMix + XAttention: the bundled ``<model>-dynamic`` map or
``--dynamic-map``), and ``dynamic@D``: the same map with a fixed budget, every
dynamic layer keeping a fraction ``D`` of the causal key blocks (threshold 1,
``max_density D``). ``dynamic-only`` / ``dynamic-only@D``: the same map
without triangle layers, XAttention in every layer the ``dynamic`` map covers
(its triangle and its dynamic layers), the dynamic-only baseline the
TriangleMix paper compares with. Random weights give diffuse attention, on which a
threshold keeps nearly every block; a fixed density measures the cost at the
density a real model reaches.

Engine-wide options that are not vLLM's defaults label the results
``BACKEND+LABEL`` (e.g. ``--distributed-executor-backend ray`` gives
``trianglemix+ray``); each label gets its own table against ``dense+LABEL``,
and a last table compares one backend's runs under different labels:

    vllm-trianglemix bench ttft --model ... --backends trianglemix --lengths 32000 64000 \
        --distributed-executor-backend mp --append --out ttft_executors.json
    (the same with ray)

Other set-ups (same settings for both engines): ``--kv-cache-dtype fp8`` (stock
FA3 fp8 vs TriangleMix on it) and ``--stock-backend FLASHINFER`` (stock
FlashInfer vs TriangleMix wrapping it); their results are labelled
``dense+fp8`` / ``trianglemix+fp8``, ``dense+flashinfer`` / ... and tabled
side by side. Each engine also records ``first_request_s``: one short request
(2048 tokens, 4 generated) right after start, before any timed run. Kernels
compiled on first use (FlashInfer's JIT, Triton) land there or in the engine
start, never in the timings; with FlashInfer the JIT cache's new modules are
counted (``flashinfer_jit_new_files``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

from vllm_trianglemix import settings
from vllm_trianglemix.tools.bench import command_line

BACKENDS = {"dense": None, "trianglemix": "TRIANGLEMIX", "dynamic": "TRIANGLEMIX",
            "dynamic-only": "TRIANGLEMIX"}
KNOWN = "dense, trianglemix, dynamic, dynamic@D, dynamic-only, dynamic-only@D"


def _backend_kind(name: str) -> str:
    kind = name.split("@", 1)[0]
    if kind not in BACKENDS:
        from vllm_trianglemix.tools.errors import ToolError

        raise ToolError(f"--backends: unknown backend '{name}' (known: {KNOWN})")
    if "@" in name:
        try:
            density = float(name.split("@", 1)[1])
        except ValueError:
            density = -1.0
        if not 0.0 < density <= 1.0:
            from vllm_trianglemix.tools.errors import ToolError

            raise ToolError(f"--backends: '{name}': D of {kind}@D is a density in (0, 1]")
    return kind


def dynamic_map_data(ref: str, model: str, name: str) -> dict:
    """The map of a ``dynamic[-only][@D]`` engine: the map ``ref``; ``-only``: its
    triangle and dynamic layers all dynamic; ``@D``: a fixed density D."""
    from vllm_trianglemix.config import format_layer_ranges, resolve_layer_map

    layer_map = resolve_layer_map({"trianglemix_config": ref}, model)
    data = dict(layer_map.raw)
    if _backend_kind(name) == "dynamic-only":
        for key in ("triangle_layers", "layer_overrides"):
            data.pop(key, None)
        data["dynamic_layers"] = format_layer_ranges(sorted({*layer_map.layers, *layer_map.dynamic_layers}))
    if "@" in name:
        density = float(name.split("@", 1)[1])
        data["dynamic"] = {**(data.get("dynamic") or {}), "threshold": 1.0, "max_density": density}
    return data


def _dynamic_map_file(args, name: str) -> str:
    """The layer map of a ``dynamic[-only][@D]`` engine, written to a temp file."""
    import yaml

    ref = args.dynamic_map or os.path.basename(args.model.rstrip("/")).lower() + "-dynamic"
    data = dynamic_map_data(ref, args.model, name)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f)
    return f.name


FAST_START = dict(
    # No torch.compile (prefill runs eagerly), full CUDA graphs for decode batches of up
    # to 8 requests: an engine starts in well under a minute and decode keeps its graphs.
    compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                        "cudagraph_capture_sizes": [1, 2, 4, 8]},
    max_num_seqs=8,
)


WARMUP_LOGGER = "vllm.renderers.base"
WARMUP_WARNING = "Chat template warmup failed"


class DropTokenizerlessWarmupWarning(logging.Filter):
    """vLLM's ``LLM()`` warms its chat template up, which needs the tokenizer these
    engines skip (``skip_tokenizer_init``: prompts are token ids, and the benchmark
    models are config.json only); it then logs a WARNING with a traceback ("Tokenizer
    not available when `skip_tokenizer_init=True`") that says nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != WARMUP_WARNING


def _worker(args) -> dict:
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(0)
    max_len = max(args.lengths + [args.itl_context + args.itl_tokens]) + 16
    kind = _backend_kind(args.worker)
    attention_backend, extra = engine_backend(kind, args.stock_backend)
    if kind in ("dynamic", "dynamic-only"):
        extra.setdefault("additional_config", {})["trianglemix_config"] = _dynamic_map_file(args, args.worker)
    if args.language_model_only:
        extra["language_model_only"] = True
    if args.gdn_prefill_backend:  # vLLM's own key (hybrids' Gated DeltaNet prefill kernel)
        extra.setdefault("additional_config", {})["gdn_prefill_backend"] = args.gdn_prefill_backend
    if kind == "trianglemix" and args.trianglemix_config:
        extra.setdefault("additional_config", {})["trianglemix_config"] = args.trianglemix_config
    jit_files = _flashinfer_jit_files() if args.stock_backend == "FLASHINFER" else None
    logging.getLogger(WARMUP_LOGGER).addFilter(DropTokenizerlessWarmupWarning())
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=min(max_len, args.max_model_len),
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=attention_backend,
        kv_cache_dtype=args.kv_cache_dtype,
        disable_log_stats=False,
        enforce_eager=args.enforce_eager,
        distributed_executor_backend=args.distributed_executor_backend,
        tensor_parallel_size=args.tensor_parallel_size,
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
        executor=llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend,
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


def _flashinfer_jit_files() -> set[str]:
    try:
        from flashinfer.jit.env import FLASHINFER_CACHE_DIR
    except ImportError:
        return set()
    return {str(p) for p in FLASHINFER_CACHE_DIR.rglob("*.so")}


def _labels(args) -> list[str]:
    """Engine-wide options that differ from vLLM's defaults, as result labels."""
    labels = [args.distributed_executor_backend] if args.distributed_executor_backend else []
    if args.kv_cache_dtype != "auto":
        labels.append(args.kv_cache_dtype)
    if args.stock_backend != "auto":
        labels.append(args.stock_backend.lower())
    if args.tensor_parallel_size > 1:
        labels.append(f"tp{args.tensor_parallel_size}")
    return labels


def _key(backend: str, labels: list[str]) -> str:
    return "+".join([backend, *labels])


def _split(key: str) -> tuple[str, str]:
    backend, _, label = key.partition("+")
    return backend, label


def _tables(report: dict) -> str:
    """One :func:`_table` per label, then the label comparison."""
    by_label: dict[str, dict] = {}
    for key, res in report["results"].items():
        backend, label = _split(key)
        by_label.setdefault(label, {})[backend] = res
    out = [_table({**report, "results": res}, label) for label, res in by_label.items()]
    return "\n\n".join(t for t in out + [_label_table(report)] if t)


def _label_table(report: dict) -> str:
    """TTFT of each backend under the labels it was run with (e.g. mp vs ray)."""
    by_backend: dict[str, dict[str, dict]] = {}
    for key, res in report["results"].items():
        backend, label = _split(key)
        if label:
            by_backend.setdefault(backend, {})[label] = res
    lines = []
    for backend, runs in by_backend.items():
        ex = sorted(runs)
        if len(ex) < 2:
            continue
        lines += ["", f"| {backend}: prompt tokens | "
                  + " | ".join(f"{e} TTFT s" for e in ex) + " | change | runs |",
                  "|---" * (len(ex) + 3) + "|"]
        for n in runs[ex[0]]["ttft_s"]:
            vals = [runs[e]["ttft_s"].get(n) for e in ex]
            change = ("-" if len(vals) != 2 or None in vals
                      else f"{100 * (vals[1] - vals[0]) / vals[0]:+.1f}%")
            each = " / ".join(", ".join(f"{x:.3f}" for x in runs[e]["ttft_runs_s"].get(n, []))
                              for e in ex)
            lines.append(f"| {n} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
                         + f" | {change} | {each} |")
    return "\n".join(lines)


def _table(report: dict, label: str = "") -> str:
    """TTFT per length and ITL, every backend against ``dense`` (ratio = backend / dense)."""
    res = report["results"]
    if "dense" not in res:
        return ""
    others = [b for b in res if b != "dense"]
    head = f"| prompt tokens{' (' + label + ')' if label else ''} | dense TTFT s | " + " | ".join(f"{b} s (vs dense)" for b in others) + " |"
    lines = [head, "|---" * (2 + len(others)) + "|"]
    for n, d in res["dense"]["ttft_s"].items():
        cells = []
        for b in others:
            t = res[b]["ttft_s"].get(n)
            cells.append("-" if t is None else f"{t:.3f} ({100 * (t - d) / d:+.1f}%, {t / d:.2f}x)")
        lines.append(f"| {n} | {d:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"| decode ITL, {report['itl_tokens']} tokens at {report['itl_context']} | dense ms | "
              + " | ".join(f"{b} ms" for b in others) + " |", "|---" * (2 + len(others)) + "|"]
    d = res["dense"]["itl_ms"]
    lines.append(f"| median | {d:.3f} | " + " | ".join(
        f"{res[b]['itl_ms']:.3f} ({100 * (res[b]['itl_ms'] - d) / d:+.2f}%)" for b in others) + " |")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True,
                    help="a model folder (config.json is enough: weights are random)")
    ap.add_argument("--backends", default="dense,trianglemix",
                    help="comma-separated: dense, trianglemix, dynamic, dynamic@D (fixed density D), "
                         "dynamic-only, dynamic-only@D (every layer of the dynamic map dynamic)")
    ap.add_argument("--dynamic-map", default=None,
                    help="map of the dynamic engines (default: the bundled <model>-dynamic)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32000, 64000, 128000],
                    help="prompt lengths (tokens) whose TTFT is measured")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per length (the median is kept)")
    ap.add_argument("--itl-context", type=int, default=32000, help="context of the decode ITL run")
    ap.add_argument("--itl-tokens", type=int, default=128, help="tokens generated in the ITL run")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384,
                    help="vLLM's token budget per step (the prefill chunk)")
    ap.add_argument("--max-model-len", type=int, default=131072, help="vLLM's max_model_len (an upper bound)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM's option")
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile, no CUDA graphs")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="results are labelled BACKEND+tpN when > 1")
    ap.add_argument("--distributed-executor-backend", choices=["mp", "ray", "uni"],
                    help="vLLM's executor (default: vLLM's choice, uni for one GPU); "
                         "results are then labelled BACKEND+EXECUTOR")
    ap.add_argument("--trianglemix-config", default=None,
                    help="layer map for the TriangleMix engine (default: the bundled map)")
    ap.add_argument("--language-model-only", action="store_true",
                    help="serve a multimodal model's language model only (e.g. Qwen3.5)")
    ap.add_argument("--fast-start", action="store_true",
                    help="no torch.compile, full CUDA graphs for decode only (both engines)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="e.g. fp8 (both engines)")
    ap.add_argument("--stock-backend", default="auto", choices=["auto", "FLASH_ATTN", "FLASHINFER"],
                    help="the stock backend of the dense engine and the one TriangleMix wraps")
    ap.add_argument("--gdn-prefill-backend", default=None, choices=["flashinfer", "triton"],
                    help="hybrid models: vLLM's Gated DeltaNet prefill kernel (both engines; "
                         "vLLM picks FlashInfer's on Hopper, which needs nvidia-cutlass-dsl)")
    ap.add_argument("--out", default="ttft.json", help="the JSON result")
    ap.add_argument("--append", action="store_true", help="merge into an existing --out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)


def _check_inputs(args) -> None:
    """What can be checked before an engine starts: the model folder, the backends and
    their maps against the model's config.json (``check-map``'s check), --out."""
    from vllm_trianglemix.config import resolve_layer_map
    from vllm_trianglemix.tools.check_map import check_map
    from vllm_trianglemix.tools.errors import model_folder_or_hub_id, writable_file

    model = model_folder_or_hub_id(args.model)
    writable_file(args.out, "--out")
    kinds = {_backend_kind(b) for b in args.backends.split(",")}
    maps = []
    if "trianglemix" in kinds:
        maps.append(args.trianglemix_config)
    if "dynamic" in kinds:
        maps.append(args.dynamic_map or os.path.basename(args.model.rstrip("/")).lower() + "-dynamic")
    for ref in maps:
        if os.path.isdir(model):
            check_map(ref, model)
        else:  # a hub name: the map alone
            resolve_layer_map({"trianglemix_config": ref} if ref else {}, model)


def run(args) -> int:

    if args.worker:
        result = _worker(args)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return 0

    _check_inputs(args)
    report = {"results": {}}
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            report = json.load(f)
    import torch

    report.update(
        date=time.strftime("%Y-%m-%d"),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        command=command_line(),
        itl_context=args.itl_context,
        itl_tokens=args.itl_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
        fast_start=args.fast_start,
        gdn_prefill_backend=args.gdn_prefill_backend,
        kernel_config=settings.env_setting(settings.KERNEL_CONFIG) or "default",
        xattn_config=settings.env_setting(settings.XATTN_CONFIG) or "default",
        model=args.model,
    )
    try:
        import vllm

        report["vllm"] = vllm.__version__
    except ImportError:
        pass
    for backend in args.backends.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            path = tmp.name
        cmd = [sys.executable, "-m", "vllm_trianglemix", "bench", "ttft",
               "--worker", backend, "--worker-out", path]
        _backend_kind(backend)
        for flag in ("model", "repeats", "itl_context", "itl_tokens", "max_num_batched_tokens",
                     "max_model_len", "gpu_memory_utilization", "dynamic_map",
                     "tensor_parallel_size", "kv_cache_dtype", "stock_backend",
                     "gdn_prefill_backend"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--lengths", *map(str, args.lengths)]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        if args.fast_start:
            cmd.append("--fast-start")
        if args.distributed_executor_backend:
            cmd += ["--distributed-executor-backend", args.distributed_executor_backend]
        if args.language_model_only:
            cmd.append("--language-model-only")
        if args.trianglemix_config:
            cmd += ["--trianglemix-config", args.trianglemix_config]
        if subprocess.run(cmd).returncode != 0:
            from vllm_trianglemix.tools.errors import ToolError

            raise ToolError(f"the {backend} engine failed (its output is above); "
                            f"results so far are in {args.out}")
        with open(path) as f:
            key = _key(backend, _labels(args))
            report["results"][key] = {**json.load(f), "command": command_line()}
        with open(args.out, "w") as f:  # after every engine: a later failure keeps these
            json.dump(report, f, indent=1)
    sys.stdout.write("\n" + _tables(report) + "\n")
    return 0

