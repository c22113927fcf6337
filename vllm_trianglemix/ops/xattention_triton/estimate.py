"""Estimate: the antidiagonal block masses of XAttention, float32 ``[items, kv_heads, row tiles, blocks]``.

The scores ``a(g, h)`` of :mod:`vllm_trianglemix.pattern`: for query group ``g``
and key group ``h`` (``S`` consecutive positions each) the sum over ``s`` of
``q[g*S + S-1-s] . k[h*S + s]``, a softmax over ``h`` per query group and
query head, and per key block the sum of the probabilities of its groups over
the block's query groups and the group's query heads.

A tile's scores are ``S`` dots ``Q_s K_s^T`` (``Q_s`` row ``g`` = the query at
``g*S + S-1-s``, ``K_s`` column ``h`` = the key at ``h*S + s``): one GEMM with
inner dimension ``S*d``, bf16/fp16 (or e4m3) inputs, float32 accumulation.
Absent rows load as zero (they add no term); the diagonal group ``h == g``
takes the causal half of its terms (:func:`_diagonal_group`); undefined
scores are ``-inf``. The softmax is exact in one pass over the keys: per row
and key tile the running max and the block sums relative to it go to a
float32 scratch buffer, rescaled to the final max and sum at the end.

A program takes one KV head and up to ``QB`` consecutive query blocks of one
request (rows: block x query head x query group), so a key tile, read from
the repacked keys (repack.py) at affine addresses, serves all of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vllm.logger import init_logger

from vllm_trianglemix.ops.triangle_triton import LOG2E, _fp8_scales, _next_pow2
from vllm_trianglemix.ops.xattention_triton.config import has_tma
from vllm_trianglemix.ops.xattention_triton.plan import round_up

logger = init_logger("vllm.trianglemix")
_GLUON_WARNED: set[str] = set()


@triton.jit
def _query_rows(Q, q_tok, q_pos0, end, r, row_ok, q_head, stride_qt, stride_qh, offs_d):
    """The queries at positions ``r`` (one per row), zero where absent."""
    ok = row_ok & (r >= q_pos0) & (r < end)
    tok = (q_tok + r - q_pos0).to(tl.int64)
    return tl.load(Q + tok[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
                   mask=ok[:, None], other=0.0)


@triton.jit
def _diagonal_group(Q, kp_base, q_tok, q_pos0, end, grow0, row_ok, q_head, stride_qt, stride_qh,
                    S: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr):
    """Each row's score against its own key group: the causal terms ``s < HALF`` only (float32)."""
    offs_d = tl.arange(0, HEAD_D)
    diag = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(HALF):
        q_s = _query_rows(Q, q_tok, q_pos0, end, grow0 + (S - 1 - s), row_ok, q_head, stride_qt,
                          stride_qh, offs_d)
        k_s = tl.load(kp_base + (grow0 + s).to(tl.int64)[:, None] * HEAD_D + offs_d[None, :],
                      mask=row_ok[:, None], other=0.0)
        diag += tl.sum(q_s.to(tl.float32) * k_s.to(tl.float32), 1)
    return diag


@triton.jit
def _block_sums(sc, m_i, l_i, bsum_rows, tmax_rows, t, KB: tl.constexpr, G_P: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Scaled scores of key tile ``t`` (``-inf`` where undefined) -> the running max and sum, the
    block sums relative to the new max in scratch."""
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(sc - m_safe[:, None])
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(p, 1)
    block_sums = tl.sum(tl.reshape(p, (BLOCK_M, KB, G_P)), 2)
    tl.store(bsum_rows[:, None] + (t * KB + tl.arange(0, KB))[None, :], block_sums)
    tl.store(tmax_rows + t, m_new)
    return m_new, l_i


@triton.jit
def _tile_epilogue(acc, diag, qk_scale, h, g_abs, present_any, diag_def, col_ok, m_i, l_i,
                   bsum_rows, tmax_rows, t, KB: tl.constexpr, G_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """:func:`_block_sums` of a key tile that reaches a row's own group or padded columns: the
    diagonal group's causal score, ``-inf`` past it, in padded columns and in rows without queries."""
    on_diag = h[None, :] == g_abs[:, None]
    sc = tl.where(on_diag, diag[:, None], acc) * qk_scale
    defined = ((h[None, :] < g_abs[:, None]) & present_any[:, None]) | (on_diag & diag_def[:, None])
    sc = tl.where(defined & col_ok[None, :], sc, float("-inf"))
    return _block_sums(sc, m_i, l_i, bsum_rows, tmax_rows, t, KB, G_P, BLOCK_M)


@triton.jit
def _program_rows(items, supers, num_kv_heads, super0, launch_supers, HEAD_MAJOR: tl.constexpr,
                  KS: tl.constexpr, QB: tl.constexpr, ROW_TILES: tl.constexpr,
                  GROUP: tl.constexpr, GROUP_P: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """Row program ``pid``'s KV head, super-group record and rows (query block x query head x query
    group): each row's query block slot, head, token and position range, and absolute group.
    (``KS`` programs next to each other share a row program, each one a part of its key tiles.)"""
    pid = tl.program_id(0) // KS
    rt = pid % ROW_TILES
    rest = pid // ROW_TILES
    if HEAD_MAJOR:  # the launch's programs of one KV head next to each other
        kv_head = rest // launch_supers
        sup = rest % launch_supers
    else:
        kv_head = rest % num_kv_heads
        sup = rest // num_kv_heads
    sp = supers + (super0 + sup).to(tl.int64) * (4 + QB)
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
    return pid, rt, kv_head, sp, qb, row_ok, q_head, q_tok, q_pos0, end, g_abs


@triton.jit
def _program_facts(Q, KP, sp, kv_head, row_ok, q_head, q_tok, q_pos0, end, g_abs, stride_qt, stride_qh,
                   rows_per_head, t_hi, S: tl.constexpr, HALF: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
                   KB: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr):
    """What a row program's loop needs besides its tiles: its keys' base in the repacked buffer and
    their first key group there, and per row its first position, whether its group holds a query,
    whether its diagonal score is defined, that score (unscaled), and the key tiles below every
    row's own group (scored without masks). ``t_hi``: the end of the key tiles the program scores;
    where they are all below every row's own group (the first parts of ``est_key_splits``), the
    diagonal scores are never read and not computed (zeros)."""
    kp_off = tl.load(sp + 1)
    # (a multiple of HEAD_D: aligned rows, whatever the buffer's length)
    kp_base = KP + (kv_head.to(tl.int64) * rows_per_head + kp_off) * HEAD_D
    k_group0 = (kv_head * rows_per_head + kp_off) // S  # (TMA_K: a whole number, offsets are whole blocks)
    grow0 = g_abs * S
    present_any = row_ok & (tl.maximum(grow0, q_pos0) < tl.minimum(grow0 + S, end))
    diag_def = row_ok & (tl.maximum(grow0 + S - HALF, q_pos0) < tl.minimum(grow0 + S, end))
    # Key tiles ending at or before the program's first query block are below every row's own
    # group, every column a key group (G == G_P): their epilogue needs no masks.
    full_tiles = tl.min(tl.where(row_ok, g_abs // G, 2**30), 0) // KB
    if G != G_P:
        full_tiles = full_tiles * 0
    if t_hi > full_tiles:  # masked tiles: they read the diagonal scores
        diag = _diagonal_group(Q, kp_base, q_tok, q_pos0, end, grow0, row_ok, q_head, stride_qt, stride_qh,
                               S, HALF, BLOCK_M, HEAD_D)
    else:
        diag = tl.zeros([BLOCK_M], dtype=tl.float32)
    return kp_base, k_group0, grow0, present_any, diag_def, diag, full_tiles


@triton.jit(do_not_specialize=["super0", "launch_supers"])
def _query_repack_kernel(
    Q, QP, items, supers, stride_qt, stride_qh, num_kv_heads, super0, launch_supers,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, S: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
    BLOCK_M: tl.constexpr, QB: tl.constexpr, ROW_TILES: tl.constexpr, HEAD_D: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
):
    """``est_tma``: each estimate program's strided query rows, ``QP[pid, s]`` = the
    ``[BLOCK_M, HEAD_D]`` tile its loop reads at stride offset ``s`` (zeros where absent)."""
    pid, rt, kv_head, sp, qb, row_ok, q_head, q_tok, q_pos0, end, g_abs = _program_rows(
        items, supers, num_kv_heads, super0, launch_supers, HEAD_MAJOR, 1, QB, ROW_TILES, GROUP, GROUP_P, G,
        G_P, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    local = tl.arange(0, BLOCK_M).to(tl.int64)
    for s in range(S):
        q_s = _query_rows(Q, q_tok, q_pos0, end, g_abs * S + (S - 1 - s), row_ok, q_head, stride_qt,
                          stride_qh, offs_d)
        dst = QP + ((pid.to(tl.int64) * S + s) * BLOCK_M + local)[:, None] * HEAD_D + offs_d[None, :]
        tl.store(dst, q_s)


@triton.jit(do_not_specialize=["max_blocks", "max_tiles", "super0", "rows_per_head", "launch_supers"])
def _estimate_kernel(
    Q, KP, QD, KD, MASS, BSUM, TMAX, ML, items, supers,
    stride_qt, stride_qh, rows_per_head, num_kv_heads, max_blocks, max_tiles, qk_scale, super0, launch_supers,
    q_scale_ptr, k_scale_ptr, v_scale_ptr, stride_q_scale, stride_k_scale, stride_v_scale,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, S: tl.constexpr, HALF: tl.constexpr,
    G: tl.constexpr, G_P: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr, QB: tl.constexpr,
    ROW_TILES: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    Q_FP8: tl.constexpr, KV_FP8: tl.constexpr, FP8_DOT: tl.constexpr, FP8_PRECISE_ACC: tl.constexpr,
    TMA_Q: tl.constexpr, TMA_K: tl.constexpr, HEAD_MAJOR: tl.constexpr, KS: tl.constexpr,
):
    """Block masses of up to ``QB`` consecutive query blocks of one request, one KV head, one row tile.

    ``FP8_DOT`` (e4m3 keys): the dots take the e4m3 values as they are; their products are exact
    in float32 and the accumulation is kept float32 (``max_num_imprecise_acc=0``; not with
    ``est_fp8_fast_acc``), so with an fp8 query the scores equal the fp16 path's. (``est_fp8_score``: the query and the keys arrive
    already rounded to e4m3, see op.py; the scores are those of the rounded values.)
    One loop over (key tile, stride offset, head-dimension step of ``BLOCK_D``), so that loads
    are pipelined across tile boundaries; a tile's epilogue runs on its last step. (``BLOCK_D``
    below the head size: smaller operand tiles per pipeline stage, the same sums.)
    ``TMA_Q`` / ``TMA_K`` (``est_tma``): the repacked query tiles and the key tiles by tensor
    descriptors (bulk copies): ``QD`` over ``QP`` as ``[programs * S * BLOCK_M, HEAD_D]``, ``KD``
    over the repacked keys as ``[rows / S, S * HEAD_D]`` (row ``h``: key group ``h``'s ``S``
    keys), so that stride offset ``s`` of key groups ``h0..h0+N`` is one box.
    """
    pid, rt, kv_head, sp, qb, row_ok, q_head, q_tok, q_pos0, end, g_abs = _program_rows(
        items, supers, num_kv_heads, super0, launch_supers, HEAD_MAJOR, KS, QB, ROW_TILES, GROUP, GROUP_P, G,
        G_P, BLOCK_M)
    nb = tl.load(sp + 2)  # key blocks of the group's last query block (its index + 1)
    n_keys = tl.load(sp + 3)  # keys the group reads (the end of its last present row)
    n_tiles = tl.cdiv(nb, KB)
    split = tl.program_id(0) % KS  # this program's part of the key tiles (KS == 1: all of them)
    per_split = tl.cdiv(n_tiles, KS)
    t_lo = split * per_split
    t_hi = tl.minimum(n_tiles, t_lo + per_split)
    kp_base, k_group0, grow0, present_any, diag_def, diag, full_tiles = _program_facts(
        Q, KP, sp, kv_head, row_ok, q_head, q_tok, q_pos0, end, g_abs, stride_qt, stride_qh, rows_per_head,
        t_hi, S, HALF, G, G_P, KB, BLOCK_M, HEAD_D)
    qk_scale, _ = _fp8_scales(qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr, kv_head,
                              stride_q_scale, stride_k_scale, stride_v_scale, Q_FP8, KV_FP8)

    DC: tl.constexpr = HEAD_D // BLOCK_D  # head-dimension steps per stride offset
    offs_dc = tl.arange(0, BLOCK_D)
    N: tl.constexpr = KB * G_P
    cols = tl.arange(0, N)
    local = tl.arange(0, BLOCK_M).to(tl.int64)
    bsum_rows = BSUM + (pid.to(tl.int64) * BLOCK_M + local) * (max_tiles * KB)
    tmax_rows = TMAX + (pid.to(tl.int64) * BLOCK_M + local) * max_tiles
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, N], dtype=tl.float32)
    for ts in range(t_lo * S * DC, t_hi * S * DC):  # (key tile, stride offset, d step): loads pipelined across tiles
        t = ts // (S * DC)  # (DC == 1, the whole head: the divisions by 1 fold when compiling)
        s = (ts // DC) % S
        dc = ts % DC
        last_step = (s == S - 1) & (dc == DC - 1)
        if TMA_Q:  # this program's repacked tile at stride offset s
            q_s = QD.load([(pid * S + s) * BLOCK_M, dc * BLOCK_D])
        else:
            q_s = _query_rows(Q, q_tok, q_pos0, end, grow0 + (S - 1 - s), row_ok, q_head, stride_qt,
                              stride_qh, dc * BLOCK_D + offs_dc)
        if Q_FP8:
            if not FP8_DOT:
                q_s = q_s.to(tl.float16)  # exact (e4m3 values are fp16 values); q_scale is in qk_scale
        # The repacked buffer holds whole tiles (zeros past the keys): masks only for padded columns.
        if TMA_K:  # (G == G_P: the tile's key groups are consecutive)
            k_s = KD.load([k_group0 + t * N, s * HEAD_D + dc * BLOCK_D]).T
        else:
            j_col = t * KB + cols // G_P
            kp = (j_col * G + cols % G_P) * S + s  # key group h's key at stride offset s
            offs_d = dc * BLOCK_D + offs_dc
            if G != G_P:
                col_ok = (cols % G_P < G) & (j_col < nb)
                k_s = tl.load(kp_base + kp.to(tl.int64)[None, :] * HEAD_D + offs_d[:, None],
                              mask=(col_ok & (kp < n_keys))[None, :], other=0.0)
            else:
                k_s = tl.load(kp_base + kp.to(tl.int64)[None, :] * HEAD_D + offs_d[:, None])
        if FP8_DOT and FP8_PRECISE_ACC:
            acc = tl.dot(q_s, k_s, acc, max_num_imprecise_acc=0)
        else:
            acc = tl.dot(q_s, k_s, acc)
        if last_step:  # the tile's last step: its scores are complete
            if t < full_tiles:  # every score defined (rows without queries score zeros: dropped below)
                m_i, l_i = _block_sums(acc * qk_scale, m_i, l_i, bsum_rows, tmax_rows, t, KB, G_P, BLOCK_M)
            else:
                j_col = t * KB + cols // G_P
                h = j_col * G + cols % G_P  # absolute key group
                col_ok = (cols % G_P < G) & (j_col < nb)
                m_i, l_i = _tile_epilogue(acc, diag, qk_scale, h, g_abs, present_any, diag_def, col_ok,
                                          m_i, l_i, bsum_rows, tmax_rows, t, KB, G_P, BLOCK_M)
            acc = tl.zeros([BLOCK_M, N], dtype=tl.float32)
    if KS == 1:
        tl.debug_barrier()  # this program's scratch, written by other threads
        _final_pass(m_i, l_i, present_any, bsum_rows, tmax_rows, n_tiles, sp, items, qb, MASS, num_kv_heads,
                    kv_head, rt, max_blocks, KB, QB, ROW_TILES)
    else:  # this part's running max and sum, for _final_kernel
        ml = ML + ((pid.to(tl.int64) * KS + split) * BLOCK_M + local) * 2
        tl.store(ml, m_i)
        tl.store(ml + 1, l_i)


@triton.jit
def _final_pass(m_i, l_i, present_any, bsum_rows, tmax_rows, n_tiles, sp, items, qb, MASS, num_kv_heads,
                kv_head, rt, max_blocks, KB: tl.constexpr, QB: tl.constexpr, ROW_TILES: tl.constexpr):
    """The stored block sums of every key tile rescaled to the row's final max and sum, summed
    over each query block's rows: its masses."""
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    # (rows without queries: nothing; the unmasked tiles gave them finite sums)
    inv_l = tl.where(present_any & (l_i > 0.0), 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    kb = tl.arange(0, KB)
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


@triton.jit(do_not_specialize=["max_blocks", "max_tiles", "super0", "launch_supers"])
def _final_kernel(
    MASS, BSUM, TMAX, ML, items, supers, num_kv_heads, max_blocks, max_tiles, super0, launch_supers,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, S: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
    KB: tl.constexpr, BLOCK_M: tl.constexpr, QB: tl.constexpr, ROW_TILES: tl.constexpr, KS: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
):
    """``est_key_splits``: a row program's parts combined (their running maxima and sums), then
    :func:`_final_pass`."""
    pid, rt, kv_head, sp, qb, row_ok, q_head, q_tok, q_pos0, end, g_abs = _program_rows(
        items, supers, num_kv_heads, super0, launch_supers, HEAD_MAJOR, 1, QB, ROW_TILES, GROUP, GROUP_P, G,
        G_P, BLOCK_M)
    grow0 = g_abs * S
    present_any = row_ok & (tl.maximum(grow0, q_pos0) < tl.minimum(grow0 + S, end))
    local = tl.arange(0, BLOCK_M).to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in tl.static_range(KS):
        ml = ML + ((pid.to(tl.int64) * KS + k) * BLOCK_M + local) * 2
        m_k = tl.load(ml)
        l_k = tl.load(ml + 1)
        m_new = tl.maximum(m_i, m_k)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + l_k * tl.exp2(m_k - m_safe)
        m_i = m_new
    bsum_rows = BSUM + (pid.to(tl.int64) * BLOCK_M + local) * (max_tiles * KB)
    tmax_rows = TMAX + (pid.to(tl.int64) * BLOCK_M + local) * max_tiles
    _final_pass(m_i, l_i, present_any, bsum_rows, tmax_rows, tl.cdiv(tl.load(sp + 2), KB), sp, items, qb, MASS,
                num_kv_heads, kv_head, rt, max_blocks, KB, QB, ROW_TILES)


def gluon_loop_runs(query, kp, shape) -> bool:
    """Whether ``est_gluon``'s loop (estimate_gluon.py) runs for this step; where it cannot, the
    Triton loop runs, with one warning naming why."""
    G, G_P, kb, block_m, _, _ = shape
    from vllm_trianglemix.ops.xattention_triton import estimate_gluon

    reason = estimate_gluon.unsupported_reason(query, kp, G, G_P, block_m, kb * G_P)
    if reason is not None and reason not in _GLUON_WARNED:
        _GLUON_WARNED.add(reason)
        logger.warning("TriangleMix dynamic layers: est_gluon=1 but the Gluon estimate cannot run here: %s; "
                       "using the Triton estimate", reason)
    return reason is None


def estimate_block_d(config, head_size: int) -> int:
    """The head-dimension step of the estimate's dots (``est_block_d``; 0: the whole head)."""
    d = config.est_block_d
    if d == 0 or d == head_size:
        return head_size
    if d < 16 or d > head_size or d & (d - 1) or head_size % d:
        raise ValueError(f"est_block_d={d}: must be 0 (the whole head) or a power of two >= 16 "
                         f"that divides the head size {head_size}")
    return d


def uses_tma(config, query: torch.Tensor) -> bool:
    """Whether the estimate's operands come by tensor descriptors (``est_tma``; -1: where the GPU
    has TMA, compute capability 9 and later)."""
    if config.est_tma >= 0:
        return bool(config.est_tma)
    return has_tma(query.device)


def estimate_shape(config, group_p: int, block_size: int, stride: int):
    """(G, G_P, key blocks per tile, rows per program, query blocks per program, row tiles)."""
    G = block_size // stride
    G_P = _next_pow2(G)
    kb = max(1, _next_pow2(config.est_block_n) // G_P, 16 // G_P)
    rows_per_block = group_p * G_P
    block_m = max(16, _next_pow2(config.est_block_m))
    if rows_per_block >= block_m:
        return G, G_P, kb, block_m, 1, rows_per_block // block_m
    return G, G_P, kb, block_m, block_m // rows_per_block, 1


def estimate(op, query, kp, prepared, groups, params, scale: float, fp8) -> torch.Tensor:
    """Block masses per row tile ``[items, kv_heads, row_tiles, num_blocks]`` (float32; zero past each block)."""
    cfg = op.config
    S = params.stride
    G, G_P, kb, block_m, qb, row_tiles = estimate_shape(cfg, op.group_p, params.block_size, S)
    # (widths rounded up: plan.round_up; columns past an item's block stay zero)
    mass = torch.zeros((prepared.num_items, op.num_kv_heads, row_tiles, round_up(prepared.num_blocks)),
                       dtype=torch.float32, device=query.device)
    if prepared.num_items == 0:
        return mass
    fp8_dot = kp.dtype == torch.float8_e4m3fn
    max_tiles = round_up(-(-prepared.num_blocks // kb))
    per_super = op.num_kv_heads * row_tiles
    scratch_per_super = per_super * block_m * max_tiles * (kb + 1) * 4
    tma = uses_tma(cfg, query)
    tma_k = tma and G == G_P
    if tma:  # each program's S query tiles (repacked before each launch)
        scratch_per_super += per_super * S * block_m * op.head_size * query.element_size()
    supers_per_launch = max(1, min(groups.num_supers, cfg.est_scratch_mb * 2**20 // scratch_per_super))
    if supers_per_launch < groups.num_supers:  # slices start at multiples of 16 groups
        supers_per_launch = max(16, supers_per_launch // 16 * 16)
    programs = supers_per_launch * per_super
    bsum = torch.empty((programs * block_m, max_tiles * kb), dtype=torch.float32, device=query.device)
    tmax = torch.empty((programs * block_m, max_tiles), dtype=torch.float32, device=query.device)
    ks = max(1, cfg.est_key_splits)
    shape = (G, G_P, kb, block_m, qb, row_tiles)
    use_gluon = tma_k and bool(cfg.est_gluon) and gluon_loop_runs(query, kp, shape)
    # the parts' running maxima and sums, for _final_kernel (the Gluon loop always leaves them to it)
    final_launch = ks > 1 or use_gluon
    ml = (torch.empty((programs * ks * block_m, 2), dtype=torch.float32, device=query.device)
          if final_launch else tmax)
    qp = (torch.empty((programs * S * block_m, op.head_size), dtype=query.dtype, device=query.device)
          if tma else query)
    assert query.stride(-1) == 1
    block_d = estimate_block_d(cfg, op.head_size)
    qd, kd = qp, kp
    if tma and not use_gluon:  # (the Gluon loop makes its own descriptors)
        from triton.tools.tensor_descriptor import TensorDescriptor

        qd = TensorDescriptor.from_tensor(qp, [block_m, block_d])
        if tma_k:
            kd = TensorDescriptor.from_tensor(kp.view(-1, S * op.head_size), [kb * G_P, block_d])
    for first in range(0, groups.num_supers, supers_per_launch):
        n = min(supers_per_launch, groups.num_supers - first)
        if tma:
            _query_repack_kernel[(n * per_super,)](
                query, qp, prepared.items, groups.supers, query.stride(0), query.stride(1),
                op.num_kv_heads, first, n, GROUP=op.group, GROUP_P=op.group_p, S=S, G=G, G_P=G_P,
                BLOCK_M=block_m, QB=qb, ROW_TILES=row_tiles, HEAD_D=op.head_size,
                HEAD_MAJOR=bool(cfg.est_head_major), num_warps=4,
            )
        if use_gluon:
            from vllm_trianglemix.ops.xattention_triton import estimate_gluon

            pinfo, rinfo, diag = estimate_gluon.program_info(op, query, kp, prepared, groups, params, first, n, shape)
            estimate_gluon.run_loop(op, qp, kp, pinfo, rinfo, diag, bsum, tmax, ml, max_tiles, scale / S * LOG2E,
                                    params, shape, block_d)
        else:
            _estimate_kernel[(n * per_super * ks,)](
                query, kp, qd, kd, mass, bsum, tmax, ml, prepared.items, groups.supers,
                query.stride(0), query.stride(1), kp.shape[1],
                op.num_kv_heads, mass.shape[-1], max_tiles, scale / S * LOG2E, first, n,
                *fp8.pointers, *fp8.strides,
                GROUP=op.group, GROUP_P=op.group_p, S=S, HALF=(S - 1) // 2 + 1, G=G, G_P=G_P, KB=kb,
                BLOCK_M=block_m, QB=qb, ROW_TILES=row_tiles, HEAD_D=op.head_size,
                BLOCK_D=block_d,
                Q_FP8=fp8.q_fp8, KV_FP8=fp8.kv_fp8, FP8_DOT=fp8_dot, FP8_PRECISE_ACC=not cfg.est_fp8_fast_acc,
                TMA_Q=tma, TMA_K=tma_k, HEAD_MAJOR=bool(cfg.est_head_major), KS=ks,
                num_warps=cfg.est_num_warps, num_stages=cfg.est_num_stages,
            )
        if final_launch:
            _final_kernel[(n * per_super,)](
                mass, bsum, tmax, ml, prepared.items, groups.supers, op.num_kv_heads, mass.shape[-1], max_tiles,
                first, n, GROUP=op.group, GROUP_P=op.group_p, S=S, G=G, G_P=G_P, KB=kb, BLOCK_M=block_m, QB=qb,
                ROW_TILES=row_tiles, KS=ks, HEAD_MAJOR=bool(cfg.est_head_major), num_warps=4,
            )
    return mass
