"""The estimate's key-tile loop for Hopper in Gluon (``est_gluon``): two warpgroups that do not wait
for each other.

Same scores, masses and scratch layout as :func:`estimate._estimate_kernel` with tensor
descriptors (``est_tma``) and key tiles in parts (``est_key_splits``); what changes is who runs
what. A program's 128 rows are two consumer warpgroups of 64 rows each. They share a ring of
``NUM_STAGES`` shared-memory slots, each holding one step's query tile (``[128, BLOCK_D]``, one
stride offset and head step) and key tile (``[N, BLOCK_D]``), filled by TMA. Each warpgroup issues
its own asynchronous wgmmas and runs its own tile epilogue (masks, running max, ``exp2``, block
sums), so while one is in its epilogue the other's wgmmas keep the tensor cores busy (in the
Triton kernel a tile's epilogue and the next tile's dots do not overlap).

The first warpgroup also issues the loads: at step ``i`` it refills the slot of step
``i - LAG`` with step ``i - LAG + NUM_STAGES``, once both warpgroups have released it, so that
either may run up to ``LAG`` steps ahead of the other without the loads waiting on it.

Around the loop: :func:`_program_info_kernel` (Triton) writes each program's key tile range and
each row's group, flags and diagonal score; :func:`estimate._final_kernel` combines the parts'
running maxima and sums and runs the final pass, as for ``est_key_splits``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_trianglemix.ops.xattention_triton.estimate import _program_facts, _program_rows

try:  # Gluon (Triton >= 3.5); without it est_gluon falls back to the Triton loop
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
except ImportError:  # pragma: no cover (older Triton)
    gluon = None

PINFO_FIELDS = 8  # per program: key group 0, first and end key tile, unmasked tiles, key blocks (+ padding)
ROWS_PER_CONSUMER = 64
NUM_CONSUMERS = 2


@triton.jit(do_not_specialize=["super0", "launch_supers"])
def _program_info_kernel(
    Q, KP, PINFO, RINFO, DIAG, items, supers, stride_qt, stride_qh, rows_per_head, num_kv_heads, super0,
    launch_supers,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, S: tl.constexpr, HALF: tl.constexpr, G: tl.constexpr,
    G_P: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr, QB: tl.constexpr, ROW_TILES: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_MAJOR: tl.constexpr, KS: tl.constexpr,
):
    """Row program ``pid``: for each of its ``KS`` parts ``PINFO[pid * KS + part]`` = (key group 0 in
    the repacked keys, first key tile, end key tile, key tiles below every row's own group, key
    blocks); per row ``RINFO`` = ``4 * group + 2 * (the group holds a query) + (its diagonal score is
    defined)`` or -1 for rows without a query block or head, ``DIAG`` = the diagonal group's causal
    score (unscaled). The same quantities as :func:`estimate._estimate_kernel` computes inline."""
    pid, rt, kv_head, sp, qb, row_ok, q_head, q_tok, q_pos0, end, g_abs = _program_rows(
        items, supers, num_kv_heads, super0, launch_supers, HEAD_MAJOR, 1, QB, ROW_TILES, GROUP, GROUP_P, G,
        G_P, BLOCK_M)
    nb = tl.load(sp + 2)
    n_tiles = tl.cdiv(nb, KB)
    _, k_group0, _, present_any, diag_def, diag, full_tiles = _program_facts(
        Q, KP, sp, kv_head, row_ok, q_head, q_tok, q_pos0, end, g_abs, stride_qt, stride_qh, rows_per_head,
        n_tiles, S, HALF, G, G_P, KB, BLOCK_M, HEAD_D)
    per_split = tl.cdiv(n_tiles, KS)
    for k in tl.static_range(KS):
        t_lo = tl.minimum(k * per_split, n_tiles)
        t_hi = tl.minimum(n_tiles, t_lo + per_split)
        base = PINFO + (pid.to(tl.int64) * KS + k) * 8
        tl.store(base + 0, k_group0)
        tl.store(base + 1, t_lo)
        tl.store(base + 2, t_hi)
        tl.store(base + 3, full_tiles)
        tl.store(base + 4, nb)
    local = tl.arange(0, BLOCK_M)
    code = tl.where(row_ok, g_abs * 4 + present_any.to(tl.int32) * 2 + diag_def.to(tl.int32), -1)
    tl.store(RINFO + pid.to(tl.int64) * BLOCK_M + local, code)
    tl.store(DIAG + pid.to(tl.int64) * BLOCK_M + local, diag)


if gluon is not None:

    @gluon.jit
    def _issue_load(qd, kd, q_smem, k_smem, ready, empty, j, total, q_row0, k_group0, t_lo,
                    S: gl.constexpr, DC: gl.constexpr, NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                    BLOCK_D: gl.constexpr, HEAD_D: gl.constexpr, N: gl.constexpr):
        """Step ``j``'s query and key tiles into slot ``j % NUM_STAGES`` (nothing past the last step),
        once both consumers have released the step that held the slot before."""
        if j < total:
            slot = j % NUM_STAGES
            if j >= NUM_STAGES:
                mbarrier.wait(empty.index(slot), (j // NUM_STAGES - 1) & 1)
            t = t_lo + j // (S * DC)
            st = j % (S * DC)
            s = st // DC
            dc = st % DC
            bar = ready.index(slot)
            mbarrier.expect(bar, qd.block_type.nbytes + kd.block_type.nbytes)
            tma.async_load(qd, [q_row0 + s * BLOCK_M, dc * BLOCK_D], bar, q_smem.index(slot))
            tma.async_load(kd, [k_group0 + t * N, s * HEAD_D + dc * BLOCK_D], bar,
                                            k_smem.index(slot))

    @gluon.jit
    def _consumer(qd, kd, q_smem, k_smem, ready, empty, go, PINFO, RINFO, DIAG, BSUM, TMAX, ML, max_tiles, qk_scale,
                  WG: gl.constexpr, KS: gl.constexpr, S: gl.constexpr, DC: gl.constexpr, KB: gl.constexpr,
                  G_P: gl.constexpr, NUM_STAGES: gl.constexpr, LAG: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_D: gl.constexpr, HEAD_D: gl.constexpr, N: gl.constexpr):
        """Rows ``[64 * WG, 64 * WG + 64)`` of the program: its key tiles' dots, tile epilogues and
        running max and sum (``WG == 0`` also issues the loads)."""
        R: gl.constexpr = 64
        STEPS: gl.constexpr = S * DC
        pid = gl.program_id(0)
        row_pid = pid // KS
        info = PINFO + pid.to(gl.int64) * 8
        k_group0 = gl.load(info + 0)
        t_lo = gl.load(info + 1)
        t_hi = gl.load(info + 2)
        full_tiles = gl.load(info + 3)
        nb = gl.load(info + 4)
        total = (t_hi - t_lo) * STEPS
        q_row0 = row_pid * (S * BLOCK_M)

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, N, 16])
        row_l: gl.constexpr = gl.SliceLayout(1, mma)
        col_l: gl.constexpr = gl.SliceLayout(0, mma)
        rows = row_pid.to(gl.int64) * BLOCK_M + WG * R + gl.arange(0, R, layout=row_l)
        code = gl.load(RINFO + rows)
        diag = gl.load(DIAG + rows) * qk_scale
        g_abs = code >> 2  # (-1 for rows without a query: below no column, on none)
        present = (code >= 0) & (((code >> 1) & 1) == 1)
        diag_def = (code >= 0) & ((code & 1) == 1)
        tmax_rows = TMAX + rows * max_tiles
        cols = gl.arange(0, N, layout=col_l)
        m_i = gl.full([R], float("-inf"), gl.float32, row_l)
        l_i = gl.zeros([R], gl.float32, row_l)

        if WG == 0:  # the first loads, NUM_STAGES - LAG steps ahead
            for j in gl.static_range(NUM_STAGES - LAG):
                _issue_load(qd, kd, q_smem, k_smem, ready, empty, j, total, q_row0, k_group0, t_lo,
                            S, DC, NUM_STAGES, BLOCK_M, BLOCK_D, HEAD_D, N)
        else:  # start LAG - 1 steps behind the first warpgroup, so that their epilogues fall apart
            mbarrier.wait(go, 0)
        i = 0
        for t in range(t_lo, t_hi):
            acc = gl.zeros([R, N], gl.float32, mma)
            for st in range(STEPS):
                slot = i % NUM_STAGES
                mbarrier.wait(ready.index(slot), (i // NUM_STAGES) & 1)
                q = q_smem.index(slot).slice(WG * R, R, dim=0)
                k = k_smem.index(slot).permute((1, 0))
                acc = warpgroup_mma(q, k, acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                if i > 0:  # the previous step's wgmma is done: its slot is free as far as this warpgroup goes
                    mbarrier.arrive(empty.index((i - 1) % NUM_STAGES), count=1)
                if WG == 0:
                    _issue_load(qd, kd, q_smem, k_smem, ready, empty, i + NUM_STAGES - LAG, total, q_row0,
                                k_group0, t_lo, S, DC, NUM_STAGES, BLOCK_M, BLOCK_D, HEAD_D, N)
                    if i == LAG - 1:
                        mbarrier.arrive(go, count=1)
                i += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            sc = acc * qk_scale
            if t >= full_tiles:  # the tile reaches a row's own group or padded columns: masks
                h = t * N + cols  # absolute key group (G == G_P)
                on_diag = h[None, :] == g_abs[:, None]
                sc = gl.where(on_diag, diag[:, None], sc)
                defined = ((h[None, :] < g_abs[:, None]) & present[:, None]) | (on_diag & diag_def[:, None])
                col_ok = (t * KB + cols // G_P) < nb
                sc = gl.where(defined & col_ok[None, :], sc, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(sc, 1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(sc - m_safe[:, None])
            l_i = l_i * gl.exp2(m_i - m_safe) + gl.sum(p, 1)
            sums = gl.sum(gl.reshape(p, [R, KB, G_P]), 2)
            sums_l: gl.constexpr = sums.type.layout
            r2 = row_pid.to(gl.int64) * BLOCK_M + WG * R + gl.arange(0, R, layout=gl.SliceLayout(1, sums_l))
            c2 = t * KB + gl.arange(0, KB, layout=gl.SliceLayout(0, sums_l))
            gl.store(BSUM + r2[:, None] * (max_tiles * KB) + c2[None, :], sums)
            gl.store(tmax_rows + t, m_new)
            m_i = m_new
        if WG == 0:
            if total < LAG:  # (fewer steps than the lag: the second warpgroup has not been let go yet)
                mbarrier.arrive(go, count=1)
        ml = ML + (pid.to(gl.int64) * BLOCK_M + WG * R + gl.arange(0, R, layout=row_l)) * 2
        gl.store(ml, m_i)
        gl.store(ml + 1, l_i)

    @gluon.jit
    def _estimate_gluon_kernel(qd, kd, PINFO, RINFO, DIAG, BSUM, TMAX, ML, max_tiles, qk_scale,
                               KS: gl.constexpr, S: gl.constexpr, DC: gl.constexpr, KB: gl.constexpr,
                               G_P: gl.constexpr, NUM_STAGES: gl.constexpr, LAG: gl.constexpr):
        """One part of one row program's key tiles: partial running max and sum per row to ``ML``,
        block sums and tile maxima to ``BSUM`` / ``TMAX`` (as :func:`estimate._estimate_kernel`)."""
        BLOCK_M: gl.constexpr = qd.block_type.shape[0]
        BLOCK_D: gl.constexpr = qd.block_type.shape[1]
        N: gl.constexpr = kd.block_type.shape[0]
        HEAD_D: gl.constexpr = BLOCK_D * DC
        q_smem = gl.allocate_shared_memory(qd.dtype, [NUM_STAGES, BLOCK_M, BLOCK_D], qd.layout)
        k_smem = gl.allocate_shared_memory(kd.dtype, [NUM_STAGES, N, BLOCK_D], kd.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        go = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)  # both consumers
        mbarrier.init(go, count=1)
        fence_async_shared()
        # (the argument tuples written out in the call: a tuple assigned to a variable first would
        # turn its constexprs into tensors)
        gl.warp_specialize([
            (_consumer, (qd, kd, q_smem, k_smem, ready, empty, go, PINFO, RINFO, DIAG, BSUM, TMAX, ML, max_tiles,
                         qk_scale, 0, KS, S, DC, KB, G_P, NUM_STAGES, LAG, BLOCK_M, BLOCK_D, HEAD_D, N)),
            (_consumer, (qd, kd, q_smem, k_smem, ready, empty, go, PINFO, RINFO, DIAG, BSUM, TMAX, ML, max_tiles,
                         qk_scale, 1, KS, S, DC, KB, G_P, NUM_STAGES, LAG, BLOCK_M, BLOCK_D, HEAD_D, N)),
        ], [4])


def gluon_stages(config) -> tuple[int, int]:
    """(ring slots, lag): ``est_num_stages`` slots, of which the loads run ``slots - lag`` steps
    ahead; the first warpgroup may lead the second by up to ``lag - 1`` steps and the second the
    first by up to ``slots - lag - 1``. ``est_gluon_lag`` (0: half the slots, at least one)."""
    stages = max(2, config.est_num_stages)
    lag = config.est_gluon_lag or stages // 2
    if not 1 <= lag < stages:
        raise ValueError(f"est_gluon_lag={config.est_gluon_lag}: must be 0 (half of est_num_stages) or "
                         f"from 1 to est_num_stages - 1 ({stages - 1})")
    return stages, lag


def unsupported_reason(query: torch.Tensor, keys: torch.Tensor, G: int, G_P: int, block_m: int,
                       n_cols: int) -> str | None:
    """Why the Gluon loop cannot run for this step (None: it can)."""
    if gluon is None:
        return "this Triton has no Gluon"
    if query.device.type != "cuda" or torch.cuda.get_device_capability(query.device)[0] != 9:
        return "it needs a Hopper GPU (compute capability 9.x: wgmma and TMA)"
    if query.dtype not in (torch.bfloat16, torch.float16) or keys.dtype != query.dtype:
        return "it scores bf16/fp16 queries against keys of the same type (not fp8)"
    if G != G_P:
        return "its key tiles are whole key blocks of a power-of-two number of groups"
    if block_m != NUM_CONSUMERS * ROWS_PER_CONSUMER:
        return f"it takes programs of {NUM_CONSUMERS * ROWS_PER_CONSUMER} rows (est_block_m=128)"
    if n_cols > 256 or n_cols % 16:
        return "its key tiles are at most 256 groups (est_block_n <= 256)"
    return None


def program_info(op, query, kp, prepared, groups, params, first: int, n: int, shape) -> tuple[torch.Tensor, ...]:
    """``(PINFO, RINFO, DIAG)`` of the launch's row programs (:func:`_program_info_kernel`)."""
    cfg = op.config
    S = params.stride
    G, G_P, kb, block_m, qb, row_tiles = shape
    ks = max(1, cfg.est_key_splits)
    programs = n * op.num_kv_heads * row_tiles
    device = query.device
    pinfo = torch.empty((programs * ks, PINFO_FIELDS), dtype=torch.int32, device=device)
    rinfo = torch.empty((programs * block_m,), dtype=torch.int32, device=device)
    diag = torch.empty((programs * block_m,), dtype=torch.float32, device=device)
    _program_info_kernel[(programs,)](
        query, kp, pinfo, rinfo, diag, prepared.items, groups.supers, query.stride(0), query.stride(1),
        kp.shape[1], op.num_kv_heads, first, n,
        GROUP=op.group, GROUP_P=op.group_p, S=S, HALF=(S - 1) // 2 + 1, G=G, G_P=G_P, KB=kb, BLOCK_M=block_m,
        QB=qb, ROW_TILES=row_tiles, HEAD_D=op.head_size, HEAD_MAJOR=bool(cfg.est_head_major), KS=ks,
        num_warps=4,
    )
    return pinfo, rinfo, diag


def run_loop(op, qp, kp, pinfo, rinfo, diag, bsum, tmax, ml, max_tiles: int, qk_scale: float, params, shape,
             block_d: int) -> None:
    """The Gluon key-tile loop over every part of the launch's row programs."""
    cfg = op.config
    S = params.stride
    _, G_P, kb, block_m, _, _ = shape
    ks = max(1, cfg.est_key_splits)
    n_cols = kb * G_P
    dtype = gl.bfloat16 if qp.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_d], dtype)
    k_layout = gl.NVMMASharedLayout.get_default_for([n_cols, block_d], dtype)
    qd = GluonTensorDescriptor.from_tensor(qp, [block_m, block_d], q_layout)
    kd = GluonTensorDescriptor.from_tensor(kp.view(-1, S * op.head_size), [n_cols, block_d], k_layout)
    stages, lag = gluon_stages(cfg)
    _estimate_gluon_kernel[(pinfo.shape[0],)](
        qd, kd, pinfo, rinfo, diag, bsum, tmax, ml, max_tiles, qk_scale,
        KS=ks, S=S, DC=op.head_size // block_d, KB=kb, G_P=G_P, NUM_STAGES=stages, LAG=lag, num_warps=4,
    )
