"""bench report: a BENCHMARKS.md-style report from the JSON of ``bench kernel`` and ``bench ttft``.

It writes ``--out`` (required) and overwrites only a file it wrote itself (its
first line is :data:`MARKER`); any other existing file needs ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os

KERNEL_TARGETS = {32000: 13.0, 64000: 23.0, 128000: 60.0}
TTFT_TARGETS = {32000: -16.0, 64000: -25.0, 128000: -32.0}
ITL_TARGET_PCT = 2.0
MARKER = "<!-- written by `vllm-trianglemix bench report`; it overwrites this file -->"
"""The first line of every report: the files ``--out`` may overwrite without ``--force``."""


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--kernel", required=True, help="JSON from `bench kernel`")
    ap.add_argument("--ttft", required=True, help="JSON from `bench ttft` (dense and trianglemix)")
    ap.add_argument("--out", required=True,
                    help="the markdown file to write (an existing one only if this command wrote "
                         "it, or with --force)")
    ap.add_argument("--force", action="store_true",
                    help="overwrite --out even if this command did not write it")
    ap.add_argument("--hybrid-ttft", default=None,
                    help="JSON from `bench ttft` on a hybrid shape (scripts/gpu.sh hybrid-ttft)")
    ap.add_argument("--notes", default=None, help="a markdown file appended at the end")
    ap.add_argument("--breadth", default=None,
                    help="JSON from `bench ttft --kv-cache-dtype fp8` / `--stock-backend FLASHINFER` "
                         "(scripts/gpu.sh breadth-bench): a section per set-up")


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def kernel_section(k: dict) -> list[str]:
    configs = [v for r in k["rows"] for v in r["configs"].values()]
    if any("kernel_ms" in v for v in configs):  # results since the last rows went to FA3
        what = ["TriangleMix: n_init 8, n_local 512, n_last 128: our kernel on the rows below the dense start,",
                "FA3 on the last 128 rows."]
    else:  # earlier results: every row in our kernel
        what = ["TriangleMix: n_init 8, n_local 512, n_last 128, one launch (+ a merge launch for split dense rows)."]
    lines = [
        "## 1. Kernel: one triangle layer vs dense FlashAttention 3",
        "",
        f"{k['gpu']}, vLLM {k['vllm']}, Triton {k['triton']}, torch {k['torch']}, {k['date']}.",
        "Llama-3.1-8B shape (32 q heads, 8 kv heads, head dim 128, bf16), one sequence prefilled whole,",
        "K/V in vLLM's FlashAttention paged cache (block 16); median of `triton.testing.do_bench`.",
        *what,
        "Stock pieces: FA3 with a 512-key window over every row + FA3 for the last 128 rows (no sinks).",
        "",
        f"Command: `{k['command']}`",
        "",
        "| length | FA3 dense ms | FA3 pieces ms | TriangleMix ms | vs dense | target | vs pieces | kernel config |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in k["rows"]:
        speed = r["fa3_dense_ms"] / r["trianglemix_ms"]
        target = KERNEL_TARGETS.get(r["length"])
        lines.append(
            f"| {r['length']} | {r['fa3_dense_ms']:.3f} | {r['stock_pieces_ms']:.3f} | {r['trianglemix_ms']:.3f} | "
            f"{speed:.1f}x | {f'>= {target:.0f}x: ' + _met(speed >= target) if target else '-'} | "
            f"{r['stock_pieces_ms'] / r['trianglemix_ms']:.2f}x | `{r['best_config']}` |"
        )
    lines += ["", "All configurations swept in that run (ms; plan = host time to build the work list):", ""]
    checked = "kernel rows" if any("kernel_rows_rel_err" in v for v in configs) else "dense rows"
    lines += [f"| length | config | ms | plan ms | {checked} vs FA3 (rel. err) |", "|---|---|---|---|---|"]
    for r in k["rows"]:
        for c, v in r["configs"].items():
            err = v.get("kernel_rows_rel_err", v.get("dense_rows_rel_err"))  # the key of earlier results
            lines.append(f"| {r['length']} | `{c}` | {v['ms']:.3f} | {v['plan_ms']:.2f} | {err:.1e} |")
    return lines


def ttft_section(t: dict) -> list[str]:
    res = t["results"]
    d, m = res["dense"], res["trianglemix"]
    lines = [
        "## 2. End to end: time to first token, dense vs TriangleMix",
        "",
        f"{t['gpu']}, vLLM {t.get('vllm', '?')}, {t['date']}. Llama-3.1-8B config, random weights "
        "(`load_format=\"dummy\"`), one request per run, `max_tokens=1`, "
        f"max_num_batched_tokens {t['max_num_batched_tokens']}, torch.compile and CUDA graphs on, "
        "prefix caching on with a fresh prompt per run; one warm-up then the median of the runs. "
        "TriangleMix: bundled map (layers 16-31, n_init 8, n_local 512, n_last 128); "
        f"kernel config `{t.get('kernel_config', 'default')}`.",
        "",
        f"Commands: `{d.get('command', t.get('command'))}` / `{m.get('command', t.get('command'))}`",
        "",
        "| prompt tokens | dense TTFT s | TriangleMix TTFT s | change | target | runs (dense / TriangleMix) |",
        "|---|---|---|---|---|---|",
    ]
    for n, dv in d["ttft_s"].items():
        mv = m["ttft_s"][n]
        pct = 100 * (mv - dv) / dv
        target = TTFT_TARGETS.get(int(n))
        runs = f"{', '.join(f'{x:.3f}' for x in d['ttft_runs_s'][n])} / {', '.join(f'{x:.3f}' for x in m['ttft_runs_s'][n])}"
        lines.append(f"| {n} | {dv:.3f} | {mv:.3f} | {pct:+.1f}% | "
                     f"{f'<= {target:.0f}%: ' + _met(pct <= target) if target else '-'} | {runs} |")
    lines += [
        "",
        "## 3. Decode: inter-token latency",
        "",
        f"One request, {t['itl_context']}-token prompt, {t['itl_tokens']} generated tokens, "
        "(last token time - first token time) / (tokens - 1) from vLLM's request metrics; median.",
        "",
        "| | dense ms | TriangleMix ms | change | target | runs (dense / TriangleMix) |",
        "|---|---|---|---|---|---|",
    ]
    pct = 100 * (m["itl_ms"] - d["itl_ms"]) / d["itl_ms"]
    runs = f"{', '.join(f'{x:.3f}' for x in d['itl_runs_ms'])} / {', '.join(f'{x:.3f}' for x in m['itl_runs_ms'])}"
    lines.append(f"| ITL | {d['itl_ms']:.3f} | {m['itl_ms']:.3f} | {pct:+.2f}% | "
                 f"within ±{ITL_TARGET_PCT:.0f}%: {_met(abs(pct) <= ITL_TARGET_PCT)} | {runs} |")
    lines += ["", f"Engine start (s): dense {d['engine_start_s']:.0f}, TriangleMix {m['engine_start_s']:.0f}."]
    return lines


def hybrid_section(t: dict) -> list[str]:
    """TTFT and decode ITL on a hybrid shape (Qwen3.5-4B), dense vs TriangleMix."""
    res = t["results"]
    d, m = res["dense"], res["trianglemix"]
    lines = [
        "## 4. Hybrid model: Qwen3.5-4B shape, time to first token and decode",
        "",
        f"{t['gpu']}, vLLM {t.get('vllm', '?')}, {t['date']}. Model `{t.get('model', '?')}` "
        "(32 layers: 24 Gated DeltaNet, 8 full attention; random weights), eager mode for both "
        f"engines, max_num_batched_tokens {t['max_num_batched_tokens']}, prefix caching on with a "
        "fresh prompt per run; one warm-up then the median of the runs. TriangleMix: "
        "`configs/qwen3.5-4b-9b.yaml` (full-attention layers 19, 23, 27, 31; n_init 8, n_local 512, "
        "n_last 128; an uncalibrated starting point); the 24 linear-attention layers and the "
        "other 4 full-attention layers run stock in both engines.",
        "",
        f"Commands: `{d.get('command', t.get('command'))}` / `{m.get('command', t.get('command'))}`",
        "",
        "| prompt tokens | dense TTFT s | TriangleMix TTFT s | change | runs (dense / TriangleMix) |",
        "|---|---|---|---|---|",
    ]
    for n, dv in d["ttft_s"].items():
        mv = m["ttft_s"].get(n)
        if mv is None:
            continue
        runs = (f"{', '.join(f'{x:.3f}' for x in d['ttft_runs_s'][n])} / "
                f"{', '.join(f'{x:.3f}' for x in m['ttft_runs_s'][n])}")
        lines.append(f"| {n} | {dv:.3f} | {mv:.3f} | {100 * (mv - dv) / dv:+.1f}% | {runs} |")
    pct = 100 * (m["itl_ms"] - d["itl_ms"]) / d["itl_ms"]
    lines += [
        "",
        f"Decode ITL ({t['itl_context']}-token prompt, {t['itl_tokens']} tokens): dense "
        f"{d['itl_ms']:.3f} ms, TriangleMix {m['itl_ms']:.3f} ms ({pct:+.2f}%). Engine start (s): "
        f"dense {d['engine_start_s']:.0f}, TriangleMix {m['engine_start_s']:.0f}.",
    ]


BREADTH_SETUPS = {
    "+fp8": "fp8 KV cache (`--kv-cache-dtype fp8`): stock FA3 fp8 vs TriangleMix on it",
    "+flashinfer": "FlashInfer as the stock backend: stock FlashInfer vs TriangleMix wrapping it "
                   "(`trianglemix_stock_backend: FLASHINFER`)",
}


def breadth_section(b: dict) -> list[str]:
    res = b["results"]
    lines = [
        "## 4. Other set-ups: fp8 KV cache, FlashInfer",
        "",
        f"{b['gpu']}, vLLM {b.get('vllm', '?')}, {b['date']}. Same model, prompts and method as "
        "sections 2-3, except: engines started with `--fast-start` (no torch.compile: prefill runs "
        "eagerly; full CUDA graphs for decode batches), one warm-up then "
        "one timed run per length, ITL over "
        f"{b['itl_tokens']} tokens at {b['itl_context']}. Compare rows within a set-up (the "
        "absolute numbers are not those of section 2, which compiles).",
        "",
    ]
    for sfx, title in BREADTH_SETUPS.items():
        d, m = res.get("dense" + sfx), res.get("trianglemix" + sfx)
        if d is None or m is None:
            continue
        lines += [f"### {title}", "", f"Command: `{m.get('command', b.get('command'))}`", "",
                  "| prompt tokens | stock TTFT s | TriangleMix TTFT s | change |", "|---|---|---|---|"]
        for n, dv in d["ttft_s"].items():
            mv = m["ttft_s"][n]
            lines.append(f"| {n} | {dv:.3f} | {mv:.3f} | {100 * (mv - dv) / dv:+.1f}% |")
        pct = 100 * (m["itl_ms"] - d["itl_ms"]) / d["itl_ms"]
        lines += ["", "| decode ITL | stock ms | TriangleMix ms | change |", "|---|---|---|---|",
                  f"| {b['itl_context']} tokens | {d['itl_ms']:.3f} | {m['itl_ms']:.3f} | {pct:+.2f}% |", ""]
        start = (f"Engine start (s): stock {d['engine_start_s']:.0f}, TriangleMix {m['engine_start_s']:.0f}; "
                 f"first request (2048 tokens, untimed, kernels compiled on first use): stock "
                 f"{d['first_request_s']:.1f} s, TriangleMix {m['first_request_s']:.1f} s.")
        if d.get("flashinfer_jit_new_files") is not None:
            jit_s = (d["engine_start_s"] + d["first_request_s"]) - (m["engine_start_s"] + m["first_request_s"])
            start += (f" FlashInfer JIT: {d['flashinfer_jit_new_files']} new modules compiled during the "
                      f"stock engine's start and first request, {m.get('flashinfer_jit_new_files')} "
                      "during the TriangleMix engine's after it (on-disk JIT cache); the JIT time, "
                      f"estimated as the difference of their start + first request, is {jit_s:.0f} s. "
                      "None of it is in the timings.")
        lines += [start, ""]
    return lines


def written_by_report(path: str) -> bool:
    with open(path, errors="replace") as f:
        return f.readline().rstrip("\n") == MARKER


def refuse_to_overwrite(path: str, force: bool) -> None:
    """ToolError if ``path`` exists, was not written by this command, and ``force`` is off."""
    from vllm_trianglemix.tools.errors import ToolError

    if os.path.exists(path) and not force and not written_by_report(path):
        raise ToolError(f"--out: {path} exists and was not written by `bench report`; give a new "
                        "file, or add --force to replace it")


def run(args) -> int:
    from vllm_trianglemix.tools.errors import existing_file, writable_file

    for flag in ("kernel", "ttft", "hybrid_ttft", "breadth", "notes"):
        if getattr(args, flag):
            existing_file(getattr(args, flag), f"--{flag.replace('_', '-')}")
    writable_file(args.out, "--out")
    refuse_to_overwrite(args.out, args.force)
    with open(args.kernel) as f:
        kernel = json.load(f)
    with open(args.ttft) as f:
        ttft = json.load(f)
    lines = [MARKER, "# Benchmarks", "",
             "Written by `vllm-trianglemix bench report` from one set of runs; the commands, date and GPU",
             "are those of the runs. Regenerate them with the commands shown.", ""]
    lines += kernel_section(kernel) + [""] + ttft_section(ttft)
    if args.hybrid_ttft:
        with open(args.hybrid_ttft) as f:
            lines += [""] + hybrid_section(json.load(f))
    if args.breadth:
        with open(args.breadth) as f:
            lines += [""] + breadth_section(json.load(f))
    if args.notes:
        with open(args.notes) as f:
            lines += ["", f.read().rstrip()]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0
