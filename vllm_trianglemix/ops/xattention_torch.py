"""Dynamic (XAttention) rows in float32 torch, read from vLLM's paged KV cache (CPU path).

Executes a :class:`~vllm_trianglemix.pattern.QueryBlockPlan`: for each part of
a query block it gathers the keys ``0 .. last row`` through the block table,
computes the antidiagonal block masses of the block's present rows as
defined in :mod:`vllm_trianglemix.pattern`, keeps the blocks
:func:`~vllm_trianglemix.pattern.select_key_blocks` keeps, and attends under
that mask with :func:`~vllm_trianglemix.reference.attention_with_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_trianglemix.ops.fp8 import Fp8Scales, is_fp8, per_head
from vllm_trianglemix.pattern import DynamicParams, QueryBlockPlan, select_key_blocks
from vllm_trianglemix.reference import attention_with_mask


def antidiagonal_block_mass(q, k, q_pos0: int, q_block: int, block_size: int, stride: int,
                            scale: float) -> torch.Tensor:
    """Block masses ``[Hkv, q_block + 1]`` of one query-block part (float32).

    ``q``: the part's present rows ``[n, Hq, D]`` at positions ``q_pos0 ..``;
    ``k``: keys ``[>= q_pos0 + n, Hkv, D]`` at positions ``0 ..``.
    """
    n, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    B, S = block_size, stride
    G = B // S  # groups per block
    g0 = q_block * G  # first query group
    n_kgroups = (q_block + 1) * G
    # Present rows laid out by (group, s): row = g*S + S-1-s.
    qg = torch.zeros(G, S, num_heads, head_dim, dtype=torch.float32)
    present = torch.zeros(G, S, dtype=torch.bool)
    rows = torch.arange(q_pos0, q_pos0 + n)
    gi = rows // S - g0
    si = S - 1 - rows % S
    qg[gi, si] = q.float()
    present[gi, si] = True
    # Keys laid out by (group, s): key = h*S + s (zero past the last key: never causal).
    kpad = torch.zeros(n_kgroups * S, num_kv, head_dim, dtype=torch.float32)
    avail = min(k.shape[0], n_kgroups * S)
    kpad[:avail] = k[:avail].float()
    kg = kpad.view(n_kgroups, S, num_kv, head_dim)
    group = num_heads // num_kv
    kg = kg.repeat_interleave(group, dim=2)  # [H, S, Hq, D]
    a = torch.einsum("gsqd,hsqd->qgh", qg, kg) * (scale / S)  # [Hq, G, H]
    half = (S - 1) // 2 + 1  # diagonal group: terms s with 2s <= S-1
    diag_idx = torch.arange(G) + g0
    diag = torch.einsum("gsqd,gsqd->qg", qg[:, :half], kg[diag_idx, :half]) * (scale / S)
    h = torch.arange(n_kgroups)
    g_abs = torch.arange(G) + g0
    defined = (h[None, :] < g_abs[:, None]) & present.any(1)[:, None]
    a[:, torch.arange(G), diag_idx] = diag
    defined[torch.arange(G), diag_idx] = present[:, :half].any(1)
    a = a.masked_fill(~defined[None], float("-inf"))
    rows_defined = defined.any(1)
    p = torch.softmax(a[:, rows_defined], dim=-1)  # [Hq, G', H]
    per_block = p.sum(1).view(num_heads, q_block + 1, G).sum(-1)  # [Hq, blocks]
    return per_block.view(num_kv, group, q_block + 1).sum(1)


@dataclass
class TorchDynamicPlan:
    plan: QueryBlockPlan
    block_table: torch.Tensor


class TorchXAttentionOp:
    def prepare(self, plan: QueryBlockPlan, dense_from: np.ndarray, cam) -> TorchDynamicPlan:
        return TorchDynamicPlan(plan, cam.block_table_tensor)

    def run(self, query, key_cache, value_cache, prepared: TorchDynamicPlan,
            params: DynamicParams, scale: float, output, select=select_key_blocks,
            scales: Fp8Scales | None = None) -> None:
        """query/output: [tokens, heads, dim]; caches: [blocks, block_size, kv_heads, dim].

        An fp8 cache (and an fp8 query) is dequantized with ``scales`` as its keys are gathered.
        """
        plan, page = prepared.plan, key_cache.shape[1]
        B = params.block_size
        num_kv_heads = key_cache.shape[2]
        if (is_fp8(key_cache) or is_fp8(query)) and scales is None:
            raise ValueError("TriangleMix CPU op: fp8 inputs need their scales")

        def dequant(x, s):  # [T, Hkv, D] fp8 -> float32
            return x.float() * per_head(s, num_kv_heads)[:, None] if is_fp8(x) else x

        if is_fp8(query):
            group = query.shape[1] // num_kv_heads
            query = query.float() * per_head(scales.q, num_kv_heads).repeat_interleave(group)[:, None]
        for i in range(plan.num_items):
            req, tok, n = int(plan.req[i]), int(plan.q_tok[i]), int(plan.n_q[i])
            pos0, b = int(plan.q_pos[i]), int(plan.q_block[i])
            k_pos = torch.arange(0, pos0 + n)
            blocks = prepared.block_table[req, k_pos // page].long()
            keys = dequant(key_cache[blocks, k_pos % page], scales.k if scales else None)
            values = dequant(value_cache[blocks, k_pos % page], scales.v if scales else None)
            q = query[tok : tok + n]
            mass = antidiagonal_block_mass(q, keys, pos0, b, B, params.stride, scale)
            keep = select(mass, b, params.threshold, params.max_density)  # [Hkv, b+1]
            q_pos = torch.arange(pos0, pos0 + n)
            mask = keep[:, k_pos // B][:, None, :] & (k_pos[None, None, :] <= q_pos[None, :, None])
            out = attention_with_mask(q, keys, values, mask, scale)
            output[tok : tok + n] = out.to(output.dtype)
