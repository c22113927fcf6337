"""Select: per (query block, KV head) the kept key blocks, by the rule of
:func:`~vllm_trianglemix.pattern.select_key_blocks` (first block, diagonal block, the fewest
others by mass reaching the threshold, ties to the lower index, the threshold compared in
float64, the density cap), compacted into the ascending list of kept blocks before the
diagonal, their count and whether the diagonal is kept.

One Triton program per (item, KV head) finds the kept set without sorting: a binary search
over the float32 masses' bit patterns for the cut value, ties taken by index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_trianglemix.ops.triangle_triton import _next_pow2
from vllm_trianglemix.ops.xattention_triton.plan import KeptBlocks, round_up


@triton.jit
def _count_at_least(key, x):
    return tl.sum((key >= x).to(tl.int32), 0)


@triton.jit(do_not_specialize=["max_blocks", "stride_kept"])
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


def blocks_width(num_blocks: int, at_least: int = 16) -> int:
    """The selection's block axis: a power of two >= ``num_blocks`` (one compile per width)."""
    return max(16, at_least, _next_pow2(max(num_blocks, 1)))


def select(mass, q_block, params_tensor, params, width: int, keep_mask: bool = False) -> KeptBlocks:
    """The kept blocks of masses ``[items, kv_heads, blocks]`` or per row tile ``[.., row_tiles, blocks]``."""
    if mass.dim() == 3:
        mass = mass[:, :, None]
    mass = mass.contiguous()
    n, kv, row_tiles, nb = mass.shape
    dev = mass.device
    kept = torch.empty((n, kv, round_up(max(nb, 1))), dtype=torch.int32, device=dev)
    n_kept = torch.empty((n, kv), dtype=torch.int32, device=dev)
    diag_kept = torch.empty((n, kv), dtype=torch.int32, device=dev)
    keep = torch.empty((n, kv, nb), dtype=torch.int8, device=dev) if keep_mask else n_kept
    if n:
        _select_kernel[(n * kv,)](
            mass, q_block, params_tensor, kept, n_kept, diag_kept, keep,
            kv, nb, kept.stride(1),
            ROW_TILES=row_tiles, NB_P=blocks_width(nb, width), USE_TAU=params.threshold < 1.0,
            HAS_CAP=params.max_density is not None, WRITE_KEEP=keep_mask, num_warps=4,
        )
    return KeptBlocks(kept, n_kept, diag_kept, keep.bool() if keep_mask else None)
