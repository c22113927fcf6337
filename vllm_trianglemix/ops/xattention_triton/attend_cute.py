"""Attend through FlashAttention's CuTe-DSL forward (opt-in, ``attn_cute=1``): its block-sparse mode.

The same attention as attend.py, by the Hopper forward vLLM ships in ``vllm.vllm_flash_attn.cute``
(FlashAttention 4's CuTe-DSL kernels: TMA loads, warp-specialised producer and consumers, the
softmax overlapped with the GEMMs). Its block-sparse mode takes, per (batch, head, 128-row query
tile), a list of key tiles to attend in full and a list to attend under the mask; the selection
maps onto it as it stands:

* one call per request of the step, the KV heads as the batch: the query ``[kv_heads, rows,
  group, head_size]`` (a strided view of the step's query), the repacked keys and values
  ``[kv_heads, keys, 1, head_size]`` (repack.py: contiguous, read by TMA in 128-key tiles);
* the kept blocks before the diagonal as the full tiles, the diagonal block as the masked tile
  (FA4's causal mask, aligned to the end of the keys, is the diagonal block's causal mask);
  their lists have one head (the KV head's selection holds for its query heads);
* FA4's query tiles are 128 rows from the first row it is given: a request whose first row is
  not at a block boundary gets that many rows of zeros in front (a copy; their outputs are
  dropped), so that each tile is one query block.

Needs: vLLM's CuTe-DSL FlashAttention (``nvidia-cutlass-dsl``), a Hopper GPU, a bf16/fp16 query
and cache, blocks of 128 keys (the kernel's key tile) and head sizes up to 128 (the head sizes
whose Hopper tile is 128 keys wide). op.py falls back to the Triton attention otherwise, with
one warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TILE = 128
"""The CuTe-DSL Hopper forward's query and key tile for head sizes up to 128."""


@dataclass
class CuteRequest:
    """One request's rows of a step, as one FA4 call (the same for every layer of a plan)."""

    tok: int  # the first row in the step's query
    rows: int  # its rows (the items', consecutive)
    pad: int  # zero rows in front: the first row's offset in its block
    keys: int  # keys it attends: up to its last row
    req: int  # the request (its offset in the repacked buffers: Groups.host_reqs)
    items: torch.Tensor  # int64 [tiles]: its items in block order (one per query tile)
    q_block: torch.Tensor  # int32 [1, 1, tiles, 1]: each tile's diagonal block


def cute_requests(prepared, block_size: int) -> list[CuteRequest] | None:
    """Built once per plan from the host copy of the items; None where a request's items are not
    one run of consecutive blocks and rows (the plan always builds them so)."""
    key = ("cute", block_size)
    if key not in prepared.groups:
        items = prepared.host_items  # req, q_tok, q_pos, n_q, q_block
        dev = prepared.items.device
        out: list[CuteRequest] | None = []
        for r in np.unique(items[:, 0]) if len(items) else []:
            idx = np.nonzero(items[:, 0] == r)[0]
            idx = idx[np.argsort(items[idx, 4], kind="stable")]
            tok, pos, n, blk = (items[idx, i] for i in (1, 2, 3, 4))
            if (np.any(np.diff(blk) != 1) or np.any(tok[1:] != tok[:-1] + n[:-1])
                    or np.any(pos[1:] != pos[:-1] + n[:-1]) or pos[0] // block_size != blk[0]):
                out = None
                break
            out.append(CuteRequest(
                tok=int(tok[0]), rows=int(n.sum()), pad=int(pos[0] - blk[0] * block_size),
                keys=int(pos[-1] + n[-1]), req=int(r),
                items=torch.from_numpy(idx.astype(np.int64)).to(dev, non_blocking=True),
                q_block=torch.from_numpy(blk.astype(np.int32)).to(dev, non_blocking=True).view(1, 1, -1, 1),
            ))
        prepared.groups[key] = out
    return prepared.groups[key]


def usable(op, query, key_cache, fp8, block_size: int) -> str | None:
    """Why the CuTe-DSL attention cannot run this step (None: it can)."""
    if fp8.q_fp8 or fp8.kv_fp8:
        return "an fp8 query or cache"
    if query.dtype not in (torch.bfloat16, torch.float16) or key_cache.dtype != query.dtype:
        return f"dtype {query.dtype} (bf16/fp16 only)"
    if block_size != TILE:
        return f"blocks of {block_size} keys (the kernel's key tile is {TILE})"
    if op.head_size > 128 or op.head_size % 8:
        return f"head size {op.head_size} (up to 128, a multiple of 8)"
    if not query.is_cuda:
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(query.device)[0] != 9:
        return "its block-sparse tiles match the selection's blocks on Hopper GPUs only"
    try:
        from vllm.vllm_flash_attn.cute import flash_attn_func  # noqa: F401
    except ImportError as e:
        return f"vLLM's CuTe-DSL FlashAttention cannot be imported ({e}; it needs nvidia-cutlass-dsl)"
    return None


def sparse_tiles(blocks, request: CuteRequest, num_key_blocks: int):
    """FA4's block-sparse lists of one request, ``(mask count, mask blocks, full count, full
    blocks)``: ``[kv_heads, 1, tiles]`` counts, ``[kv_heads or 1, 1, tiles, width]`` blocks. The
    full tiles are the kept blocks before the diagonal, the masked tile the diagonal block."""
    items = request.items
    full_cnt = blocks.n_kept[items].t().unsqueeze(1).contiguous()
    full_idx = blocks.kept[items][:, :, :num_key_blocks].permute(1, 0, 2).unsqueeze(1).contiguous()
    mask_cnt = blocks.diag_kept[items].t().unsqueeze(1).contiguous()
    return mask_cnt, request.q_block, full_cnt, full_idx


def request_inputs(op, query, output, packed, request: CuteRequest):
    """FA4's ``(q, k, v, out)`` for one request, the KV heads as the batch: ``q`` ``[kv_heads, pad +
    rows, group, head_size]`` (a view of ``query``, or a copy with the zero rows in front), ``k`` and
    ``v`` ``[kv_heads, keys, 1, head_size]`` views of the repacked buffers, ``out`` the matching view
    of ``output`` (None when there are zero rows in front: FA4 allocates)."""
    kv, G = op.num_kv_heads, op.group
    reqs = packed.groups.host_reqs
    off = int(reqs[reqs[:, 0] == request.req, 1][0])
    r = request
    q = query[r.tok:r.tok + r.rows]
    out = None
    if r.pad:
        q = torch.cat([q.new_zeros((r.pad,) + q.shape[1:]), q])
    else:
        out = output[r.tok:r.tok + r.rows].unflatten(1, (kv, G)).permute(1, 0, 2, 3)
    q = q.unflatten(1, (kv, G)).permute(1, 0, 2, 3)
    k = packed.keys[:, off:off + r.keys].unsqueeze(2)
    v = packed.values[:, off:off + r.keys].unsqueeze(2)
    return q, k, v, out


def attend(op, query, prepared, params, scale: float, output, blocks, packed) -> bool:
    """Block-sparse attention of every item's rows over its kept blocks into ``output``, by
    FA4's CuTe-DSL forward; False (nothing written) where the plan's items do not map onto it."""
    from vllm.vllm_flash_attn.cute import flash_attn_func
    from vllm.vllm_flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    B = params.block_size
    requests = cute_requests(prepared, B)
    if requests is None:
        return False
    for r in requests:
        q, k, v, out = request_inputs(op, query, output, packed, r)
        tiles = BlockSparseTensorsTorch(*sparse_tiles(blocks, r, -(-r.keys // B)), block_size=(B, B))
        o = flash_attn_func(q, k, v, softmax_scale=scale, causal=True, block_sparse_tensors=tiles, out=out)
        o = o[0] if isinstance(o, tuple) else o
        if out is None or o.data_ptr() != out.data_ptr():
            output[r.tok:r.tok + r.rows] = o[:, r.pad:].permute(1, 0, 2, 3).flatten(1, 2).to(output.dtype)
    return True
