"""Dynamic (XAttention) rows in Triton, read straight from vLLM's paged KV cache (GPU path).

Executes a :class:`~vllm_trianglemix.pattern.QueryBlockPlan` in three steps,
all on the device and without a host synchronisation:

1. **Estimate**: the antidiagonal scores ``a(g, h)`` of
   :mod:`vllm_trianglemix.pattern`, a softmax per query group and the block
   masses, float32 ``[items, kv_heads, blocks]``. A tile's scores are ``S``
   dots ``Q_s K_s^T`` (``Q_s`` row ``g`` = the query at ``g*S + S-1-s``,
   ``K_s`` column ``h`` = the key at ``h*S + s``): one GEMM with inner
   dimension ``S*d``, bf16/fp16 inputs, float32 accumulation. Absent rows
   load as zero (they add no term); the diagonal group ``h == g`` takes the
   causal half of its terms, computed separately; undefined scores are
   ``-inf``. The softmax per query group is exact: one pass over the keys
   keeps, per row and key tile, the running max and the block sums relative
   to it in a float32 scratch buffer, then rescales them to the final max and
   sum. Two kernels (``est_kernel``):

   * **2** (default): the keys of each request are first repacked, in one
     pass, into a contiguous ``[kv_heads, keys, d]`` buffer (fp8 converted
     exactly to bf16/fp16), so that ``K_s`` tiles are plain strided loads with
     no block-table lookups; a program takes one KV head and several
     consecutive query blocks of one request (``est2_block_m`` rows: query
     groups x query heads x blocks), so a key tile serves them all.
   * **1**: a program per (query block, KV head, row tile), keys gathered
     from the paged cache through the block table row by row; one pass with
     scratch (``est_one_pass``) or two passes (row max and sum, then
     normalised block sums).

2. **Select**: the rule of :func:`~vllm_trianglemix.pattern.select_key_blocks`
   (first block, diagonal block, fewest others by mass, ties to the lower
   index, the threshold compared in float64, the density cap), compacted into
   per (item, KV head) the ascending list of kept off-diagonal blocks, their
   count and whether the diagonal block is kept. ``select_kernel`` 1: one
   Triton program per (item, KV head) finds the kept set without sorting (a
   binary search over the float32 masses' bit patterns for the cut value,
   ties taken by index); 0: the torch function and a torch compaction.
3. **Attend** (one Triton launch): a program per (item, KV head, row tile)
   with the group's query heads packed, iterating over the kept key blocks
   only (online softmax in float32, exp2), the causal mask only in the
   diagonal block (through the triangle kernel's ``_attend_tiles`` with every
   row dense).

fp8 (e4m3) caches and an fp8 query are read as the triangle kernel reads
them: converted exactly to bf16/fp16 for ``tl.dot``, ``q_scale * k_scale``
folded into the score scale, ``v_scale`` into the output.

Items come heaviest first (the plan orders them), so long rows start first.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError
from vllm.logger import init_logger

from vllm_trianglemix.ops.fp8 import Fp8Scales, kernel_fp8_args
from vllm_trianglemix.ops.triangle_triton import (
    LOG2E,
    _attend_tiles,
    _fp8_scales,
    _load_cache,
    _load_cache_t,
    _next_pow2,
    with_overrides,
)
from vllm_trianglemix.pattern import (
    QUERY_BLOCK_FIELDS,
    DynamicParams,
    QueryBlockPlan,
    select_key_blocks,
)
from vllm_trianglemix.selection import SUPPORTED_HEAD_SIZES_CUDA, dynamic_gpu_problems

CONFIG_ENV = "VLLM_TRIANGLEMIX_XATTN_CONFIG"
COMPILE_ERRORS = (CompilationError, OutOfResources, PTXASError)
"""What a kernel that does not build on this GPU raises (before anything is launched)."""

logger = init_logger("vllm.trianglemix")
ITEM_WIDTH = len(QUERY_BLOCK_FIELDS)  # req, q_tok, q_pos, n_q, q_block
SUPER_HEAD = 4  # a group of query blocks: req, key offset in the repacked buffer, key blocks, keys


# -- 1. Estimate, kernel 1 (per query block, paged keys) --------------------------

@triton.jit
def _antidiagonal_scores(
    Q, K, bt_row, q_tok, q_pos0, end, t, b, kv_head, q_head,
    grow0, g_abs, row_ok, present_any, diag, diag_def,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_kd, page_size, qk_scale,
    S: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, KB: tl.constexpr,
    BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, Q_FP8: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Scores (log2 units) of the tile's rows against key tile ``t`` (blocks ``t*KB ..``), -inf where undefined."""
    N: tl.constexpr = KB * G_P
    cols = tl.arange(0, N)
    j_col = t * KB + cols // G_P
    h = j_col * G + cols % G_P  # absolute key group
    col_ok = (cols % G_P < G) & (j_col <= b)
    offs_d = tl.arange(0, HEAD_D)
    acc = tl.zeros([BLOCK_M, N], dtype=tl.float32)
    for s in range(S):
        r = grow0 + (S - 1 - s)  # the row paired with key h*S + s
        ok = row_ok & (r >= q_pos0) & (r < end)
        tok = (q_tok + r - q_pos0).to(tl.int64)
        q_s = tl.load(Q + tok[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
                      mask=ok[:, None], other=0.0)
        if Q_FP8:
            q_s = q_s.to(tl.float16)  # exact (e4m3 values are fp16 values); q_scale is in qk_scale
        kp = h * S + s
        kok = col_ok & (kp < end)
        blk = tl.load(bt_row + kp // page_size, mask=kok, other=0).to(tl.int64)
        slot = (kp % page_size).to(tl.int64)
        k_s = _load_cache_t(K, blk, slot, kv_head, stride_kb, stride_ks, stride_kh, stride_kd,
                            offs_d, kok, q_s, KV_FP8, True)
        acc = tl.dot(q_s, k_s, acc)
    on_diag = h[None, :] == g_abs[:, None]
    sc = tl.where(on_diag, diag[:, None], acc) * qk_scale
    defined = ((h[None, :] < g_abs[:, None]) & present_any[:, None]) | (on_diag & diag_def[:, None])
    return tl.where(defined & col_ok[None, :], sc, float("-inf"))


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


@triton.jit
def _xattn_estimate_kernel(
    Q, K, MASS, BSUM, TMAX, items, block_table,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_kd, stride_bt,
    num_kv_heads, max_blocks, max_tiles, page_size, qk_scale,
    q_scale_ptr, k_scale_ptr, v_scale_ptr, stride_q_scale, stride_k_scale, stride_v_scale,
    GROUP: tl.constexpr, S: tl.constexpr, HALF: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
    KB: tl.constexpr, BLOCK_M: tl.constexpr, ROW_TILES: tl.constexpr, HEAD_D: tl.constexpr,
    ONE_PASS: tl.constexpr, Q_FP8: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Block masses of one (item, KV head, row tile).

    Two passes over the keys (row max and sum, then normalised block sums), or
    with ``ONE_PASS`` one pass that keeps, per row and tile, the running max
    and the block sums relative to it in a scratch buffer (``BSUM``/``TMAX``)
    and rescales them to the final max and sum afterwards: the same sums.
    """
    rt, kv_head, item, req, q_tok, q_pos0, n_q, b = _program_item(items, num_kv_heads, ROW_TILES)
    end = q_pos0 + n_q
    bt_row = block_table + req.to(tl.int64) * stride_bt
    qk_scale, _ = _fp8_scales(qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr, kv_head,
                              stride_q_scale, stride_k_scale, stride_v_scale, Q_FP8, KV_FP8)

    # Rows: (query head of the group, query group of block b).
    rows = rt * BLOCK_M + tl.arange(0, BLOCK_M)
    hh = rows // G_P
    gl = rows % G_P
    row_ok = (hh < GROUP) & (gl < G)
    q_head = (kv_head * GROUP + hh).to(tl.int64)
    g_abs = b * G + gl
    grow0 = g_abs * S
    present_any = row_ok & (tl.maximum(grow0, q_pos0) < tl.minimum(grow0 + S, end))
    diag_def = row_ok & (tl.maximum(grow0 + S - HALF, q_pos0) < tl.minimum(grow0 + S, end))

    # The diagonal group: only its causal terms s < HALF.
    offs_d = tl.arange(0, HEAD_D)
    diag = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(HALF):
        r = grow0 + (S - 1 - s)
        ok = row_ok & (r >= q_pos0) & (r < end)
        tok = (q_tok + r - q_pos0).to(tl.int64)
        q_s = tl.load(Q + tok[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
                      mask=ok[:, None], other=0.0)
        kp = grow0 + s
        blk = tl.load(bt_row + kp // page_size, mask=ok, other=0).to(tl.int64)
        slot = (kp % page_size).to(tl.int64)
        k_s = _load_cache(K, blk, slot, kv_head, stride_kb, stride_ks, stride_kh, stride_kd,
                          offs_d, ok, q_s, False, True)
        diag += tl.sum(q_s.to(tl.float32) * k_s.to(tl.float32), 1)

    n_tiles = tl.cdiv(b + 1, KB)
    N: tl.constexpr = KB * G_P
    col_block = tl.arange(0, N) // G_P
    kb = tl.arange(0, KB)
    prog = ((item * num_kv_heads + kv_head) * ROW_TILES + rt).to(tl.int64)
    out = MASS + prog * max_blocks
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ONE_PASS:
        local = tl.arange(0, BLOCK_M).to(tl.int64)
        bsum_rows = BSUM + (prog * BLOCK_M + local) * (max_tiles * KB)
        tmax_rows = TMAX + (prog * BLOCK_M + local) * max_tiles
        for t in range(n_tiles):
            sc = _antidiagonal_scores(
                Q, K, bt_row, q_tok, q_pos0, end, t, b, kv_head, q_head, grow0, g_abs, row_ok,
                present_any, diag, diag_def, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_kd, page_size, qk_scale, S, G, G_P, KB, BLOCK_M, HEAD_D, Q_FP8, KV_FP8,
            )
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(sc - m_safe[:, None])
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(p, 1)
            m_i = m_new
            block_sums = tl.sum(tl.reshape(p, (BLOCK_M, KB, G_P)), 2)  # relative to m_new
            tl.store(bsum_rows[:, None] + (t * KB + kb)[None, :], block_sums)
            tl.store(tmax_rows + t, m_new)
        tl.debug_barrier()  # this program's scratch, written by other threads
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
        for t in range(n_tiles):
            t_max = tl.load(tmax_rows + t)
            factor = tl.where(t_max > float("-inf"), tl.exp2(t_max - m_safe), 0.0) * inv_l
            block_sums = tl.load(bsum_rows[:, None] + (t * KB + kb)[None, :])
            mass = tl.sum(block_sums * factor[:, None], 0)
            j = t * KB + kb
            tl.store(out + j, mass, mask=j <= b)
    else:
        # Pass 1: each row's max and sum over its defined key groups.
        for t in range(n_tiles):
            sc = _antidiagonal_scores(
                Q, K, bt_row, q_tok, q_pos0, end, t, b, kv_head, q_head, grow0, g_abs, row_ok,
                present_any, diag, diag_def, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_kd, page_size, qk_scale, S, G, G_P, KB, BLOCK_M, HEAD_D, Q_FP8, KV_FP8,
            )
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(sc - m_safe[:, None]), 1)
            m_i = m_new
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
        # Pass 2: normalised block sums over the rows (query groups and heads).
        for t in range(n_tiles):
            sc = _antidiagonal_scores(
                Q, K, bt_row, q_tok, q_pos0, end, t, b, kv_head, q_head, grow0, g_abs, row_ok,
                present_any, diag, diag_def, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_kd, page_size, qk_scale, S, G, G_P, KB, BLOCK_M, HEAD_D, Q_FP8, KV_FP8,
            )
            p = tl.exp2(sc - m_safe[:, None]) * inv_l[:, None]
            col = tl.sum(p, 0)
            mass = tl.sum(tl.where(col_block[None, :] == kb[:, None], col[None, :], 0.0), 1)
            j = t * KB + kb
            tl.store(out + j, mass, mask=j <= b)


# -- 1. Estimate, kernel 2 (repacked keys, several query blocks per program) -------

@triton.jit
def _repack_keys_kernel(
    K, KP, reqs, block_table,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_bt, stride_ph, page_size,
    RB: tl.constexpr, HEAD_D: tl.constexpr,
):
    """Keys ``[off, off + n_pad)`` of one request and KV head into ``KP[kv_head, off + pos, :]``.

    ``reqs`` rows: (req, off, keys, n_pad); keys past ``keys`` are written as zeros.
    fp8 caches are converted exactly to KP's dtype (bf16/fp16); the scale stays out.
    """
    c = tl.program_id(0)
    r = tl.program_id(1)
    kv_head = tl.program_id(2)
    req = tl.load(reqs + r * 4 + 0)
    off = tl.load(reqs + r * 4 + 1)
    n_keys = tl.load(reqs + r * 4 + 2)
    n_pad = tl.load(reqs + r * 4 + 3)
    if c * RB < n_pad:
        pos = c * RB + tl.arange(0, RB)
        ok = pos < n_keys
        blk = tl.load(block_table + req.to(tl.int64) * stride_bt + pos // page_size, mask=ok, other=0).to(tl.int64)
        slot = (pos % page_size).to(tl.int64)
        offs_d = tl.arange(0, HEAD_D)
        k = tl.load(K + blk[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                    + offs_d[None, :] * stride_kd, mask=ok[:, None], other=0.0)
        dst = KP + kv_head.to(tl.int64) * stride_ph + (off + pos).to(tl.int64)[:, None] * HEAD_D + offs_d[None, :]
        tl.store(dst, k.to(KP.dtype.element_ty), mask=(pos < n_pad)[:, None])


@triton.jit
def _load_keys_t(KP, kp_base, K, bt_row, kv_head, kp, ok,
                 stride_kb, stride_ks, stride_kh, stride_kd, page_size, offs_d, like,
                 REPACKED: tl.constexpr, MASKED: tl.constexpr, KV_FP8: tl.constexpr, HEAD_D: tl.constexpr):
    """Keys at positions ``kp`` as a ``[HEAD_D, n]`` tile, from the repacked buffer or the paged cache."""
    if REPACKED:
        ptrs = kp_base + kp.to(tl.int64)[None, :] * HEAD_D + offs_d[:, None]
        if MASKED:
            k = tl.load(ptrs, mask=ok[None, :], other=0.0)
        else:
            k = tl.load(ptrs)
    else:
        blk = tl.load(bt_row + kp // page_size, mask=ok, other=0).to(tl.int64)
        slot = (kp % page_size).to(tl.int64)
        k = _load_cache_t(K, blk, slot, kv_head, stride_kb, stride_ks, stride_kh, stride_kd,
                          offs_d, ok, like, KV_FP8, True)
    return k


@triton.jit
def _xattn_estimate_packed_kernel(
    Q, KP, K, MASS, BSUM, TMAX, items, supers, block_table,
    stride_qt, stride_qh, stride_ph, stride_kb, stride_ks, stride_kh, stride_kd, stride_bt,
    num_kv_heads, max_blocks, max_tiles, page_size, qk_scale, super0,
    q_scale_ptr, k_scale_ptr, v_scale_ptr, stride_q_scale, stride_k_scale, stride_v_scale,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, S: tl.constexpr, HALF: tl.constexpr,
    G: tl.constexpr, G_P: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr, QB: tl.constexpr,
    ROW_TILES: tl.constexpr, HEAD_D: tl.constexpr, REPACKED: tl.constexpr,
    Q_FP8: tl.constexpr, KV_FP8: tl.constexpr, FP8_DOT: tl.constexpr,
):
    """Block masses of up to ``QB`` consecutive query blocks of one request, one KV head, one row tile.

    ``FP8_DOT`` (fp8 query and fp8 keys): the dots take the e4m3 values as they are; their
    products are exact in float32 and the accumulation is kept float32
    (``max_num_imprecise_acc=0``), so the scores equal the fp16 path's.

    Rows are (block of the group, query head, query group); each row's softmax
    is its own, so rows of different blocks share the key tiles and nothing
    else. One pass with scratch, as kernel 1's ``ONE_PASS``.
    """
    pid = tl.program_id(0)
    rt = pid % ROW_TILES
    rest = pid // ROW_TILES
    kv_head = rest % num_kv_heads
    sp = supers + (super0 + rest // num_kv_heads).to(tl.int64) * (4 + QB)
    req = tl.load(sp + 0)
    kp_off = tl.load(sp + 1)
    nb = tl.load(sp + 2)  # key blocks of the group's last query block (its index + 1)
    n_keys = tl.load(sp + 3)  # keys the group reads (the end of its last present row)
    bt_row = block_table + req.to(tl.int64) * stride_bt
    kp_base = KP + kv_head.to(tl.int64) * stride_ph + kp_off.to(tl.int64) * HEAD_D
    qk_scale, _ = _fp8_scales(qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr, kv_head,
                              stride_q_scale, stride_k_scale, stride_v_scale, Q_FP8, KV_FP8)

    ROWS_PER_BLOCK: tl.constexpr = GROUP_P * G_P
    rows = rt * BLOCK_M + tl.arange(0, BLOCK_M)
    qb = rows // ROWS_PER_BLOCK
    hh = (rows // G_P) % GROUP_P
    gl = rows % G_P
    item = tl.load(sp + 4 + qb)  # -1: no block in this slot
    has = item >= 0
    it = items + tl.where(has, item, 0).to(tl.int64) * 5
    q_tok = tl.load(it + 1)
    q_pos0 = tl.load(it + 2)
    end = q_pos0 + tl.load(it + 3)
    b = tl.load(it + 4)
    row_ok = has & (hh < GROUP) & (gl < G)
    q_head = (kv_head * GROUP + hh).to(tl.int64)
    g_abs = b * G + gl
    grow0 = g_abs * S
    present_any = row_ok & (tl.maximum(grow0, q_pos0) < tl.minimum(grow0 + S, end))
    diag_def = row_ok & (tl.maximum(grow0 + S - HALF, q_pos0) < tl.minimum(grow0 + S, end))

    # The diagonal group: only its causal terms s < HALF.
    offs_d = tl.arange(0, HEAD_D)
    diag = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(HALF):
        r = grow0 + (S - 1 - s)
        ok = row_ok & (r >= q_pos0) & (r < end)
        tok = (q_tok + r - q_pos0).to(tl.int64)
        q_s = tl.load(Q + tok[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
                      mask=ok[:, None], other=0.0)
        k_s = tl.trans(_load_keys_t(KP, kp_base, K, bt_row, kv_head, grow0 + s, ok, stride_kb, stride_ks,
                                    stride_kh, stride_kd, page_size, offs_d, q_s, REPACKED, True, False,
                                    HEAD_D))
        diag += tl.sum(q_s.to(tl.float32) * k_s.to(tl.float32), 1)

    N: tl.constexpr = KB * G_P
    cols = tl.arange(0, N)
    kb = tl.arange(0, KB)
    n_tiles = tl.cdiv(nb, KB)
    local = tl.arange(0, BLOCK_M).to(tl.int64)
    bsum_rows = BSUM + (pid.to(tl.int64) * BLOCK_M + local) * (max_tiles * KB)
    tmax_rows = TMAX + (pid.to(tl.int64) * BLOCK_M + local) * max_tiles
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(n_tiles):
        j_col = t * KB + cols // G_P
        h = j_col * G + cols % G_P  # absolute key group
        col_ok = (cols % G_P < G) & (j_col < nb)
        acc = tl.zeros([BLOCK_M, N], dtype=tl.float32)
        for s in range(S):
            r = grow0 + (S - 1 - s)  # the row paired with key h*S + s
            ok = row_ok & (r >= q_pos0) & (r < end)
            tok = (q_tok + r - q_pos0).to(tl.int64)
            q_s = tl.load(Q + tok[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
                          mask=ok[:, None], other=0.0)
            if Q_FP8:
                if not FP8_DOT:
                    q_s = q_s.to(tl.float16)  # exact (e4m3 values are fp16 values); q_scale is in qk_scale
            kp = h * S + s
            # The repacked buffer holds whole tiles (zeros past the keys): masks only for padded columns.
            k_s = _load_keys_t(KP, kp_base, K, bt_row, kv_head, kp, col_ok & (kp < n_keys), stride_kb,
                               stride_ks, stride_kh, stride_kd, page_size, offs_d, q_s, REPACKED,
                               G != G_P, KV_FP8, HEAD_D)
            if FP8_DOT:
                acc = tl.dot(q_s, k_s, acc, max_num_imprecise_acc=0)
            else:
                acc = tl.dot(q_s, k_s, acc)
        on_diag = h[None, :] == g_abs[:, None]
        sc = tl.where(on_diag, diag[:, None], acc) * qk_scale
        defined = ((h[None, :] < g_abs[:, None]) & present_any[:, None]) | (on_diag & diag_def[:, None])
        sc = tl.where(defined & col_ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(p, 1)
        m_i = m_new
        block_sums = tl.sum(tl.reshape(p, (BLOCK_M, KB, G_P)), 2)  # relative to m_new
        tl.store(bsum_rows[:, None] + (t * KB + kb)[None, :], block_sums)
        tl.store(tmax_rows + t, m_new)
    tl.debug_barrier()  # this program's scratch, written by other threads
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    for t in range(n_tiles):
        t_max = tl.load(tmax_rows + t)
        factor = tl.where(t_max > float("-inf"), tl.exp2(t_max - m_safe), 0.0) * inv_l
        weighted = tl.load(bsum_rows[:, None] + (t * KB + kb)[None, :]) * factor[:, None]
        j = t * KB + kb
        for q in tl.static_range(QB):
            item_q = tl.load(sp + 4 + q)
            if item_q >= 0:
                b_q = tl.load(items + item_q.to(tl.int64) * 5 + 4)
                mass = tl.sum(tl.where((qb == q)[:, None], weighted, 0.0), 0)
                out = MASS + ((item_q.to(tl.int64) * num_kv_heads + kv_head) * ROW_TILES + rt) * max_blocks
                tl.store(out + j, mass, mask=j <= b_q)


# -- 2. Select ---------------------------------------------------------------------

@triton.jit
def _count_at_least(key, x):
    return tl.sum((key >= x).to(tl.int32), 0)


@triton.jit
def _select_kernel(
    MASS, q_block, PARAMS, KEPT, N_KEPT, DIAG_KEPT, KEEP,
    num_kv_heads, max_blocks, stride_kept,
    ROW_TILES: tl.constexpr, NB_P: tl.constexpr, USE_TAU: tl.constexpr, HAS_CAP: tl.constexpr,
    WRITE_KEEP: tl.constexpr,
):
    """The kept blocks of one (item, KV head): the rule of ``pattern.select_key_blocks``.

    Masses are non-negative float32, so their bit patterns order like their
    values and the "others" (not first, not diagonal) in the rule's order are
    those with a larger pattern, then equal patterns by index. The threshold
    cut and the cap cut are each found as a cut value (a binary search over
    patterns, 31 halvings) plus a count of equal masses taken by index;
    normalised masses and sums are float64, as in the torch rule.
    """
    pid = tl.program_id(0)
    item = pid // num_kv_heads
    b = tl.load(q_block + item)
    j = tl.arange(0, NB_P)
    causal = j <= b
    base = MASS + pid.to(tl.int64) * (ROW_TILES * max_blocks)
    m32 = tl.load(base + j, mask=causal, other=0.0)
    for rt in range(1, ROW_TILES):
        m32 += tl.load(base + rt * max_blocks + j, mask=causal, other=0.0)
    forced = causal & ((j == 0) | (j == b))
    other = causal & (j != 0) & (j != b)
    m = tl.where(causal, m32.to(tl.float64), 0.0)
    total = tl.sum(m, 0)
    m = m / tl.where(total > 0.0, total, 1.0)
    forced_mass = tl.sum(tl.where(forced, m, 0.0), 0)
    bits = m32.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(other, tl.where(m32 > 0.0, bits, 0), -1)  # -1: not a candidate
    n_others = tl.sum(other.to(tl.int32), 0)
    take = n_others
    if USE_TAU:
        # The smallest prefix whose kept mass reaches tau: cut value v = the largest mass
        # with forced + sum(masses >= v) >= tau; above v all are taken, at v by index.
        tau = tl.load(PARAMS + 0)
        lo = b * 0  # int64 scalars: bit patterns [lo, hi)
        hi = b * 0 + 0x7F800001
        for _ in range(31):
            mid = (lo + hi) // 2
            reach = forced_mass + tl.sum(tl.where(key >= mid, m, 0.0), 0)
            lo = tl.where(reach >= tau, mid, lo)
            hi = tl.where(reach >= tau, hi, mid)
        above = forced_mass + tl.sum(tl.where(key > lo, m, 0.0), 0)
        ties = key == lo
        tie_mass = tl.max(tl.where(ties, m, 0.0), 0)
        tie_rank = tl.cumsum(ties.to(tl.int32), 0) - 1
        take = tl.sum((key > lo).to(tl.int32), 0) + tl.sum(
            (ties & (above + tie_rank.to(tl.float64) * tie_mass < tau)).to(tl.int32), 0)
    if HAS_CAP:
        # at most max(2, ceil(max_density * (b + 1))) blocks, the forced ones included
        x = tl.load(PARAMS + 1) * (b + 1).to(tl.float64)
        cap = x.to(tl.int64)
        cap = tl.maximum(cap + (cap.to(tl.float64) < x).to(tl.int64), 2)
        n_forced = tl.sum(forced.to(tl.int32), 0)
        take = tl.minimum(take, tl.maximum(cap - n_forced, 0).to(tl.int32))
    # The first `take` others in the rule's order: cut value = the take-th largest mass.
    lo = b * 0
    hi = b * 0 + 0x7F800001
    for _ in range(31):
        mid = (lo + hi) // 2
        enough = _count_at_least(key, mid) >= take
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    ties = key == lo
    tie_rank = tl.cumsum(ties.to(tl.int32), 0) - 1
    n_above = tl.sum((key > lo).to(tl.int32), 0)
    taken = other & ((key > lo) | (ties & (tie_rank < take - n_above)))
    keep = forced | taken
    before = keep & (j < b)
    rank = tl.cumsum(before.to(tl.int32), 0) - 1
    tl.store(KEPT + pid.to(tl.int64) * stride_kept + rank, j.to(tl.int32), mask=before)
    tl.store(N_KEPT + pid, tl.sum(before.to(tl.int32), 0))
    tl.store(DIAG_KEPT + pid, tl.sum((keep & (j == b)).to(tl.int32), 0))
    if WRITE_KEEP:
        tl.store(KEEP + pid.to(tl.int64) * max_blocks + j, keep.to(tl.int8), mask=j < max_blocks)


# -- 3. Attend -----------------------------------------------------------------

@triton.jit
def _xattn_attention_kernel(
    Q, K, V, O, items, block_table, kept, n_kept, diag_kept,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt, stride_ki, stride_kk, num_kv_heads, page_size, block_size, qk_scale,
    q_scale_ptr, k_scale_ptr, v_scale_ptr, stride_q_scale, stride_k_scale, stride_v_scale,
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
        q = tl.load(Q + tok[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        if Q_FP8:
            q = q.to(O.dtype.element_ty)
        qk_scale, out_scale = _fp8_scales(qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr, kv_head,
                                          stride_q_scale, stride_k_scale, stride_v_scale, Q_FP8, KV_FP8)
        q_pos = q_pos0 + i
        q_lo = q_pos0 + i_lo
        q_hi = q_pos0 + tl.minimum(n_q, i_lo + BLOCK_Q) - 1
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
        bt_row = block_table + req.to(tl.int64) * stride_bt
        sel = (item * num_kv_heads + kv_head).to(tl.int64)
        kept_row = kept + sel * stride_ki
        # Kept blocks before the diagonal: every key is visible to every row.
        n_tiles = tl.load(n_kept + sel) * TILES_PER_BLOCK
        offs_n = tl.arange(0, BLOCK_N)
        for u in range(n_tiles):
            j = tl.load(kept_row + (u // TILES_PER_BLOCK) * stride_kk)
            k_idx = j * block_size + (u % TILES_PER_BLOCK) * BLOCK_N + offs_n
            blk = tl.load(bt_row + k_idx // page_size).to(tl.int64)
            slot = (k_idx % page_size).to(tl.int64)
            k = _load_cache_t(K, blk, slot, kv_head, stride_kb, stride_ks, stride_kh, stride_kd,
                              offs_d, offs_n, q, KV_FP8, False)
            s = tl.dot(q, k) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_cache(V, blk, slot, kv_head, stride_vb, stride_vs, stride_vh, stride_vd,
                            offs_d, offs_n, q, KV_FP8, False)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # The diagonal block: causal (every row dense for the triangle kernel's mask).
        if tl.load(diag_kept + sel) != 0:
            lo = b * block_size
            acc, m_i, l_i = _attend_tiles(
                acc, m_i, l_i, q, lo, 0, tl.cdiv(q_hi + 1 - lo, BLOCK_N), q_hi + 1,
                q_pos, q_lo, q_hi, 0, 0, 1, K, V, bt_row, page_size, kv_head,
                stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                qk_scale, BLOCK_N, HEAD_D, 1, KV_FP8,
            )
        out = acc * (out_scale / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
        tl.store(O + tok[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])


# -- The op ---------------------------------------------------------------------

@dataclass(frozen=True)
class XAttnKernelConfig:
    # Defaults: the kernels measured and tested on a GPU. Kernel 2 and the fused selection
    # (est_kernel=2,select_kernel=1) are exact in Triton's interpreter and not yet run on a GPU.
    est_kernel: int = 1  # 2: repacked keys, several query blocks per program; 1: per block, paged keys
    select_kernel: int = 0  # 1: fused Triton selection; 0: torch (select_key_blocks + compaction)
    # Kernel 1 (defaults: the fastest of `bench dynamic`'s sweep on the H100, BENCHMARKS.md, 2026-11-23).
    est_block_m: int = 128  # rows (query groups x heads) per estimate program, at most
    est_block_n: int = 256  # key groups per estimate tile (rounded to whole blocks)
    est_num_warps: int = 8
    est_num_stages: int = 2
    est_one_pass: int = 1  # 1: one pass over the keys with a scratch buffer; 0: two passes
    est_scratch_mb: int = 1024  # scratch limit per launch (kernel 1: larger take two passes;
    # kernel 2: larger are launched in slices)
    # Kernel 2 (predicted, not yet measured: benchmarks/NOTES.md).
    est2_block_m: int = 128  # rows (query groups x heads x query blocks) per program
    est2_block_n: int = 128  # key groups per tile (rounded to whole blocks)
    est2_num_warps: int = 8
    est2_num_stages: int = 2
    est2_repack: int = 1  # 1: keys repacked contiguous first; 0: read through the block table
    est2_fp8_dot: int = 0  # 1: with an fp8 cache and fp8 query, e4m3 dots (exact, float32 accumulation)
    # Attention.
    block_m: int = 256  # attention rows (query rows x heads) per program
    block_n: int = 64  # attention keys per tile (a divisor of block_size)
    num_warps: int = 8
    num_stages: int = 2

    @classmethod
    def default_for(cls, head_size: int) -> "XAttnKernelConfig":
        if head_size >= 256:
            return cls(est_block_n=64, est2_block_n=64, est2_num_stages=1, block_m=64, block_n=32,
                       num_warps=8, num_stages=1, est_num_stages=1)
        return cls()

    @classmethod
    def from_env(cls, head_size: int) -> "XAttnKernelConfig":
        """Defaults, with ``VLLM_TRIANGLEMIX_XATTN_CONFIG="block_n=32,est_num_warps=8"`` overrides."""
        config = cls.default_for(head_size)
        text = os.environ.get(CONFIG_ENV, "").strip()
        if not text:
            return config
        return config.with_overrides(text, CONFIG_ENV)

    def with_overrides(self, text: str, source: str = "config") -> "XAttnKernelConfig":
        return with_overrides(self, text, source)


@dataclass
class TritonDynamicPlan:
    items: torch.Tensor  # int32 [num_items, 5], QUERY_BLOCK_FIELDS order
    q_block: torch.Tensor  # int64 [num_items]
    block_table: torch.Tensor
    num_items: int
    num_blocks: int  # max q_block + 1
    host_items: np.ndarray | None = None  # int64 [num_items, 5] (groups for kernel 2 are built from it)
    groups: dict = field(default_factory=dict)  # kernel 2's groups, per (blocks per group, key tile)


@dataclass
class KeptBlocks:
    """Per (item, KV head): kept blocks before the diagonal (ascending), their count, diagonal kept."""

    kept: torch.Tensor  # int32 [items, kv_heads, >= count] (any strides)
    n_kept: torch.Tensor  # int32 [items, kv_heads], contiguous
    diag_kept: torch.Tensor  # int32 [items, kv_heads], contiguous
    keep: torch.Tensor | None = None  # bool [items, kv_heads, blocks] when asked for


def kept_blocks_from_mask(keep: torch.Tensor, q_block: torch.Tensor) -> KeptBlocks:
    """Compact a kept-block mask ``[items, kv, n]`` into the lists the attention kernel reads.

    Torch on the mask's device, no host synchronisation: each kept block before the
    diagonal is scattered to its rank among them (ascending); the others to a spare column.
    """
    items, kv, n = keep.shape
    j = torch.arange(n, device=keep.device)
    b = q_block.to(keep.device)[:, None, None]
    before = keep & (j < b)
    rank = torch.cumsum(before, -1) - 1
    kept = torch.zeros((items, kv, n + 1), dtype=torch.int32, device=keep.device)
    kept.scatter_(-1, torch.where(before, rank, n), j.to(torch.int32).expand(items, kv, n).contiguous())
    diag = (keep & (j == b)).any(-1)
    return KeptBlocks(kept, before.sum(-1).to(torch.int32), diag.to(torch.int32))


@dataclass
class _Groups:
    """Kernel 2's work: groups of consecutive query blocks of one request, and the repack table."""

    supers: torch.Tensor  # int32 [n, 4 + blocks per group]: req, key offset, key blocks, keys, items
    reqs: torch.Tensor  # int32 [r, 4]: req, key offset, keys, padded keys
    num_supers: int
    total_keys: int  # rows of the repacked buffer
    max_pad: int  # largest padded key count of one request


def group_query_blocks(items: np.ndarray, blocks_per_group: int, block_size: int,
                       tile_blocks: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Kernel 2's groups of an item table ``[n, 5]`` (QUERY_BLOCK_FIELDS order).

    Each group holds up to ``blocks_per_group`` consecutive query blocks of one
    request (items of one step), heaviest group first; each request's keys get
    ``[offset, offset + padded)`` in the repacked buffer, ``padded`` covering
    whole key tiles of ``tile_blocks`` blocks. Returns (groups, requests, total keys).
    """
    supers, reqs, offset = [], [], 0
    req_col, q_pos, n_q, q_block = items[:, 0], items[:, 2], items[:, 3], items[:, 4]
    for r in np.unique(req_col):
        idx = np.nonzero(req_col == r)[0]
        idx = idx[np.argsort(q_block[idx], kind="stable")]
        blocks_needed = int(q_block[idx].max()) + 1
        padded = -(-blocks_needed // tile_blocks) * tile_blocks * block_size
        n_keys = int((q_pos[idx] + n_q[idx]).max())
        reqs.append((int(r), offset, n_keys, padded))
        run_start = 0
        for k in range(1, len(idx) + 1):  # runs of consecutive blocks, cut into groups
            if k == len(idx) or q_block[idx[k]] != q_block[idx[k - 1]] + 1 or k - run_start == blocks_per_group:
                members = idx[run_start:k]
                last = members[-1]
                row = [int(r), offset, int(q_block[last]) + 1, int(q_pos[last] + n_q[last])]
                row += [int(i) for i in members] + [-1] * (blocks_per_group - len(members))
                supers.append(row)
                run_start = k
        offset += padded
    supers_arr = np.array(supers, dtype=np.int64).reshape(-1, SUPER_HEAD + blocks_per_group)
    supers_arr = supers_arr[np.argsort(-supers_arr[:, 2], kind="stable")]
    return supers_arr, np.array(reqs, dtype=np.int64).reshape(-1, 4), offset


class TritonXAttentionOp:
    """Plans and launches the dynamic-layer kernels for one model shape."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int,
                 config: XAttnKernelConfig | None = None):
        if head_size not in SUPPORTED_HEAD_SIZES_CUDA:
            raise ValueError(
                f"TriangleMix XAttention kernel: head size {head_size} not in {SUPPORTED_HEAD_SIZES_CUDA}")
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.group = num_heads // num_kv_heads
        self.group_p = _next_pow2(self.group)
        self.config = config or XAttnKernelConfig.from_env(head_size)
        if self.config.est_kernel not in (1, 2) or self.config.select_kernel not in (0, 1):
            raise ValueError(f"{CONFIG_ENV}: est_kernel must be 1 or 2 and select_kernel 0 or 1")
        self._select_params: dict[tuple, torch.Tensor] = {}

    def prepare(self, plan: QueryBlockPlan, dense_from: np.ndarray, cam) -> TritonDynamicPlan:
        device = cam.block_table_tensor.device
        items = np.stack([getattr(plan, f) for f in QUERY_BLOCK_FIELDS], axis=1).astype(np.int64)
        return TritonDynamicPlan(
            items=torch.from_numpy(items.astype(np.int32)).to(device, non_blocking=True),
            q_block=torch.from_numpy(plan.q_block.astype(np.int64)).to(device, non_blocking=True),
            block_table=cam.block_table_tensor,
            num_items=plan.num_items,
            num_blocks=int(plan.q_block.max()) + 1 if plan.num_items else 0,
            host_items=items,
        )

    # 1.
    def estimate(self, query, key_cache, prepared: TritonDynamicPlan, params: DynamicParams,
                 scale: float, scales: Fp8Scales | None = None) -> torch.Tensor:
        """Block masses ``[items, kv_heads, num_blocks]`` (float32; zero past each item's block)."""
        mass = self._estimate_row_tiles(query, key_cache, prepared, params, scale, scales)
        return mass[:, :, 0] if mass.shape[2] == 1 else mass.sum(2)

    def _estimate_row_tiles(self, query, key_cache, prepared, params, scale, scales):
        """Block masses per row tile ``[items, kv_heads, row_tiles, num_blocks]``."""
        problems = dynamic_gpu_problems(params)  # refused at start (selection.py); a direct caller too
        if problems:
            raise ValueError("; ".join(problems))
        fp8 = kernel_fp8_args(query, key_cache, key_cache, scales, self.num_kv_heads,
                              placeholder=prepared.q_block)
        if self.config.est_kernel == 2:
            try:
                return self._estimate_packed(query, key_cache, prepared, params, scale, fp8)
            except COMPILE_ERRORS as e:
                self._fall_back("est_kernel", 1, "estimate kernel 2", e)
        return self._estimate_paged(query, key_cache, prepared, params, scale, fp8)

    def _fall_back(self, field_name: str, value: int, what: str, error: Exception) -> None:
        """A kernel that does not build on this GPU: the previous one from now on, said once."""
        logger.warning("TriangleMix dynamic layers: %s does not build on this GPU (%s: %s); "
                       "using %s=%d instead (set it in %s to silence this)", what,
                       type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "",
                       field_name, value, CONFIG_ENV)
        self.config = dataclasses.replace(self.config, **{field_name: value})

    def _estimate_paged(self, query, key_cache, prepared, params, scale, fp8):
        cfg = self.config
        B, S = params.block_size, params.stride
        G = B // S
        G_P = _next_pow2(G)
        rows = self.group_p * G_P
        block_m = max(16, min(rows, _next_pow2(cfg.est_block_m)))
        row_tiles = max(1, rows // block_m)
        kb = max(1, _next_pow2(cfg.est_block_n) // G_P, 16 // G_P)
        mass = torch.zeros((prepared.num_items, self.num_kv_heads, row_tiles, prepared.num_blocks),
                           dtype=torch.float32, device=query.device)
        max_tiles = -(-prepared.num_blocks // kb)
        programs = prepared.num_items * self.num_kv_heads * row_tiles
        scratch_rows = programs * block_m
        one_pass = bool(cfg.est_one_pass) and (
            scratch_rows * max_tiles * (kb + 1) * 4 <= cfg.est_scratch_mb * 2**20)
        bsum = tmax = mass  # unused placeholders for two passes
        if one_pass:
            bsum = torch.empty((scratch_rows, max_tiles * kb), dtype=torch.float32, device=query.device)
            tmax = torch.empty((scratch_rows, max_tiles), dtype=torch.float32, device=query.device)
        bt = prepared.block_table
        assert query.stride(-1) == 1
        _xattn_estimate_kernel[(programs,)](
            query, key_cache, mass, bsum, tmax, prepared.items, bt,
            query.stride(0), query.stride(1), *key_cache.stride(), bt.stride(0),
            self.num_kv_heads, prepared.num_blocks, max_tiles, key_cache.shape[1], scale / S * LOG2E,
            *fp8.pointers, *fp8.strides,
            GROUP=self.group, S=S, HALF=(S - 1) // 2 + 1, G=G, G_P=G_P, KB=kb,
            BLOCK_M=block_m, ROW_TILES=row_tiles, HEAD_D=self.head_size, ONE_PASS=one_pass,
            Q_FP8=fp8.q_fp8, KV_FP8=fp8.kv_fp8,
            num_warps=cfg.est_num_warps, num_stages=cfg.est_num_stages,
        )
        return mass

    def _packed_shape(self, params: DynamicParams):
        """(G, G_P, key blocks per tile, rows per program, blocks per program, row tiles)."""
        cfg = self.config
        B, S = params.block_size, params.stride
        G = B // S
        G_P = _next_pow2(G)
        kb = max(1, _next_pow2(cfg.est2_block_n) // G_P, 16 // G_P)
        rows_per_block = self.group_p * G_P
        block_m = max(16, _next_pow2(cfg.est2_block_m))
        if rows_per_block >= block_m:
            return G, G_P, kb, block_m, 1, rows_per_block // block_m
        return G, G_P, kb, block_m, block_m // rows_per_block, 1

    def groups(self, prepared: TritonDynamicPlan, params: DynamicParams) -> _Groups:
        """Kernel 2's groups and repack table for this plan (built once per plan and shape)."""
        G, G_P, kb, block_m, qb, row_tiles = self._packed_shape(params)
        key = (qb, kb, params.block_size)
        if key not in prepared.groups:
            supers, reqs, total = group_query_blocks(prepared.host_items, qb, params.block_size, kb)
            dev = prepared.items.device
            prepared.groups[key] = _Groups(
                supers=torch.from_numpy(supers.astype(np.int32)).to(dev, non_blocking=True),
                reqs=torch.from_numpy(reqs.astype(np.int32)).to(dev, non_blocking=True),
                num_supers=int(supers.shape[0]), total_keys=int(total),
                max_pad=int(reqs[:, 3].max()) if reqs.shape[0] else 0,
            )
        return prepared.groups[key]

    def repack_keys(self, key_cache, prepared: TritonDynamicPlan, groups: _Groups, dtype) -> torch.Tensor:
        """The keys each request's groups read, contiguous: ``[kv_heads, total keys, head_size]``."""
        kp = torch.empty((self.num_kv_heads, max(groups.total_keys, 1), self.head_size), dtype=dtype,
                         device=key_cache.device)
        rb = 64
        bt = prepared.block_table
        _repack_keys_kernel[(-(-groups.max_pad // rb), groups.reqs.shape[0], self.num_kv_heads)](
            key_cache, kp, groups.reqs, bt, *key_cache.stride(), bt.stride(0), kp.stride(0),
            key_cache.shape[1], RB=rb, HEAD_D=self.head_size, num_warps=4,
        )
        return kp

    def _estimate_packed(self, query, key_cache, prepared, params, scale, fp8):
        cfg = self.config
        S = params.stride
        G, G_P, kb, block_m, qb, row_tiles = self._packed_shape(params)
        mass = torch.zeros((prepared.num_items, self.num_kv_heads, row_tiles, prepared.num_blocks),
                           dtype=torch.float32, device=query.device)
        if prepared.num_items == 0:
            return mass
        groups = self.groups(prepared, params)
        fp8_dot = bool(cfg.est2_fp8_dot) and fp8.q_fp8 and fp8.kv_fp8
        if fp8_dot:
            compute = torch.float8_e4m3fn
        else:
            compute = torch.float16 if fp8.q_fp8 else query.dtype  # fp16 holds e4m3 values exactly
        kp = self.repack_keys(key_cache, prepared, groups, compute) if cfg.est2_repack else key_cache
        max_tiles = -(-prepared.num_blocks // kb)
        per_super = self.num_kv_heads * row_tiles
        scratch_per_super = per_super * block_m * max_tiles * (kb + 1) * 4
        supers_per_launch = max(1, min(groups.num_supers, cfg.est_scratch_mb * 2**20 // scratch_per_super))
        programs = supers_per_launch * per_super
        bsum = torch.empty((programs * block_m, max_tiles * kb), dtype=torch.float32, device=query.device)
        tmax = torch.empty((programs * block_m, max_tiles), dtype=torch.float32, device=query.device)
        bt = prepared.block_table
        assert query.stride(-1) == 1
        for first in range(0, groups.num_supers, supers_per_launch):
            n = min(supers_per_launch, groups.num_supers - first)
            _xattn_estimate_packed_kernel[(n * per_super,)](
                query, kp, key_cache, mass, bsum, tmax, prepared.items, groups.supers, bt,
                query.stride(0), query.stride(1), kp.stride(0), *key_cache.stride(), bt.stride(0),
                self.num_kv_heads, prepared.num_blocks, max_tiles, key_cache.shape[1], scale / S * LOG2E,
                first, *fp8.pointers, *fp8.strides,
                GROUP=self.group, GROUP_P=self.group_p, S=S, HALF=(S - 1) // 2 + 1, G=G, G_P=G_P, KB=kb,
                BLOCK_M=block_m, QB=qb, ROW_TILES=row_tiles, HEAD_D=self.head_size,
                REPACKED=bool(cfg.est2_repack), Q_FP8=fp8.q_fp8, KV_FP8=fp8.kv_fp8, FP8_DOT=fp8_dot,
                num_warps=cfg.est2_num_warps, num_stages=cfg.est2_num_stages,
            )
        return mass

    # 2.
    def select(self, mass, prepared: TritonDynamicPlan, params: DynamicParams,
               select=select_key_blocks, keep_mask: bool = False) -> KeptBlocks:
        """The kept blocks; ``mass`` as :meth:`estimate` returns it, or per row tile (4-d).

        The fused kernel runs when ``select`` is the rule itself and ``select_kernel`` is 1;
        ``keep_mask`` also returns the kept-block mask (tests).
        """
        if select is select_key_blocks and self.config.select_kernel == 1:
            try:
                return self.select_fused(mass, prepared, params, keep_mask)
            except COMPILE_ERRORS as e:
                self._fall_back("select_kernel", 0, "the fused selection kernel", e)
        if mass.dim() == 4:
            mass = mass[:, :, 0] if mass.shape[2] == 1 else mass.sum(2)
        keep = select(mass, prepared.q_block[:, None], params.threshold, params.max_density)
        blocks = kept_blocks_from_mask(keep, prepared.q_block)
        if keep_mask:
            blocks.keep = keep
        return blocks

    def _params_tensor(self, params: DynamicParams, device) -> torch.Tensor:
        key = (params.threshold, params.max_density, str(device))
        if key not in self._select_params:
            md = params.max_density if params.max_density is not None else 1.0
            self._select_params[key] = torch.tensor([params.threshold, md], dtype=torch.float64, device=device)
        return self._select_params[key]

    def select_fused(self, mass, prepared: TritonDynamicPlan, params: DynamicParams,
                     keep_mask: bool = False) -> KeptBlocks:
        if mass.dim() == 3:
            mass = mass[:, :, None]
        mass = mass.contiguous()
        n, kv, row_tiles, nb = mass.shape
        dev = mass.device
        kept = torch.empty((n, kv, max(nb, 1)), dtype=torch.int32, device=dev)
        n_kept = torch.empty((n, kv), dtype=torch.int32, device=dev)
        diag_kept = torch.empty((n, kv), dtype=torch.int32, device=dev)
        keep = torch.empty((n, kv, nb), dtype=torch.int8, device=dev) if keep_mask else n_kept
        if n:
            _select_kernel[(n * kv,)](
                mass, prepared.q_block, self._params_tensor(params, dev), kept, n_kept, diag_kept, keep,
                kv, nb, kept.stride(1),
                ROW_TILES=row_tiles, NB_P=max(16, _next_pow2(nb)), USE_TAU=params.threshold < 1.0,
                HAS_CAP=params.max_density is not None, WRITE_KEEP=keep_mask, num_warps=4,
            )
        return KeptBlocks(kept, n_kept, diag_kept, keep.bool() if keep_mask else None)

    def all_blocks(self, prepared: TritonDynamicPlan) -> KeptBlocks:
        """Every causal block (no estimate needed when nothing can be dropped)."""
        n, kv, dev = prepared.num_items, self.num_kv_heads, prepared.q_block.device
        kept = torch.arange(max(prepared.num_blocks, 1), dtype=torch.int32, device=dev)
        n_kept = prepared.q_block.to(torch.int32)[:, None].expand(n, kv).contiguous()
        return KeptBlocks(kept.expand(n * kv, -1).view(n, kv, -1), n_kept,
                          torch.ones((n, kv), dtype=torch.int32, device=dev))

    # 3.
    def attend(self, query, key_cache, value_cache, prepared: TritonDynamicPlan,
               params: DynamicParams, scale: float, output, blocks: KeptBlocks,
               scales: Fp8Scales | None = None) -> None:
        cfg = self.config
        B = params.block_size
        block_n = min(_next_pow2(cfg.block_n), B & -B)  # a power of two dividing B
        block_q = max(cfg.block_m // self.group_p, 16 // self.group_p, 1)
        block_q = min(block_q, _next_pow2(B))
        row_tiles = -(-B // block_q)
        bt = prepared.block_table
        assert query.stride(-1) == 1 and output.stride(-1) == 1
        fp8 = kernel_fp8_args(query, key_cache, value_cache, scales, self.num_kv_heads,
                              placeholder=prepared.q_block)
        kept = blocks.kept.reshape(-1, blocks.kept.shape[-1])  # row item * kv_heads + kv_head
        assert blocks.n_kept.is_contiguous() and blocks.diag_kept.is_contiguous()
        _xattn_attention_kernel[(prepared.num_items * self.num_kv_heads * row_tiles,)](
            query, key_cache, value_cache, output, prepared.items, bt,
            kept, blocks.n_kept, blocks.diag_kept,
            query.stride(0), query.stride(1), output.stride(0), output.stride(1),
            *key_cache.stride(), *value_cache.stride(),
            bt.stride(0), kept.stride(0), kept.stride(1),
            self.num_kv_heads, key_cache.shape[1], B, scale * LOG2E,
            *fp8.pointers, *fp8.strides,
            GROUP=self.group, GROUP_P=self.group_p, BLOCK_Q=block_q, ROW_TILES=row_tiles,
            BLOCK_N=block_n, TILES_PER_BLOCK=B // block_n, HEAD_D=self.head_size,
            Q_FP8=fp8.q_fp8, KV_FP8=fp8.kv_fp8,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def run(self, query, key_cache, value_cache, prepared: TritonDynamicPlan,
            params: DynamicParams, scale: float, output, select=select_key_blocks,
            scales: Fp8Scales | None = None, stats: torch.Tensor | None = None) -> None:
        """query/output: [tokens, heads, dim]; caches: [blocks, block_size, kv_heads, dim] views.

        An fp8 cache (float8_e4m3fn views) needs ``scales``, and so does an fp8 query.
        ``stats`` (the density report, float64 [3] on the device): adds the kept and the
        causal key blocks on the device, no host synchronisation (the estimate's time, its
        third entry, is measured on the CPU path only).
        """
        if prepared.num_items == 0:
            return
        if params.keeps_everything and select is select_key_blocks:
            blocks = self.all_blocks(prepared)
        else:
            mass = self._estimate_row_tiles(query, key_cache, prepared, params, scale, scales)
            blocks = self.select(mass, prepared, params, select)
        if stats is not None:
            stats[0] += (blocks.n_kept.sum() + blocks.diag_kept.sum()).to(stats.dtype)
            stats[1] += ((prepared.q_block + 1).sum() * blocks.n_kept.shape[1]).to(stats.dtype)
        self.attend(query, key_cache, value_cache, prepared, params, scale, output, blocks, scales)
