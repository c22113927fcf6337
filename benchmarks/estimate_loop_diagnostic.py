"""Where the XAttention estimate's time goes: copies of its kernel with parts taken out (GPU).

Each variant is a copy of ``ops/xattention_triton/estimate.py`` with its key-tile loop changed,
timed over every prefill step of one long prompt (Llama-3.1-8B shape, chunks of 16K, K/V in
vLLM's paged FlashAttention cache) in one process. Only ``copy`` computes the real masses; the
others are floors, their masses wrong by construction:

* ``copy``: the kernel unchanged (the reference for the run-to-run spread);
* ``bare``: no per-tile epilogue (the dots accumulate over all key tiles; no softmax, no block sums);
* ``rowmax``: per tile only the row maximum, then the accumulator reset;
* ``bare_qsame`` / ``bare_ksame`` / ``bare_both``: ``bare`` with every query tile (or key tile, or
  both) read from the same address, so that those operands come from L2: what their traffic costs.

Also counts the warpgroup-MMA waits in each compiled kernel (set ``TRITON_CACHE_DIR`` to a fresh
folder). Written for the kernels of the estimate's defaults with TMA loads (Hopper).

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/estimate_loop_diagnostic.py --out diag.json
"""
import argparse
import glob
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time

import torch

EPILOGUE = "        if last_step:  # the tile's last step"
RESET = "            acc = tl.zeros([BLOCK_M, N], dtype=tl.float32)\n"
BARRIER = "    if KS == 1:\n        tl.debug_barrier()"
Q_LOAD = "q_s = QD.load([(pid * S + s) * BLOCK_M, dc * BLOCK_D])"
K_LOAD = "k_s = KD.load([k_group0 + t * N, s * HEAD_D + dc * BLOCK_D]).T"


def variants(src: str) -> dict[str, str]:
    start = src.index(EPILOGUE)
    end = src.index(RESET, start) + len(RESET)
    for text in (BARRIER, Q_LOAD, K_LOAD):
        assert text in src, f"the estimate kernel changed: {text!r} not found"
    # (acc kept alive after the loop, so that the compiler keeps the dots)
    bare = (src[:start] + src[end:]).replace(BARRIER, "    m_i = tl.max(acc, 1)\n" + BARRIER, 1)
    rowmax = (src[:start] + "        if last_step:\n            m_i = tl.maximum(m_i, tl.max(acc, 1))\n"
              + RESET + src[end:])
    q_same = "q_s = QD.load([(pid * S) * BLOCK_M, dc * BLOCK_D])"
    k_same = "k_s = KD.load([k_group0, s * HEAD_D + dc * BLOCK_D]).T"
    return dict(copy=src, bare=bare, rowmax=rowmax, bare_qsame=bare.replace(Q_LOAD, q_same),
                bare_ksame=bare.replace(K_LOAD, k_same),
                bare_both=bare.replace(Q_LOAD, q_same).replace(K_LOAD, k_same))


def load_copies(texts: dict[str, str]) -> dict:
    folder = tempfile.mkdtemp(prefix="estimate-copies-")
    mods = {}
    for name, text in texts.items():
        path = os.path.join(folder, f"estimate_{name}.py")
        pathlib.Path(path).write_text(text)
        spec = importlib.util.spec_from_file_location(f"estimate_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=128000)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="times each variant in turn, this many rounds")
    ap.add_argument("--out", default="estimate-loop-diagnostic.json")
    args = ap.parse_args()

    import vllm_trianglemix.ops.xattention_triton.estimate as estimate_stage
    from vllm_trianglemix.ops.xattention_triton import TritonXAttentionOp, XAttnKernelConfig
    from vllm_trianglemix.pattern import DynamicParams
    from vllm_trianglemix.tools import bench_dynamic as bd

    mods = load_copies(variants(pathlib.Path(estimate_stage.__file__).read_text()))
    torch.manual_seed(0)
    shape, L = bd.Shape(), args.length
    config = XAttnKernelConfig.from_env(shape.head_dim)
    op = TritonXAttentionOp(shape.heads, shape.kv_heads, shape.head_dim, config=config)
    steps = bd.prompt_steps(shape, L, args.chunk, op)
    params = DynamicParams("xattention", bd.BLOCK, bd.STRIDE, 1.0, 0.1, bd.N_LAST)
    packs = [op.pack(s.q, s.kc, s.vc, s.prep, params, op._fp8(s.q, s.kc, s.vc, s.prep, None)) for s in steps]
    original, ref, rows = estimate_stage._estimate_kernel, None, []
    try:
        for rnd in range(args.rounds):
            for name, mod in mods.items():
                estimate_stage._estimate_kernel = mod._estimate_kernel
                total, masses = 0.0, []
                for s, packed in zip(steps, packs):
                    f = lambda: op.estimate_row_tiles(s.q, s.kc, s.prep, params, s.scale, None, packed)  # noqa: E731
                    masses.append(f())
                    total += bd._time_ms(f, args.reps)
                if ref is None:
                    ref = masses
                diff = max(float((a - b).abs().max()) for a, b in zip(masses, ref))
                rows.append(dict(variant=name, round=rnd, est_ms=total, max_abs_mass_diff=diff))
                print(rows[-1], flush=True)
    finally:
        estimate_stage._estimate_kernel = original
    waits = []
    for f in glob.glob(os.path.join(os.environ.get("TRITON_CACHE_DIR", ""), "**", "_estimate_kernel*.ptx"),
                       recursive=True) if os.environ.get("TRITON_CACHE_DIR") else []:
        t = pathlib.Path(f).read_text()
        waits.append(dict(wgmma=t.count("wgmma.mma_async"), wait0=t.count("wgmma.wait_group.sync.aligned 0;"),
                          wait1=t.count("wgmma.wait_group.sync.aligned 1;"), ex2=t.count("ex2.approx")))
    import triton
    import vllm

    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), vllm=vllm.__version__, triton=triton.__version__,
                       torch=torch.__version__, date=time.strftime("%Y-%m-%d"), length=L, chunk=args.chunk,
                       config=config.as_text(), rows=rows, ptx_waits=waits), f, indent=1)
    print("\n| variant | round | estimate ms |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['round']} | {r['est_ms']:.2f} |")


if __name__ == "__main__":
    main()
