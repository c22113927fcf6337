"""Dynamic (XAttention) rows in Triton, read straight from vLLM's paged KV cache (GPU path).

Executes a :class:`~vllm_trianglemix.pattern.QueryBlockPlan` in three steps,
all on the device and without a host synchronisation:

1. **Estimate** (one Triton launch): a program per (item, KV head) packs the
   item's query groups of all the query heads sharing that KV head (GQA) into
   the rows of one tile, and computes the antidiagonal scores ``a(g, h)`` of
   :mod:`vllm_trianglemix.pattern` against key groups of blocks ``0..b``, in
   tiles of whole key blocks: a tile's scores are ``S`` dots ``Q_s K_s^T``
   (``Q_s`` row ``g`` = the query at ``g*S + S-1-s``, ``K_s`` column ``h`` = the
   key at ``h*S + s``), bf16/fp16 inputs with float32 accumulation. Absent rows
   load as zero (they add no term); the diagonal group ``h == g`` takes the
   causal half of its terms, computed separately; undefined scores are
   ``-inf``. The softmax per query group is exact: by default one pass over
   the keys keeps, per row and key tile, the running max and the block sums
   relative to it in a float32 scratch buffer (rows x blocks per program,
   ``est_scratch_mb`` at most per launch), then rescales them to the final
   max and sum; or (``est_one_pass=0``, or a launch over the limit) two passes
   (row max and sum, then normalised block sums), with no scratch. The block
   masses are summed over the tile's rows (groups and query heads), giving
   float32 ``[items, kv_heads, blocks]``.
2. **Select**: :func:`~vllm_trianglemix.pattern.select_key_blocks` on the
   masses (torch, on the device), compacted into per (item, KV head) the
   ascending list of kept off-diagonal blocks, their count, and whether the
   diagonal block is kept.
3. **Attend** (one Triton launch): a program per (item, KV head, row tile)
   with the group's query heads packed, iterating over the kept key blocks
   only (online softmax in float32, exp2), the causal mask only in the
   diagonal block (through the triangle kernel's ``_attend_tiles`` with every
   row dense).

Items come heaviest first (the plan orders them), so long rows start first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from vllm_trianglemix.ops.triangle_triton import LOG2E, _attend_tiles, _next_pow2, with_overrides
from vllm_trianglemix.pattern import (
    QUERY_BLOCK_FIELDS,
    DynamicParams,
    QueryBlockPlan,
    select_key_blocks,
)
from vllm_trianglemix.selection import SUPPORTED_HEAD_SIZES_CUDA, dynamic_gpu_problems

CONFIG_ENV = "VLLM_TRIANGLEMIX_XATTN_CONFIG"


# -- 1. Estimate ---------------------------------------------------------------

@triton.jit
def _antidiagonal_scores(
    Q, K, bt_row, q_tok, q_pos0, end, t, b, kv_head, q_head,
    grow0, g_abs, row_ok, present_any, diag, diag_def,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_kd, page_size, qk_scale,
    S: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, KB: tl.constexpr,
    BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr,
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
        kp = h * S + s
        kok = col_ok & (kp < end)
        blk = tl.load(bt_row + kp // page_size, mask=kok, other=0).to(tl.int64)
        slot = (kp % page_size).to(tl.int64)
        k_s = tl.load(K + blk[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kh
                      + offs_d[:, None] * stride_kd, mask=kok[None, :], other=0.0)
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
    GROUP: tl.constexpr, S: tl.constexpr, HALF: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
    KB: tl.constexpr, BLOCK_M: tl.constexpr, ROW_TILES: tl.constexpr, HEAD_D: tl.constexpr,
    ONE_PASS: tl.constexpr,
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
        k_s = tl.load(K + blk[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                      + offs_d[None, :] * stride_kd, mask=ok[:, None], other=0.0)
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
                stride_kd, page_size, qk_scale, S, G, G_P, KB, BLOCK_M, HEAD_D,
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
                stride_kd, page_size, qk_scale, S, G, G_P, KB, BLOCK_M, HEAD_D,
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
                stride_kd, page_size, qk_scale, S, G, G_P, KB, BLOCK_M, HEAD_D,
            )
            p = tl.exp2(sc - m_safe[:, None]) * inv_l[:, None]
            col = tl.sum(p, 0)
            mass = tl.sum(tl.where(col_block[None, :] == kb[:, None], col[None, :], 0.0), 1)
            j = t * KB + kb
            tl.store(out + j, mass, mask=j <= b)


# -- 3. Attend -----------------------------------------------------------------

@triton.jit
def _xattn_attention_kernel(
    Q, K, V, O, items, block_table, kept, n_kept, diag_kept,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt, stride_ki, stride_kk, num_kv_heads, page_size, block_size, qk_scale,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, ROW_TILES: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES_PER_BLOCK: tl.constexpr, HEAD_D: tl.constexpr,
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
            k = tl.load(K + blk[None, :] * stride_kb + slot[None, :] * stride_ks
                        + kv_head * stride_kh + offs_d[:, None] * stride_kd)
            s = tl.dot(q, k) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + blk[:, None] * stride_vb + slot[:, None] * stride_vs
                        + kv_head * stride_vh + offs_d[None, :] * stride_vd)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # The diagonal block: causal (every row dense for the triangle kernel's mask).
        if tl.load(diag_kept + sel) != 0:
            lo = b * block_size
            acc, m_i, l_i = _attend_tiles(
                acc, m_i, l_i, q, lo, 0, tl.cdiv(q_hi + 1 - lo, BLOCK_N), q_hi + 1,
                q_pos, q_lo, q_hi, 0, 0, 1, K, V, bt_row, page_size, kv_head,
                stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                qk_scale, BLOCK_N, HEAD_D, 1, False,  # dynamic layers read a bf16/fp16 cache
            )
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(O + tok[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])


# -- The op ---------------------------------------------------------------------

@dataclass(frozen=True)
class XAttnKernelConfig:
    # Defaults: the fastest of `bench dynamic`'s sweep on the H100 (BENCHMARKS.md, 2026-11-23).
    est_block_m: int = 128  # rows (query groups x heads) per estimate program, at most
    est_block_n: int = 256  # key groups per estimate tile (rounded to whole blocks)
    est_num_warps: int = 8
    est_num_stages: int = 2
    est_one_pass: int = 1  # 1: one pass over the keys with a scratch buffer; 0: two passes
    est_scratch_mb: int = 1024  # one-pass scratch limit per launch (larger launches take two passes)
    block_m: int = 256  # attention rows (query rows x heads) per program
    block_n: int = 64  # attention keys per tile (a divisor of block_size)
    num_warps: int = 8
    num_stages: int = 2

    @classmethod
    def default_for(cls, head_size: int) -> "XAttnKernelConfig":
        if head_size >= 256:
            return cls(est_block_n=64, block_m=64, block_n=32, num_warps=8, num_stages=1,
                       est_num_stages=1)
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


@dataclass
class KeptBlocks:
    """Per (item, KV head): kept blocks before the diagonal (ascending), their count, diagonal kept."""

    kept: torch.Tensor  # int32 [items, kv_heads, >= count] (any strides)
    n_kept: torch.Tensor  # int32 [items, kv_heads], contiguous
    diag_kept: torch.Tensor  # int32 [items, kv_heads], contiguous


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

    def prepare(self, plan: QueryBlockPlan, dense_from: np.ndarray, cam) -> TritonDynamicPlan:
        device = cam.block_table_tensor.device
        items = np.stack([getattr(plan, f) for f in QUERY_BLOCK_FIELDS], axis=1).astype(np.int32)
        return TritonDynamicPlan(
            items=torch.from_numpy(items).to(device, non_blocking=True),
            q_block=torch.from_numpy(plan.q_block.astype(np.int64)).to(device, non_blocking=True),
            block_table=cam.block_table_tensor,
            num_items=plan.num_items,
            num_blocks=int(plan.q_block.max()) + 1 if plan.num_items else 0,
        )

    # 1.
    def estimate(self, query, key_cache, prepared: TritonDynamicPlan, params: DynamicParams,
                 scale: float) -> torch.Tensor:
        """Block masses ``[items, kv_heads, num_blocks]`` (float32; zero past each item's block)."""
        problems = dynamic_gpu_problems(params)  # refused at start (selection.py); a direct caller too
        if problems:
            raise ValueError("; ".join(problems))
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
            GROUP=self.group, S=S, HALF=(S - 1) // 2 + 1, G=G, G_P=G_P, KB=kb,
            BLOCK_M=block_m, ROW_TILES=row_tiles, HEAD_D=self.head_size, ONE_PASS=one_pass,
            num_warps=cfg.est_num_warps, num_stages=cfg.est_num_stages,
        )
        return mass[:, :, 0] if row_tiles == 1 else mass.sum(2)

    # 2.
    def select(self, mass, prepared: TritonDynamicPlan, params: DynamicParams,
               select=select_key_blocks) -> KeptBlocks:
        keep = select(mass, prepared.q_block[:, None], params.threshold, params.max_density)
        return kept_blocks_from_mask(keep, prepared.q_block)

    def all_blocks(self, prepared: TritonDynamicPlan) -> KeptBlocks:
        """Every causal block (no estimate needed when nothing can be dropped)."""
        n, kv, dev = prepared.num_items, self.num_kv_heads, prepared.q_block.device
        kept = torch.arange(max(prepared.num_blocks, 1), dtype=torch.int32, device=dev)
        n_kept = prepared.q_block.to(torch.int32)[:, None].expand(n, kv).contiguous()
        return KeptBlocks(kept.expand(n * kv, -1).view(n, kv, -1), n_kept,
                          torch.ones((n, kv), dtype=torch.int32, device=dev))

    # 3.
    def attend(self, query, key_cache, value_cache, prepared: TritonDynamicPlan,
               params: DynamicParams, scale: float, output, blocks: KeptBlocks) -> None:
        cfg = self.config
        B = params.block_size
        block_n = min(_next_pow2(cfg.block_n), B & -B)  # a power of two dividing B
        block_q = max(cfg.block_m // self.group_p, 16 // self.group_p, 1)
        block_q = min(block_q, _next_pow2(B))
        row_tiles = -(-B // block_q)
        bt = prepared.block_table
        assert query.stride(-1) == 1 and output.stride(-1) == 1
        kept = blocks.kept.reshape(-1, blocks.kept.shape[-1])  # row item * kv_heads + kv_head
        assert blocks.n_kept.is_contiguous() and blocks.diag_kept.is_contiguous()
        _xattn_attention_kernel[(prepared.num_items * self.num_kv_heads * row_tiles,)](
            query, key_cache, value_cache, output, prepared.items, bt,
            kept, blocks.n_kept, blocks.diag_kept,
            query.stride(0), query.stride(1), output.stride(0), output.stride(1),
            *key_cache.stride(), *value_cache.stride(),
            bt.stride(0), kept.stride(0), kept.stride(1),
            self.num_kv_heads, key_cache.shape[1], B, scale * LOG2E,
            GROUP=self.group, GROUP_P=self.group_p, BLOCK_Q=block_q, ROW_TILES=row_tiles,
            BLOCK_N=block_n, TILES_PER_BLOCK=B // block_n, HEAD_D=self.head_size,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def run(self, query, key_cache, value_cache, prepared: TritonDynamicPlan,
            params: DynamicParams, scale: float, output, select=select_key_blocks) -> None:
        """query/output: [tokens, heads, dim]; caches: [blocks, block_size, kv_heads, dim] views."""
        if prepared.num_items == 0:
            return
        if params.keeps_everything and select is select_key_blocks:
            blocks = self.all_blocks(prepared)
        else:
            mass = self.estimate(query, key_cache, prepared, params, scale)
            blocks = self.select(mass, prepared, params, select)
        self.attend(query, key_cache, value_cache, prepared, params, scale, output, blocks)
