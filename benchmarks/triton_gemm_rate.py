"""Triton's own GEMM rate on the XAttention estimate's operand shape, against cuBLAS (GPU).

The estimate of a dynamic layer is one GEMM with a softmax and block sums fused behind it
(ops/xattention_triton/estimate.py). How fast can Triton run that GEMM alone on this GPU? The last
128K step of the Llama-3.1-8B shape stacked over its 8 KV heads: M = 64000 strided query rows,
N = 16000 strided key groups, K = 1024 (8 stride offsets x head size 128), bf16. cuBLAS
(``torch.matmul``, bf16 out) against Triton tensor-descriptor GEMMs with the estimate's tiles,
once storing C and once keeping only a row sum of exp2(C) (the estimate stores no scores), and
persistent variants with and without Triton's warp specialisation.

    python benchmarks/triton_gemm_rate.py triton-gemm.json
"""
import json
import sys
import time

import numpy as np
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


def tms(fn, reps=10):
    """Median of ``reps`` timed calls after one warm-up (CUDA events), ms."""
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return float(np.median(ts))

@triton.jit
def _gemm(AD, BD, OUT, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          STORE: tl.constexpr, CD, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    nm = tl.cdiv(M, BM); nn = tl.cdiv(N, BN)
    width = GROUP_M * nn
    gid = pid // width
    fm = gid * GROUP_M
    gs = min(nm - fm, GROUP_M)
    pm = fm + (pid % width) % gs
    pn = (pid % width) // gs
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = AD.load([pm * BM, k])
        b = BD.load([pn * BN, k])
        acc = tl.dot(a, b.T, acc)
    if STORE:
        CD.store([pm * BM, pn * BN], acc.to(tl.bfloat16))
    else:
        tl.store(OUT + pid * BM + tl.arange(0, BM), tl.sum(tl.exp2(acc * 0.001), 1))

@triton.jit
def _gemm_persistent(AD, BD, OUT, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     NUM_SMS: tl.constexpr, WS: tl.constexpr):
    start = tl.program_id(0)
    nm = tl.cdiv(M, BM); nn = tl.cdiv(N, BN)
    for tile in tl.range(start, nm * nn, NUM_SMS, flatten=True, warp_specialize=WS):
        pm = tile % nm
        pn = tile // nm
        acc = tl.zeros([BM, BN], tl.float32)
        for k in range(0, K, BK):
            a = AD.load([pm * BM, k])
            b = BD.load([pn * BN, k])
            acc = tl.dot(a, b.T, acc)
        tl.store(OUT + tile * BM + tl.arange(0, BM), tl.sum(tl.exp2(acc * 0.001), 1))

def main(out_path: str) -> None:
    if not torch.cuda.is_available():
        sys.exit("triton_gemm_rate: needs a CUDA GPU")
    M, N, K = 64000, 16000, 1024
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    flop = 2.0 * M * N * K
    rows = [dict(kernel="cuBLAS torch.matmul (bf16 out)", ms=tms(lambda: torch.matmul(a, b.T, out=c)))]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for BM, BN, BK, w, st in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 5), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]:
        ad = TensorDescriptor.from_tensor(a, [BM, BK]); bd = TensorDescriptor.from_tensor(b, [BN, BK])
        cd = TensorDescriptor.from_tensor(c, [BM, BN])
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
        out = torch.empty(grid[0] * BM, device="cuda", dtype=torch.float32)
        for store in (0, 1):
            name = f"triton {BM}x{BN}x{BK} w{w} s{st} {'C stored' if store else 'row sums only'}"
            try:
                rows.append(dict(kernel=name, ms=tms(lambda: _gemm[grid](ad, bd, out, M, N, K, BM, BN, BK, store, cd, 8, num_warps=w, num_stages=st))))
            except Exception as e:
                rows.append(dict(kernel=name, error=str(e)[:200]))
            print(rows[-1], flush=True)
        for ws in (False, True):
            name = f"triton persistent {BM}x{BN}x{BK} w{w} s{st} ws={ws} row sums only"
            try:
                out2 = torch.empty(triton.cdiv(M, BM) * triton.cdiv(N, BN) * BM, device="cuda", dtype=torch.float32)
                rows.append(dict(kernel=name, ms=tms(lambda: _gemm_persistent[(sms,)](ad, bd, out2, M, N, K, BM, BN, BK, sms, ws, num_warps=w, num_stages=st))))
            except Exception as e:
                rows.append(dict(kernel=name, error=str(e)[:200]))
            print(rows[-1], flush=True)
    for r in rows:
        if "ms" in r:
            r["tflop_s"] = flop / r["ms"] / 1e9
    json.dump(dict(shape=[M, N, K], rows=rows, gpu=torch.cuda.get_device_name(), triton=triton.__version__,
                   date=time.strftime("%Y-%m-%d")), open(out_path, "w"), indent=1)
    print("\n| kernel | ms | TFLOP/s |")
    for r in rows:
        print(f"| {r['kernel']} | {r.get('ms', float('nan')):.2f} | {r.get('tflop_s', float('nan')):.0f} | {r.get('error', '')[:100]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "triton-gemm.json")
