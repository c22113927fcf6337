"""bench dynamic: one dynamic (TriangleMix + XAttention) layer vs dense FA3, side by side, one run (GPU).

For the Llama-3.1-8B shape (32 q heads, 8 kv heads, head dim 128, bf16; ``--model``:
the shape of a model's config.json, ``--page``: its cache page), one
sequence prefilled in chunks of ``--chunk`` tokens (16384: vLLM's default
``max_num_batched_tokens``; 0: the whole prompt in one step) at each length,
K/V in vLLM's FlashAttention paged cache (page 16):

* dense: ``vllm.vllm_flash_attn.flash_attn_varlen_func`` causal (FA3) over
  each step's rows, summed over the steps;
* dynamic layer (XAttention block 128, stride 8, n_last 128): per step the
  repack of the step's keys and values, the estimate, the selection, the
  block-sparse attention and the dense last rows (FA3: the engine leaves them to the stock
  backend), each timed,
  and the whole layer timed as the backend runs it; once per kernel set
  (``--variants``, VARIANTS below): ``default`` (the kernels' defaults, or the
  sweep's choice; on Hopper the attention is FA4's CuTe-DSL block-sparse
  forward) and others (``triton``: the Triton attention, which runs where FA4's
  cannot; ``fp8-score``: the estimate on e4m3 roundings; ``gluon``: the estimate's
  loop in Gluon; ...), on the same
  cache and queries, FA3 in the same run.

Random data gives diffuse attention (a threshold would keep nearly every
block), so densities are FIXED: threshold 1.0 with ``max_density`` 0.1 and
0.2 (``--densities``); the achieved density is reported. A short sweep of
kernel-2 estimate and attention configurations on the longest length's last
step picks the ``default`` configuration (``--no-sweep``: defaults). Before
timing, keeping every block is checked against FA3's output at full scale
(each kernel set; the attention that ran is named: ``cute`` or ``triton``), and
the two kernel sets' selections on the longest length's last step are
compared (share of identical (query block, KV head) decisions; near ties of
two bf16 estimates may differ). Every kernel is compiled before it is timed.

The estimate's baseline, in the same run: cuBLAS (``torch.matmul``, bf16) on
the same operands (each step's strided query rows against the strided keys up
to its end): the inner products of the estimate without its softmax and block
sums, over every key group (the estimate scores only the causal ones); its
time and TFLOP/s next to the estimate's, the FLOPs of each counted by
``estimate_flops``.

    vllm-trianglemix bench dynamic --out dynamic.json --best-env dynamic.env
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

from vllm_trianglemix.pattern import DynamicParams, dense_start, plan_query_blocks
from vllm_trianglemix.tools.bench import command_line, require_cuda

# torch and numpy are imported where they are used, so that `bench dynamic -h`
# answers without loading them.

DEVICE, DTYPE = "cuda", "bfloat16"
BLOCK, STRIDE, N_LAST = 128, 8, 128
VARIANTS = {
    "default": "",  # the defaults (with the sweep's choice)
    "fp8-score": "est_fp8_score=1",  # the estimate on e4m3 roundings (its selection's agreement reported)
    "fp8-score-fast": "est_fp8_score=1,est_fp8_fast_acc=1",  # the same, the tensor cores' own accumulation
    "pointers": "est_tma=0",  # the estimate's operands by pointers (the default where TMA is absent)
    "triton": "attn_cute=0",  # the Triton attention (the default where FA4's cannot run)
    "cute": "attn_cute=1",  # FA4's CuTe-DSL block-sparse forward asked for (named where it cannot run)
    "gluon": "est_gluon=1",  # the estimate's loop in Gluon, two warpgroups overlapping epilogue and dots (Hopper)
    "gluon-32": "est_gluon=1,est_block_d=32,est_num_stages=9,est_gluon_lag=5",  # the same, 32-wide steps, a deeper ring
}
DEFAULT_VARIANTS = ["default", "triton", "fp8-score"]
EST_SWEEP = [  # the defaults first, then the runners-up (BENCHMARKS.md section 3)
    # On the H200 with the operands by TMA (est_tma's default there) and full key tiles scored
    # without masks, ms on the last 128K chunk: 128/256/8/4 with the head in 64-wide steps 3.72,
    # 128/256/8/5 32-wide 3.81, 128/256/8/3 64-wide 3.89, 64/256/4/4 64-wide 4.21, 128/128/8/4
    # 64-wide 4.92, 128/256/8/2 whole head 7.24; one warpgroup per program with 32-wide steps (two
    # programs per SM) 4.75 (4 stages) and 4.94 (3 stages).
    "est_block_m=128,est_block_n=256,est_num_warps=8,est_num_stages=4,est_block_d=64",
    "est_block_m=128,est_block_n=256,est_num_warps=8,est_num_stages=5,est_block_d=32",
    "est_block_m=128,est_block_n=256,est_num_warps=8,est_num_stages=3,est_block_d=64",
    "est_block_m=64,est_block_n=256,est_num_warps=4,est_num_stages=4,est_block_d=64",
    "est_block_m=128,est_block_n=128,est_num_warps=8,est_num_stages=4,est_block_d=64",
    "est_block_m=128,est_block_n=256,est_num_warps=8,est_num_stages=2",  # whole-head dots
]
ATTN_SWEEP = [  # the Triton attention's tiles (the defaults first; swept with attn_cute=0)
    "block_m=256,block_n=64,num_warps=8,num_stages=3",
    "block_m=256,block_n=64,num_warps=8,num_stages=4",
    "block_m=256,block_n=64,num_warps=8,num_stages=2",
    "block_m=128,block_n=128,num_warps=8,num_stages=3",
]
# Head size 256 (e.g. Qwen3.5's full-attention layers): tiles that fit the shared memory of
# a 256-wide query and key tile (the defaults first; a configuration that does not build is reported).
# On the H200 (BENCHMARKS.md section 5), ms on the last 128K chunk, the estimate's operands by TMA
# and full key tiles scored without masks: 128/256/8/4 with the head in 64-wide steps 3.14,
# 128/256/8/3 64-wide 3.65, 128/128/8/3 128-wide 4.66, 128/128/8/4 64-wide 5.08, 64/128/4/3 128-wide
# 5.20; the Triton attention 128/64/8/2 5.92, 128/32/8/3 8.35, 64/64/4/3 8.39, 64/64/4/2 8.60,
# 128/32/8/2 8.84 (earlier, by pointers: 128/64/4/2 16.73; 128/64/8/3 and 64/64/4/4 do not build).
EST_SWEEP_256 = [
    "est_block_m=128,est_block_n=256,est_num_warps=8,est_num_stages=4,est_block_d=64",
    "est_block_m=128,est_block_n=256,est_num_warps=8,est_num_stages=3,est_block_d=64",
    "est_block_m=128,est_block_n=128,est_num_warps=8,est_num_stages=3,est_block_d=128",
    "est_block_m=128,est_block_n=128,est_num_warps=8,est_num_stages=4,est_block_d=64",
    "est_block_m=64,est_block_n=128,est_num_warps=4,est_num_stages=3,est_block_d=128",
]
ATTN_SWEEP_256 = [
    "block_m=128,block_n=64,num_warps=8,num_stages=2",
    "block_m=64,block_n=64,num_warps=4,num_stages=2",
    "block_m=128,block_n=32,num_warps=8,num_stages=2",
    "block_m=128,block_n=32,num_warps=8,num_stages=3",
    "block_m=64,block_n=64,num_warps=4,num_stages=3",
]


@dataclass(frozen=True)
class Shape:
    """The attention shape benchmarked: Llama-3.1-8B's by default, or a model's config.json."""

    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page: int = 16  # vLLM's FlashAttention page; hybrid models use larger ones (vLLM logs the size)

    @classmethod
    def from_model(cls, model: str, page: int | None = None) -> "Shape":
        from vllm_trianglemix.model_info import load_text_config

        cfg = load_text_config(model)
        heads = cfg.num_attention_heads
        return cls(heads, getattr(cfg, "num_key_value_heads", None) or heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, page or cls.page)

    def sweeps(self) -> tuple[list[str], list[str]]:
        return (EST_SWEEP_256, ATTN_SWEEP_256) if self.head_dim >= 256 else (EST_SWEEP, ATTN_SWEEP)


class _Cam:
    def __init__(self, block_table):
        self.block_table_tensor = block_table


def _time_ms(fn, reps: int) -> float:
    """Median of ``reps`` timed calls after one warm-up (CUDA events)."""
    import numpy as np
    import torch

    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


class _Step:
    """One prefill step of the sequence: rows [p0, p0 + n) against keys [0, p0 + n)."""

    def __init__(self, L, p0, n, q, kc, vc, bt, dyn, scale):
        import numpy as np
        import torch
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        self.L, self.p0, self.n = L, p0, n
        self.q, self.kc, self.vc, self.scale = q[p0: p0 + n], kc, vc, scale
        self.dyn = dyn
        self.out = torch.empty_like(self.q)
        self.out_fa = torch.empty_like(self.q)
        qsl, seq = np.array([0, n]), np.array([p0 + n])
        self.dense_from = dense_start(np.array([L]), N_LAST, 0)
        cam = _Cam(bt)
        t0 = time.perf_counter()
        block_plan = plan_query_blocks(qsl, seq, self.dense_from, np.array([0]), BLOCK)
        self.prep = dyn.prepare(block_plan, self.dense_from, cam)
        torch.cuda.synchronize()
        self.plan_ms = (time.perf_counter() - t0) * 1e3
        d0 = min(max(int(self.dense_from[0]) - p0, 0), n)  # the step's first dense row
        self.has_dense = d0 < n
        cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
        cu_dense = torch.tensor([0, n - d0], dtype=torch.int32, device=q.device)
        used = torch.tensor([p0 + n], dtype=torch.int32, device=q.device)

        def fa3(rows=0, out=self.out_fa, cu=cu):
            flash_attn_varlen_func(q=self.q[rows:], k=kc, v=vc, out=out[rows:], cu_seqlens_q=cu,
                                   max_seqlen_q=n - rows, seqused_k=used, max_seqlen_k=p0 + n,
                                   softmax_scale=scale, causal=True, block_table=bt, fa_version=3)

        self.fa3 = fa3
        self._dense_rows = lambda: fa3(d0, self.out, cu_dense)

    def dense_rows(self):
        """The step's rows at or past the dense start, as the engine runs them: the stock backend's FA3."""
        if self.has_dense:
            self._dense_rows()

    def layer(self, params, dyn=None):
        self.dense_rows()
        (dyn or self.dyn).run(self.q, self.kc, self.vc, self.prep, params, self.scale, self.out)

    def timings(self, params, reps, dyn=None) -> dict:
        dyn, prep = dyn or self.dyn, self.prep
        r = dict(repack_ms=0.0, est_ms=0.0, select_ms=0.0, attn_ms=0.0, kept=0, causal=0)
        if prep.num_items:
            fp8 = dyn._fp8(self.q, self.kc, self.vc, prep, None)
            packed = dyn.pack(self.q, self.kc, self.vc, prep, params, fp8)
            mass = dyn.estimate_row_tiles(self.q, self.kc, prep, params, self.scale, None, packed)
            blocks = dyn.select(mass, prep, params)
            r["repack_ms"] = _time_ms(lambda: dyn.pack(self.q, self.kc, self.vc, prep, params, fp8), reps)
            r["est_ms"] = _time_ms(
                lambda: dyn.estimate_row_tiles(self.q, self.kc, prep, params, self.scale, None, packed), reps)
            r["select_ms"] = _time_ms(lambda: dyn.select(mass, prep, params), reps)
            r["attn_ms"] = _time_ms(lambda: dyn.attend(self.q, self.kc, self.vc, prep, params, self.scale,
                                                        self.out, blocks, None, packed), reps)
            r["kept"] = int((blocks.n_kept + blocks.diag_kept).sum())
            r["causal"] = int((prep.q_block + 1).sum()) * dyn.num_kv_heads
        r["dense_rows_ms"] = _time_ms(self.dense_rows, reps) if self.has_dense else 0.0
        r["layer_ms"] = _time_ms(lambda: self.layer(params, dyn), reps)
        return r

    def keep_mask(self, params, dyn):
        """The kept-block mask [items, kv_heads, blocks] of this step (bool)."""
        mass = dyn.estimate_row_tiles(self.q, self.kc, self.prep, params, self.scale, None)
        return dyn.select(mass, self.prep, params, keep_mask=True).keep


def _strided_groups(steps):
    """Per step: (its first query group, its query groups, the key groups up to its end), groups
    of ``STRIDE`` positions: the shape of the estimate's GEMM in that step."""
    for s in steps:
        ng = -(-s.n // STRIDE)
        yield s.p0 // STRIDE, ng, -(-(s.p0 + s.n) // STRIDE)


def estimate_flops(steps, shape: "Shape") -> tuple[float, float]:
    """(the estimate's FLOPs, those of the GEMM over each step's whole key range) summed over the steps.

    The estimate scores query group ``g`` against key groups ``h <= g`` (``S*d`` products each);
    a plain GEMM of the same operands computes every ``h`` up to the step's end.
    """
    causal = rect = 0.0
    for g0, ng, nk in _strided_groups(steps):
        causal += ng * g0 + ng * (ng + 1) / 2
        rect += ng * nk
    per = 2.0 * STRIDE * shape.head_dim * shape.heads
    return causal * per, rect * per


def _gemm_floor_ms(steps, shape: "Shape", reps: int) -> float:
    """cuBLAS (torch.matmul, bf16 in, float32 accumulation, bf16 out) on the estimate's operands:
    per step and KV head, the step's strided query rows of the group's heads ``[GROUP * n/S, S*d]``
    against the strided keys up to the step's end ``[(p0 + n)/S, S*d]``; summed over the steps.
    The same inner products as the estimate, without its softmax and block sums, and over every
    key group up to the step's end (``estimate_flops`` gives both counts)."""
    import torch

    inner, group = STRIDE * shape.head_dim, shape.heads // shape.kv_heads
    total = 0.0
    for _, ng, nk in _strided_groups(steps):
        a = torch.randn(shape.kv_heads, group * ng, inner, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(shape.kv_heads, nk, inner, device=DEVICE, dtype=torch.bfloat16)
        c = torch.empty(shape.kv_heads, group * ng, nk, device=DEVICE, dtype=torch.bfloat16)
        total += _time_ms(lambda: torch.matmul(a, b.transpose(1, 2), out=c), reps)
        del a, b, c
    return total


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--lengths", type=int, nargs="+", default=[32000, 64000, 128000],
                    help="sequence lengths (tokens)")
    ap.add_argument("--model", default=None,
                    help="a model folder whose config.json gives the heads, KV heads and head size "
                         "(default: the Llama-3.1-8B shape, 32/8/128)")
    ap.add_argument("--page", type=int, default=None,
                    help="KV cache page size in tokens (default 16; hybrid models run larger pages: "
                         "vLLM logs 'Setting attention block size to N tokens')")
    ap.add_argument("--chunk", type=int, default=16384,
                    help="prefill chunk (vLLM's max_num_batched_tokens); 0: whole prompt in one step")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2],
                    help="max_density values (threshold 1.0: a fixed budget)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per measurement (median)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                    help="kernel sets to time (default: %(default)s): default (the defaults, or the sweep's "
                         "choice), fp8-score (the same, the estimate scoring e4m3 roundings of the query "
                         "and keys; its selection's agreement with the first set is reported), "
                         "fp8-score-fast (fp8-score with the tensor cores' own fp8 accumulation), triton "
                         "(the Triton attention instead of FA4's CuTe-DSL forward), cute (FA4's asked for)")
    ap.add_argument("--no-sweep", action="store_true", help="default kernel configurations only")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--best-env", default=None,
                    help="write the chosen configuration as an env file (TRIANGLEMIX_XATTN_CONFIG)")


def prompt_steps(shape: Shape, length: int, chunk: int, op) -> list[_Step]:
    """One prompt of ``length`` random tokens, its K/V in vLLM's paged FlashAttention cache (pages in
    order), prefilled in steps of ``chunk`` rows with ``op`` planning them (the caller seeds torch)."""
    import torch

    from vllm_trianglemix.backends.cuda import flash_kv_cache_views

    heads, kv_heads, dim, page = shape.heads, shape.kv_heads, shape.head_dim, shape.page
    nblk = -(-length // page)
    kv = torch.randn(nblk, kv_heads, page, 2 * dim, device=DEVICE, dtype=getattr(torch, DTYPE))
    kc, vc = flash_kv_cache_views(kv, dim)
    bt = torch.arange(nblk, dtype=torch.int32, device=DEVICE)[None, :]
    q = torch.randn(length, heads, dim, device=DEVICE, dtype=getattr(torch, DTYPE))
    return [_Step(length, p0, min(chunk, length - p0), q, kc, vc, bt, op, dim ** -0.5)
            for p0 in range(0, length, chunk)]


def _sweep(step: _Step, densities, reps, base, shape: Shape) -> tuple[str | None, str | None, list[dict]]:
    """The fastest estimate and attention configurations on one step (errors reported, not fatal)."""
    from vllm_trianglemix.ops.xattention_triton import TritonXAttentionOp

    params = DynamicParams("xattention", BLOCK, STRIDE, 1.0, min(densities), N_LAST)
    lines, best = [], {}
    for kind, sweep in zip(("est", "attn"), shape.sweeps()):
        for text in sweep:
            try:  # (the attention's tiles are the Triton attention's: FA4's forward has its own)
                cfg = base.with_overrides(text + (",attn_cute=0" if kind == "attn" else ""))
                op = TritonXAttentionOp(shape.heads, shape.kv_heads, shape.head_dim, config=cfg)
                fp8 = op._fp8(step.q, step.kc, step.vc, step.prep, None)
                packed = op.pack(step.q, step.kc, step.vc, step.prep, params, fp8)
                mass = op.estimate_row_tiles(step.q, step.kc, step.prep, params, step.scale, None, packed)
                if kind == "est":
                    ms = _time_ms(lambda: op.estimate_row_tiles(step.q, step.kc, step.prep, params,
                                                                step.scale, None, packed), reps)
                else:
                    blocks = op.select(mass, step.prep, params)
                    ms = _time_ms(lambda: op.attend(step.q, step.kc, step.vc, step.prep, params,
                                                    step.scale, step.out, blocks, None, packed), reps)
                if op.config != cfg:
                    raise RuntimeError("did not build on this GPU (fell back to the defaults)")
                lines.append(dict(kind=kind, config=text, ms=ms))
                if kind not in best or ms < best[kind][1]:
                    best[kind] = (text, ms)
            except Exception as e:  # a configuration that does not compile or run is reported
                lines.append(dict(kind=kind, config=text, ms=float("inf"),
                                  error=f"{type(e).__name__}: {str(e)[:200]}"))
    return (best.get("est", (None,))[0], best.get("attn", (None,))[0], lines)


def _row_line(r: dict) -> str:
    return (f"| {r['length']} | {r['max_density']} ({r['achieved_density']:.3f}) | {r['variant']} ({r.get('attention')}) | "
            f"{r['repack_ms']:.2f} | {r['est_ms']:.2f} | {r['select_ms']:.2f} | {r['attn_ms']:.2f} | {r['dense_rows_ms']:.2f} | "
            f"{r['layer_ms']:.2f} | {r['fa3_ms']:.2f} | {r['layer_ms'] / r['fa3_ms']:.3f} | "
            f"{'ok' if r['keep_all_ok'] and r['keep_all_rel_err'] < 1e-2 else 'FAIL'} "
            f"{r['keep_all_rel_err']:.1e} |\n")


def _shape(args) -> Shape:
    """The shape ``--model`` / ``--page`` ask for, or one line naming the option that is wrong."""
    from vllm_trianglemix.model_info import ModelConfigError
    from vllm_trianglemix.tools.errors import ToolError

    if args.page is not None and args.page < 1:
        raise ToolError(f"--page: a page holds at least one token; got {args.page}")
    if not args.model:
        return Shape(page=args.page or Shape.page)
    try:
        return Shape.from_model(args.model, args.page)
    except ModelConfigError as e:
        raise ToolError(f"--model: {e}") from None


def run(args) -> int:
    shape = _shape(args)  # (bad options are named before the GPU is looked for)
    require_cuda("bench dynamic")
    import numpy as np  # noqa: F401
    import torch

    from vllm_trianglemix.ops.xattention_triton import TritonXAttentionOp, XAttnKernelConfig

    torch.manual_seed(0)
    heads, kv_heads, dim = shape.heads, shape.kv_heads, shape.head_dim
    base = XAttnKernelConfig.from_env(dim)
    ops = {v: TritonXAttentionOp(heads, kv_heads, dim,
                                 config=base.with_overrides(VARIANTS[v]) if VARIANTS[v] else base)
           for v in args.variants}
    rows, sweep_lines, swept, agreement, floors = [], [], False, None, []
    for L in sorted(args.lengths, reverse=True):  # longest first: the sweep runs on it
        chunk = args.chunk if args.chunk > 0 else L
        steps = prompt_steps(shape, L, chunk, ops[args.variants[0]])
        last = steps[-1]
        if not swept:
            swept = True
            if not args.no_sweep and "default" in ops:
                est_cfg, attn_cfg, sweep_lines = _sweep(last, args.densities, args.reps, ops["default"].config,
                                                               shape)
                for line in sweep_lines:
                    sys.stdout.write(f"sweep {line['kind']} {line['config']}: {line['ms']:.3f} ms "
                                     f"{line.get('error', '')}\n")
                sys.stdout.flush()
                for v in ops:  # the sweep's choice for every variant (each keeps its own option)
                    cfg = ops[v].config
                    for text in (est_cfg, attn_cfg):
                        if text:
                            cfg = cfg.with_overrides(text)
                    ops[v] = TritonXAttentionOp(heads, kv_heads, dim, config=cfg.with_overrides(VARIANTS[v])
                                                if VARIANTS[v] else cfg)
            if len(ops) > 1:  # each kernel set's selection against the first one's, on the same step
                params = DynamicParams("xattention", BLOCK, STRIDE, 1.0, min(args.densities), N_LAST)
                masks = {v: last.keep_mask(params, op) for v, op in ops.items()}
                ref_name, ref = next(iter(masks.items()))
                agreement = {}
                for v, mask in list(masks.items())[1:]:
                    agreement[v] = float((mask == ref).all(-1).float().mean())
                    sys.stdout.write(f"selection agreement {v} vs {ref_name} (L={L}, last step, density "
                                     f"{min(args.densities)}): {agreement[v]:.4f} of the (query block, KV head) "
                                     f"decisions identical, {1 - agreement[v]:.4f} differ in at least one "
                                     f"block\n")
        # Check at full scale, each kernel set: keeping every block equals FA3 (last step: the longest rows).
        keep_all = DynamicParams("xattention", BLOCK, STRIDE, 1.0, None, N_LAST)
        last.fa3()
        checks = {}
        for variant, op in ops.items():
            last.out.fill_(float("nan"))
            last.layer(keep_all, op)
            torch.cuda.synchronize()
            checks[variant] = (not torch.isnan(last.out).any().item(), float(
                (last.out.float() - last.out_fa.float()).norm() / last.out_fa.float().norm()))
        fa3_ms = sum(_time_ms(s.fa3, args.reps) for s in steps)
        est_flops, rect_flops = estimate_flops(steps, shape)
        floors.append(dict(length=L, estimate_tflop=est_flops / 1e12, gemm_tflop=rect_flops / 1e12,
                           gemm_ms=_gemm_floor_ms(steps, shape, args.reps)))
        for density in args.densities:
            params = DynamicParams("xattention", BLOCK, STRIDE, 1.0, density, N_LAST)
            for variant, op in ops.items():
                parts = [s.timings(params, args.reps, op) for s in steps]
                total = {k: sum(p[k] for p in parts) for k in parts[0]}
                rows.append(dict(
                    length=L, chunk=chunk, steps=len(steps), max_density=density, variant=variant,
                    achieved_density=total["kept"] / max(total["causal"], 1),
                    repack_ms=total["repack_ms"], est_ms=total["est_ms"], select_ms=total["select_ms"], attn_ms=total["attn_ms"],
                    dense_rows_ms=total["dense_rows_ms"], layer_ms=total["layer_ms"], fa3_ms=fa3_ms,
                    plan_ms=sum(s.plan_ms for s in steps), keep_all_ok=checks[variant][0],
                    keep_all_rel_err=checks[variant][1],
                    attention=op.last_attention,  # "cute" (FA4's CuTe-DSL forward) or "triton"
                    # an attention asked for that could not run here (the Triton attention ran instead)
                    not_run=op.not_run(),
                ))
                sys.stdout.write("row " + _row_line(rows[-1]))  # progress (the table comes last)
                sys.stdout.flush()
        del steps, last

    gpu = torch.cuda.get_device_name()
    import triton
    import vllm

    rows.sort(key=lambda r: (r["length"], r["max_density"], list(VARIANTS).index(r["variant"])))
    configs = {v: op.config.__dict__ for v, op in ops.items()}
    report = dict(gpu=gpu, vllm=vllm.__version__, triton=triton.__version__, torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), command=command_line(),
                  model=args.model, shape=dict(**asdict(shape), block=BLOCK, stride=STRIDE,
                                               n_last=N_LAST, chunk=args.chunk),
                  configs=configs, selection_agreement=agreement, sweep=sweep_lines, rows=rows,
                  estimate_vs_gemm=floors)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.best_env and "default" in ops:
        from vllm_trianglemix.settings import XATTN_CONFIG

        with open(args.best_env, "w") as f:
            f.write(f"export {XATTN_CONFIG}={ops['default'].config.as_text()}\n")
    w = sys.stdout.write
    w(f"\nGPU {gpu}, vLLM {vllm.__version__}, Triton {triton.__version__}, chunk {args.chunk}, "
      f"shape {heads}/{kv_heads}/{dim} page {shape.page}\n")
    for v, op in ops.items():
        w(f"config: {v} {op.config}\n")
    w("\n| length | density (achieved) | kernels (attention) | repack ms | estimate ms | select ms | sparse attn ms | dense rows ms "
      "| layer ms | FA3 dense ms | layer / FA3 | keep-all vs FA3 |\n")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        w(_row_line(r))
    w("\n| length | estimate ms (the first row above) | its TFLOP/s | cuBLAS GEMM of its operands, "
      "every key group ms | cuBLAS TFLOP/s | estimate / GEMM time |\n|---|---|---|---|---|---|\n")
    for f in floors:
        first = next(r for r in rows if r["length"] == f["length"])
        w(f"| {f['length']} | {first['est_ms']:.2f} | {f['estimate_tflop'] / first['est_ms'] * 1e3:.0f} | "
          f"{f['gemm_ms']:.2f} | {f['gemm_tflop'] / f['gemm_ms'] * 1e3:.0f} | {first['est_ms'] / f['gemm_ms']:.2f} |\n")
    for v, why in {r["variant"]: r["not_run"] for r in rows if r["not_run"]}.items():
        w(f"\n{v}: did not run as configured ({why}); its rows are the Triton attention's\n")
    return 0
