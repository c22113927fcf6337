"""bench kernel: one triangle layer vs dense FA3, side by side, one run (GPU).

For the Llama-3.1-8B shape (32 q heads, 8 kv heads, head dim 128, bf16), one
sequence prefilled whole at each length, K/V in vLLM's FlashAttention paged
cache (block size 16):

* dense: ``vllm.vllm_flash_attn.flash_attn_varlen_func`` causal (FA3);
* stock pieces: FA3 with a 512-key window over every row, plus FA3 for the
  last 128 rows against all keys (no sinks): what stock kernels already do;
* TriangleMix as the engine runs it: our kernel on the rows below the dense
  start (n_init 8, n_local 512) and the stock FA3 on the last 128 rows, plan
  built once outside the timed region (its host cost is reported separately).

Also sweeps kernel configurations, checks at full scale that the rows our
kernel computes and the rule leaves dense (the first n_init + n_local, which
see every earlier key) equal FA3's rows, prints a table and writes JSON (and
the best configuration as an env file for later runs).

    vllm-trianglemix bench kernel --out kernel.json --best-env kernel.env
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from vllm_trianglemix.pattern import TriangleParams, dense_start, plan_blocks
from vllm_trianglemix.tools.bench import command_line, require_cuda

# torch, numpy and the Triton op are imported where they are used, so that
# `bench kernel -h` answers without loading them.

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16
PARAMS = TriangleParams(n_init=8, n_local=512, n_last=128)
SWEEP = [
    f"block_m={m},block_n={n},num_warps={w},num_stages={st},mask_mode={mm}"
    for m, n, w, st, mm in [
        (128, 32, 4, 3, 0), (128, 32, 4, 3, 1), (128, 32, 4, 3, 2),
        (128, 32, 4, 4, 0), (128, 32, 4, 2, 0), (128, 64, 8, 3, 0), (128, 32, 8, 3, 0),
        (256, 32, 8, 3, 0), (256, 64, 8, 2, 0), (64, 32, 4, 3, 0), (128, 16, 4, 3, 0),
    ]
]


class _Cam:
    def __init__(self, block_table):
        self.block_table_tensor = block_table


def _bench(fn, rep_ms: int) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _time_config(cfg, q, kc, vc, bt, out_fa, L, scale, rep_ms, fa_last) -> dict:
    import numpy as np
    import torch

    from vllm_trianglemix.ops.triangle_triton import TritonTriangleOp

    op = TritonTriangleOp(HEADS, KV_HEADS, DIM, config=cfg)
    qsl, seq = np.array([0, L]), np.array([L])
    dense_from = dense_start(np.array([L]), PARAMS.n_last, 0)
    t0 = time.perf_counter()
    plan = plan_blocks(qsl, seq, dense_from, np.array([0]), PARAMS, op.block_q, rows="triangle")
    prepared = op.prepare(plan, dense_from, _Cam(bt))
    torch.cuda.synchronize()
    plan_ms = (time.perf_counter() - t0) * 1e3
    out = torch.full_like(q, float("nan"))

    def layer():
        op.run(q, kc, vc, prepared, PARAMS, scale, out)
        fa_last(out[L - PARAMS.n_last:])

    layer()
    torch.cuda.synchronize()
    ok = not torch.isnan(out).any().item()
    # our kernel's rows that see every earlier key (the first n_init + n_local) equal FA3's;
    # the last n_last rows are FA3's own (fa_last), so they check nothing
    head = PARAMS.n_init + PARAMS.n_local
    err = float((out[:head].float() - out_fa[:head].float()).norm() / out_fa[:head].float().norm())
    t = _bench(layer, rep_ms)
    return dict(ms=t, kernel_ms=_bench(lambda: op.run(q, kc, vc, prepared, PARAMS, scale, out), rep_ms),
                plan_ms=plan_ms, ok=ok, kernel_rows_rel_err=err, items=plan.num_items)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--lengths", type=int, nargs="+", default=[32000, 64000, 128000],
                    help="sequence lengths (tokens)")
    ap.add_argument("--configs", nargs="*", default=SWEEP,
                    help="kernel configurations to time (KernelConfig fields, comma-separated; "
                    f"default: a sweep of {len(SWEEP)})")
    ap.add_argument("--rep-ms", type=int, default=300, help="milliseconds of timed runs per measurement")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--best-env", default=None,
                    help="write the fastest configuration as an env file (TRIANGLEMIX_KERNEL_CONFIG)")


def run(args) -> int:
    require_cuda("bench kernel")
    import numpy as np  # noqa: F401
    import torch

    from vllm_trianglemix.ops.triangle_triton import CONFIG_ENV, KernelConfig

    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from vllm_trianglemix.backends.cuda import flash_kv_cache_views

    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    configs = {c: KernelConfig().with_overrides(c, "--configs") for c in args.configs}
    for L in args.lengths:
        nblk = -(-L // BLOCK)
        kv = torch.randn(nblk, KV_HEADS, BLOCK, 2 * DIM, device=dev, dtype=torch.bfloat16)
        kc, vc = flash_kv_cache_views(kv, DIM)
        bt = torch.arange(nblk, dtype=torch.int32, device=dev)[None, :]
        q = torch.randn(L, HEADS, DIM, device=dev, dtype=torch.bfloat16)
        scale = DIM ** -0.5
        cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
        cu_last = torch.tensor([0, PARAMS.n_last], dtype=torch.int32, device=dev)
        seqused = torch.tensor([L], dtype=torch.int32, device=dev)
        out_fa = torch.empty_like(q)
        out_win = torch.empty_like(q)
        out_last = torch.empty(PARAMS.n_last, HEADS, DIM, device=dev, dtype=torch.bfloat16)

        def fa_dense():
            flash_attn_varlen_func(q=q, k=kc, v=vc, out=out_fa, cu_seqlens_q=cu, max_seqlen_q=L,
                                   seqused_k=seqused, max_seqlen_k=L, softmax_scale=scale,
                                   causal=True, block_table=bt, fa_version=3)

        def fa_window():
            flash_attn_varlen_func(q=q, k=kc, v=vc, out=out_win, cu_seqlens_q=cu, max_seqlen_q=L,
                                   seqused_k=seqused, max_seqlen_k=L, softmax_scale=scale,
                                   causal=True, window_size=[PARAMS.n_local - 1, 0],
                                   block_table=bt, fa_version=3)

        def fa_last(out=out_last):
            flash_attn_varlen_func(q=q[L - PARAMS.n_last:], k=kc, v=vc, out=out,
                                   cu_seqlens_q=cu_last, max_seqlen_q=PARAMS.n_last,
                                   seqused_k=seqused, max_seqlen_k=L, softmax_scale=scale,
                                   causal=True, block_table=bt, fa_version=3)

        t_dense = _bench(fa_dense, args.rep_ms)
        t_win = _bench(fa_window, args.rep_ms)
        t_last = _bench(fa_last, args.rep_ms)

        results = {}
        for label, cfg in configs.items():
            try:
                results[label] = _time_config(cfg, q, kc, vc, bt, out_fa, L, scale, args.rep_ms, fa_last)
            except Exception as e:  # a configuration that does not compile or run is reported, not fatal
                results[label] = dict(ms=float("inf"), plan_ms=0.0, ok=False,
                                      kernel_rows_rel_err=float("inf"), items=0,
                                      error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(dict(length=L, fa3_dense_ms=t_dense, fa3_window_ms=t_win, fa3_last_ms=t_last,
                         stock_pieces_ms=t_win + t_last, configs=results))
        del kv, q, out_fa, out_win

    gpu = torch.cuda.get_device_name()
    import vllm
    import triton

    report = dict(gpu=gpu, vllm=vllm.__version__, triton=triton.__version__, torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), command=command_line(),
                  rows=rows)
    # One configuration for every length (the one the engine will use): the lowest
    # total time over all lengths among those that ran and whose kernel rows matched FA3's.
    totals = {}
    for r in rows:
        for c, v in r["configs"].items():
            if v["ok"] and v["kernel_rows_rel_err"] < 2e-2:
                totals.setdefault(c, []).append(v["ms"])
    overall = min((c for c in totals if len(totals[c]) == len(rows)), key=lambda c: sum(totals[c]),
                  default=None)
    for r in rows:
        r["best_config"] = overall
        r["trianglemix_ms"] = r["configs"][overall]["ms"] if overall else float("nan")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.best_env and overall:
        with open(args.best_env, "w") as f:
            f.write(f"export {CONFIG_ENV}={overall}\n")
    sys.stdout.write(f"\nGPU {gpu}, vLLM {vllm.__version__}, Triton {triton.__version__}\n")
    for r in rows:
        for c, v in r["configs"].items():
            sys.stdout.write(f"  L={r['length']} {c}: {v['ms']:.3f} ms (kernel {v.get('kernel_ms', 0):.3f}) ok={v['ok']} "
                             f"kernel rows vs FA3 err={v['kernel_rows_rel_err']:.1e} plan={v['plan_ms']:.2f} ms\n")
    sys.stdout.write("\n| length | FA3 dense ms | FA3 window+last ms | TriangleMix ms | vs dense | vs stock pieces |\n")
    sys.stdout.write("|---|---|---|---|---|---|\n")
    for r in rows:
        sys.stdout.write(
            f"| {r['length']} | {r['fa3_dense_ms']:.3f} | {r['stock_pieces_ms']:.3f} | "
            f"{r['trianglemix_ms']:.3f} | {r['fa3_dense_ms'] / r['trianglemix_ms']:.1f}x | "
            f"{r['stock_pieces_ms'] / r['trianglemix_ms']:.2f}x |\n")
    sys.stdout.write(f"best overall config: {overall}\n")
    return 0

