"""Repack: the keys (and values) a step reads, from the paged cache into contiguous buffers.

One pass per step: ``KP[kv_head, offset + pos, :]`` for each request's positions,
zeros past its keys up to whole estimate tiles. fp8 (e4m3) caches are
converted exactly to the buffers' dtype (bf16/fp16) or copied as they are
(an fp8 buffer); the dequantization scales stay out. The estimate and the
attention then read whole 128-byte+ rows at affine addresses, with no block-table
lookups in their loops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_bt", "rows_per_head"])
def _repack_kernel(
    K, V, KP, VP, reqs, block_table,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt, rows_per_head, page_size,
    RB: tl.constexpr, HEAD_D: tl.constexpr, WITH_V: tl.constexpr,
):
    """Rows ``[c*RB, (c+1)*RB)`` of request row ``r`` (req, offset, keys, padded keys), one KV head."""
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
        dst = (kv_head.to(tl.int64) * rows_per_head + off + pos)[:, None] * HEAD_D + offs_d[None, :]
        k = tl.load(K + blk[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                    + offs_d[None, :] * stride_kd, mask=ok[:, None], other=0.0)
        tl.store(KP + dst, k.to(KP.dtype.element_ty), mask=(pos < n_pad)[:, None])
        if WITH_V:
            v = tl.load(V + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                        + offs_d[None, :] * stride_vd, mask=ok[:, None], other=0.0)
            tl.store(VP + dst, v.to(VP.dtype.element_ty), mask=(pos < n_pad)[:, None])


def repack(key_cache, value_cache, block_table, groups, num_kv_heads: int, head_size: int,
           dtype, with_values: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(KP, VP)``, each ``[kv_heads, total keys, head_size]`` (VP None unless ``with_values``)."""
    shape = (num_kv_heads, max(groups.total_keys, 1), head_size)
    kp = torch.empty(shape, dtype=dtype, device=key_cache.device)
    vp = torch.empty(shape, dtype=dtype, device=key_cache.device) if with_values else None
    rb = 64
    if groups.reqs.shape[0]:
        _repack_kernel[(-(-groups.max_pad // rb), groups.reqs.shape[0], num_kv_heads)](
            key_cache, value_cache, kp, kp if vp is None else vp, groups.reqs, block_table,
            *key_cache.stride(), *value_cache.stride(), block_table.stride(0), kp.shape[1],
            key_cache.shape[1], RB=rb, HEAD_D=head_size, WITH_V=with_values, num_warps=4,
        )
    return kp, vp
