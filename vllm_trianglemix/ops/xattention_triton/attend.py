"""Attend: block-sparse causal attention of each query block over its kept key blocks.

A program per (item, KV head, row tile) packs the rows of the query heads that
share the KV head (GQA) and iterates over the kept blocks before the diagonal
only (every key visible to every row: no mask), then the diagonal block with
the causal mask; online softmax in float32, exp2. K/V come from the repacked
contiguous buffers (repack.py): tiles at affine addresses, no block-table
lookup per key (on the H200 this beat reading the paged cache through the
block table by a quarter: BENCHMARKS.md). On Hopper, FlashAttention's
CuTe-DSL forward takes this stage where it can (attend_cute.py); this kernel
runs elsewhere (other GPUs, fp8 caches, other block sizes).

fp8 (e4m3) caches and an fp8 query are read as the triangle kernel reads them:
converted exactly to bf16/fp16 for ``tl.dot``, ``q_scale * k_scale`` folded
into the score scale, ``v_scale`` into the output.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_trianglemix.ops.triangle_triton import LOG2E, _fp8_scales, _next_pow2


@triton.jit
def _program_item(items, num_kv_heads, ROW_TILES: tl.constexpr):
    """This program's (row tile, KV head, item) and the item's fields (QUERY_BLOCK_FIELDS order)."""
    pid = tl.program_id(0)
    rt = pid % ROW_TILES
    rest = pid // ROW_TILES
    kv_head = rest % num_kv_heads
    item = rest // num_kv_heads
    it = items + item * 5
    return (rt, kv_head, item, tl.load(it + 0), tl.load(it + 1), tl.load(it + 2), tl.load(it + 3),
            tl.load(it + 4))


@triton.jit(do_not_specialize=["stride_ki", "rows_per_head"])
def _attend_packed_kernel(
    Q, KP, VP, O, items, req_offset, kept, n_kept, diag_kept,
    stride_qt, stride_qh, stride_ot, stride_oh, rows_per_head, stride_ki, num_kv_heads, block_size,
    qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr, stride_q_scale, stride_k_scale, stride_v_scale,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, ROW_TILES: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES_PER_BLOCK: tl.constexpr, HEAD_D: tl.constexpr,
    Q_FP8: tl.constexpr, KV_FP8: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    rt, kv_head, item, req, q_tok, q_pos0, n_q, b = _program_item(items, num_kv_heads, ROW_TILES)
    i_lo = rt * BLOCK_Q
    if i_lo < n_q:
        offs_m = tl.arange(0, BLOCK_M)
        g = offs_m // BLOCK_Q
        i = i_lo + offs_m % BLOCK_Q
        row_ok = (g < GROUP) & (i < n_q)
        q_head = (kv_head * GROUP + g).to(tl.int64)
        tok = (q_tok + i).to(tl.int64)
        offs_d = tl.arange(0, HEAD_D)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + tok[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        if Q_FP8:
            q = q.to(O.dtype.element_ty)
        qk_scale, out_scale = _fp8_scales(qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr, kv_head,
                                          stride_q_scale, stride_k_scale, stride_v_scale, Q_FP8, KV_FP8)
        row0 = kv_head * rows_per_head + tl.load(req_offset + req)  # the request's first row
        k_base = KP + row0.to(tl.int64) * HEAD_D
        v_base = VP + row0.to(tl.int64) * HEAD_D
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
        sel = (item * num_kv_heads + kv_head).to(tl.int64)
        kept_row = kept + sel * stride_ki
        # Kept blocks before the diagonal: every key is visible to every row.
        for u in range(0, tl.load(n_kept + sel) * TILES_PER_BLOCK):
            j = tl.load(kept_row + u // TILES_PER_BLOCK)
            k0 = j * block_size + (u % TILES_PER_BLOCK) * BLOCK_N
            k_idx = (k0 + offs_n).to(tl.int64)
            k = tl.load(k_base + k_idx[None, :] * HEAD_D + offs_d[:, None])
            if KV_FP8:
                k = k.to(q.dtype)
            s = tl.dot(q, k) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + k_idx[:, None] * HEAD_D + offs_d[None, :])
            if KV_FP8:
                v = v.to(q.dtype)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        # The diagonal block: causal.
        if tl.load(diag_kept + sel) != 0:
            q_pos = q_pos0 + i
            hi = q_pos0 + tl.minimum(n_q, i_lo + BLOCK_Q)  # keys past the tile's last row: none
            lo = b * block_size
            for t in range(tl.cdiv(hi - lo, BLOCK_N)):
                k_pos = lo + t * BLOCK_N + offs_n
                in_range = k_pos < hi
                k_idx = k_pos.to(tl.int64)
                k = tl.load(k_base + k_idx[None, :] * HEAD_D + offs_d[:, None], mask=in_range[None, :],
                            other=0.0)
                if KV_FP8:
                    k = k.to(q.dtype)
                s = tl.dot(q, k) * qk_scale
                s = tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_base + k_idx[:, None] * HEAD_D + offs_d[None, :], mask=in_range[:, None],
                            other=0.0)
                if KV_FP8:
                    v = v.to(q.dtype)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                m_i = m_new
        out = acc * (out_scale / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
        tl.store(O + tok[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])


def attend_shape(config, group_p: int, block_size: int):
    """(keys per tile, query rows per program, row tiles per query block)."""
    block_n = min(_next_pow2(config.block_n), block_size & -block_size)  # a power of two dividing B
    block_q = max(config.block_m // group_p, 16 // group_p, 1)
    block_q = min(block_q, _next_pow2(block_size))
    return block_n, block_q, -(-block_size // block_q)


def attend(op, query, prepared, params, scale: float, output, blocks, fp8, packed) -> None:
    """Block-sparse attention of every item's rows over its kept blocks into ``output``;
    ``packed``: the step's repacked keys and values (op.Packed)."""
    cfg = op.config
    B = params.block_size
    block_n, block_q, row_tiles = attend_shape(cfg, op.group_p, B)
    assert query.stride(-1) == 1 and output.stride(-1) == 1
    kept = blocks.kept.reshape(-1, blocks.kept.shape[-1])  # row item * kv_heads + kv_head
    assert blocks.n_kept.is_contiguous() and blocks.diag_kept.is_contiguous() and kept.stride(1) == 1
    kp, vp = packed.keys, packed.values
    _attend_packed_kernel[(prepared.num_items * op.num_kv_heads * row_tiles,)](
        query, kp, vp, output, prepared.items, packed.groups.req_offset, kept, blocks.n_kept,
        blocks.diag_kept, query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        kp.shape[1], kept.stride(0), op.num_kv_heads, B, scale * LOG2E, *fp8.pointers, *fp8.strides,
        GROUP=op.group, GROUP_P=op.group_p, BLOCK_Q=block_q, ROW_TILES=row_tiles, BLOCK_N=block_n,
        TILES_PER_BLOCK=B // block_n, HEAD_D=op.head_size, Q_FP8=fp8.q_fp8, KV_FP8=fp8.kv_fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
