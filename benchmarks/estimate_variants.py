"""The XAttention estimate under kernel-option overrides, against the defaults, one run (GPU).

Times the estimate over every prefill step of one long prompt (Llama-3.1-8B shape by default,
chunks of 16K, K/V in vLLM's paged FlashAttention cache) for each ``--configs`` entry
(``TRIANGLEMIX_XATTN_CONFIG`` syntax; ``default`` for none), and compares each one's block masses
(every step) and selection (the last step, ``--density``) with the first entry's.

    python benchmarks/estimate_variants.py --configs default est_head_major=1 est_key_splits=2 default
"""
import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=128000)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=["default"])
    ap.add_argument("--out", default="estimate-variants.json")
    args = ap.parse_args()

    from vllm_trianglemix.ops.xattention_triton import TritonXAttentionOp, XAttnKernelConfig
    from vllm_trianglemix.pattern import DynamicParams
    from vllm_trianglemix.tools import bench_dynamic as bd

    torch.manual_seed(0)
    shape, L = bd.Shape(), args.length
    H, KV, D = shape.heads, shape.kv_heads, shape.head_dim
    base = XAttnKernelConfig.from_env(D)
    steps = bd.prompt_steps(shape, L, args.chunk, TritonXAttentionOp(H, KV, D, config=base))
    params = DynamicParams("xattention", bd.BLOCK, bd.STRIDE, 1.0, args.density, bd.N_LAST)
    ref, rows = {}, []
    for text in args.configs:
        row = dict(config=text)
        try:
            cfg = base if text == "default" else base.with_overrides(text)
            op = TritonXAttentionOp(H, KV, D, config=cfg)
            total, diffs = 0.0, []
            for i, s in enumerate(steps):
                fp8 = op._fp8(s.q, s.kc, s.vc, s.prep, None)
                packed = op.pack(s.q, s.kc, s.vc, s.prep, params, fp8)
                f = lambda: op.estimate_row_tiles(s.q, s.kc, s.prep, params, s.scale, None, packed)  # noqa: E731
                m = f()
                if i in ref:
                    diffs.append(float((m - ref[i]).abs().max()))
                else:
                    ref[i] = m.clone()
                if i == len(steps) - 1:
                    keep = op.select(m, s.prep, params, keep_mask=True).keep
                    if "keep" in ref:
                        row["agreement"] = float((keep == ref["keep"]).all(-1).float().mean())
                    else:
                        ref["keep"] = keep.clone()
                total += bd._time_ms(f, args.reps)
            row.update(est_ms=total, max_abs_mass_diff=max(diffs) if diffs else 0.0)
        except Exception as e:  # a configuration that does not build is reported
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(row, flush=True)
    import triton
    import vllm

    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), vllm=vllm.__version__, triton=triton.__version__,
                       torch=torch.__version__, date=time.strftime("%Y-%m-%d"), length=L, chunk=args.chunk,
                       density=args.density, rows=rows), f, indent=1)
    print("\n| estimate | ms | max abs. mass difference | selection agreement |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r.get('est_ms', float('nan')):.2f} | {r.get('max_abs_mass_diff', float('nan')):.1e} "
              f"| {r.get('agreement', '-')} | {r.get('error', '')[:100]}")


if __name__ == "__main__":
    main()
