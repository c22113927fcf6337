"""Compile the Gluon estimate loop (``est_gluon``) for Hopper without a GPU: Triton's front end,
its NVIDIA back end and ptxas for sm_90a; prints each configuration's registers, spills and shared
memory (from the cubin), or the compiler's error.

    python scripts/compile_gluon_estimate.py            # the head-128 tiles: 128 x 256, 64-wide steps
    python scripts/compile_gluon_estimate.py --stages 8 9 --block-d 32 --lag 5
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch


def compile_one(stages: int, block_d: int, head: int, n_cols: int, ks: int, lag: int = 0, dtype=torch.bfloat16):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from vllm_trianglemix.ops.xattention_triton import estimate_gluon as eg
    from vllm_trianglemix.ops.xattention_triton.config import XAttnKernelConfig

    S, G_P, block_m = 8, 16, 128
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    qp = torch.empty((4 * S * block_m, head), dtype=dtype)
    kp = torch.empty((8, 4096, head), dtype=dtype)
    qd = eg.GluonTensorDescriptor.from_tensor(qp, [block_m, block_d],
                                              gl.NVMMASharedLayout.get_default_for([block_m, block_d], gdt))
    kd = eg.GluonTensorDescriptor.from_tensor(kp.view(-1, S * head), [n_cols, block_d],
                                              gl.NVMMASharedLayout.get_default_for([n_cols, block_d], gdt))
    i32, f32 = torch.empty(1, dtype=torch.int32), torch.empty(1, dtype=torch.float32)
    _, lag = eg.gluon_stages(XAttnKernelConfig(est_num_stages=stages, est_gluon_lag=lag))
    args = dict(qd=qd, kd=kd, PINFO=i32, RINFO=i32, DIAG=f32, BSUM=f32, TMAX=f32, ML=f32, max_tiles=7,
                qk_scale=0.5)
    consts = dict(KS=ks, S=S, DC=head // block_d, KB=n_cols // G_P, G_P=G_P, NUM_STAGES=stages, LAG=lag)
    kernel = eg._estimate_gluon_kernel
    signature = {k: mangle_type(v) for k, v in args.items()}
    signature.update({k: "constexpr" for k in consts})
    src = GluonASTSource(kernel, signature, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    line = next((ln.strip() for ln in usage.splitlines() if "REG:" in ln), usage.strip()[-200:])
    return f"{line}; shared {compiled.metadata.shared} bytes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[4])
    ap.add_argument("--block-d", type=int, nargs="+", default=[64])
    ap.add_argument("--head", type=int, default=128)
    ap.add_argument("--n-cols", type=int, default=256)
    ap.add_argument("--key-splits", type=int, default=2)
    ap.add_argument("--lag", type=int, default=0, help="est_gluon_lag (0: half the stages)")
    args = ap.parse_args()
    import triton

    print(f"Triton {triton.__version__}, sm_90a, head {args.head}, {args.n_cols} key groups per tile")
    failed = False
    for bd in args.block_d:
        for st in args.stages:
            try:
                print(f"stages {st}, block_d {bd}: {compile_one(st, bd, args.head, args.n_cols, args.key_splits, args.lag)}")
            except Exception as e:  # report and go on with the next configuration
                failed = True
                print(f"stages {st}, block_d {bd}: {type(e).__name__}: {str(e)[-1500:]}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
