"""Triangle attention in float32 torch, read from vLLM's paged KV cache (CPU path).

Executes a :class:`~vllm_trianglemix.pattern.BlockPlan`: for every work item
it gathers the keys of the item's ranges through the block table and calls
:func:`~vllm_trianglemix.reference.masked_attention`, the routine the tests use
as the reference, so the CPU path is the exact rule in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_trianglemix.ops.fp8 import Fp8Scales, check_scales, dequantize, dequantize_query
from vllm_trianglemix.pattern import BlockPlan, TriangleParams
from vllm_trianglemix.reference import masked_attention


@dataclass
class TorchPlan:
    plan: BlockPlan
    dense_from: np.ndarray
    block_table: torch.Tensor


class TorchTriangleOp:
    block_q = 256

    def prepare(self, plan: BlockPlan, dense_from: np.ndarray, cam) -> TorchPlan:
        return TorchPlan(plan, dense_from, cam.block_table_tensor)

    def run(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        prepared: TorchPlan,
        params: TriangleParams,
        scale: float,
        output: torch.Tensor,
        scales: Fp8Scales | None = None,
    ) -> None:
        """query/output: [tokens, heads, dim]; caches: [blocks, block_size, kv_heads, dim].

        An fp8 cache is dequantized with ``scales`` as its keys are gathered.
        """
        plan, block_size = prepared.plan, key_cache.shape[1]
        num_kv_heads = key_cache.shape[2]
        check_scales(query, key_cache, scales, "CPU op")
        query = dequantize_query(query, scales, num_kv_heads)
        for i in range(plan.num_items):
            req, tok, n = int(plan.req[i]), int(plan.q_tok[i]), int(plan.n_q[i])
            k_pos = torch.cat(
                [
                    torch.arange(0, int(plan.sink_end[i])),
                    torch.arange(int(plan.k_start[i]), int(plan.k_end[i])),
                ]
            )
            blocks = prepared.block_table[req, k_pos // block_size].long()
            offsets = k_pos % block_size
            q_pos = torch.arange(int(plan.q_pos[i]), int(plan.q_pos[i]) + n)
            out = masked_attention(
                query[tok : tok + n],
                dequantize(key_cache[blocks, offsets], scales.k if scales else None, num_kv_heads),
                dequantize(value_cache[blocks, offsets], scales.v if scales else None, num_kv_heads),
                q_pos,
                k_pos,
                int(prepared.dense_from[req]),
                params.n_init,
                params.n_local,
                scale,
            )
            output[tok : tok + n] = out.to(output.dtype)
