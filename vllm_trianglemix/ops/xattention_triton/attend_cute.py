"""Attend through FlashAttention's CuTe-DSL forward, block-sparse (``attn_cute``; default on Hopper).

The same attention as attend.py, by the Hopper forward vLLM ships in ``vllm.vllm_flash_attn.cute``
(FlashAttention 4's CuTe-DSL kernels: TMA loads, warp-specialised producer and consumers, the
softmax overlapped with the GEMMs). Its block-sparse mode takes, per (batch, head, 128-row query
tile), a list of key tiles to attend in full and a list to attend under the causal mask; the
selection maps onto it as it stands:

* one call per request of the step, the KV heads as the batch: the query ``[kv_heads, rows,
  group, head_size]`` (a strided view of the step's query), the repacked keys and values
  ``[kv_heads, keys, 1, head_size]`` (repack.py: contiguous, read by TMA);
* the kept blocks before the diagonal as full tiles, the diagonal block as masked tiles (FA4's
  causal mask, aligned to the end of the keys, is the diagonal block's causal mask); the lists
  have one head (a KV head's selection holds for its query heads). Key tiles are 128 keys for
  head sizes up to 128 (one tile per block) and 64 for larger heads (two per block: the kernel's
  shared memory holds no wider tile of a 256-wide head);
* FA4's query tiles are 128 rows from the first row it is given: a request whose first row is
  not at a block boundary gets that many rows of zeros in front (a copy; their outputs are
  dropped), so that each tile is one query block.

Needs: vLLM's CuTe-DSL FlashAttention (``nvidia-cutlass-dsl``, ``quack-kernels``), a Hopper GPU,
a bf16/fp16 query and cache, blocks of 128 keys and head sizes up to 256. Elsewhere op.py runs
the Triton attention (silently by default; with one warning where ``attn_cute=1`` asked for
this one). The tile size is FA4's forward entry argument (``_flash_attn_fwd``;
``flash_attn_func`` does not take it): a release that changes that entry is refused at its
first step and the Triton attention runs, with one warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 128
"""The selection's block (``block_size``) this path takes: one 128-row query tile per block."""


def kv_tile(head_size: int) -> int:
    """FA4's key tile on Hopper: 128 keys up to head size 128, 64 above (two per block)."""
    return 128 if head_size <= 128 else 64


@dataclass
class CuteRequest:
    """One request's rows of a step, as one FA4 call (the same for every layer of a plan)."""

    tok: int  # the first row in the step's query
    rows: int  # its rows (the items', consecutive)
    pad: int  # zero rows in front: the first row's offset in its block
    keys: int  # keys it attends: up to its last row
    req: int  # the request (its offset in the repacked buffers: Groups.host_reqs)
    items: torch.Tensor  # int64 [tiles]: its items in block order (one per query tile)
    diag_tiles: torch.Tensor  # int32 [1, 1, tiles, key tiles per block]: the diagonal block's key tiles
    diag_count: torch.Tensor  # int32 [tiles]: those below the request's last key (all but in the last)


def cute_requests(prepared, block_size: int, tile_n: int) -> list[CuteRequest] | None:
    """Built once per plan from the host copy of the items; None where a request's items are not
    one run of consecutive blocks and rows (the plan always builds them so)."""
    key = ("cute", block_size, tile_n)
    if key not in prepared.groups:
        items = prepared.host_items  # req, q_tok, q_pos, n_q, q_block
        dev = prepared.items.device
        per_block = block_size // tile_n
        out: list[CuteRequest] | None = []
        for r in np.unique(items[:, 0]) if len(items) else []:
            idx = np.nonzero(items[:, 0] == r)[0]
            idx = idx[np.argsort(items[idx, 4], kind="stable")]
            tok, pos, n, blk = (items[idx, i] for i in (1, 2, 3, 4))
            if (np.any(np.diff(blk) != 1) or np.any(tok[1:] != tok[:-1] + n[:-1])
                    or np.any(pos[1:] != pos[:-1] + n[:-1]) or pos[0] // block_size != blk[0]):
                out = None
                break
            keys = int(pos[-1] + n[-1])
            count = np.full(len(idx), per_block)
            count[-1] = min(per_block, -(-(keys - int(blk[-1]) * block_size) // tile_n))
            tiles = (blk[:, None] * per_block + np.arange(per_block))[None, None]
            out.append(CuteRequest(
                tok=int(tok[0]), rows=int(n.sum()), pad=int(pos[0] - blk[0] * block_size), keys=keys,
                req=int(r), items=torch.from_numpy(idx.astype(np.int64)).to(dev, non_blocking=True),
                diag_tiles=torch.from_numpy(tiles.astype(np.int32)).to(dev, non_blocking=True),
                diag_count=torch.from_numpy(count.astype(np.int32)).to(dev, non_blocking=True),
            ))
        prepared.groups[key] = out
    return prepared.groups[key]


def usable(op, query, key_cache, fp8, block_size: int) -> str | None:
    """Why the CuTe-DSL attention cannot run this step (None: it can)."""
    if fp8.q_fp8 or fp8.kv_fp8:
        return "an fp8 query or cache"
    if query.dtype not in (torch.bfloat16, torch.float16) or key_cache.dtype != query.dtype:
        return f"dtype {query.dtype} (bf16/fp16 only)"
    if block_size != BLOCK:
        return f"blocks of {block_size} keys (its query tile is {BLOCK} rows, one block)"
    if op.head_size > 256 or op.head_size % 8:
        return f"head size {op.head_size} (up to 256, a multiple of 8)"
    if not query.is_cuda:
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(query.device)[0] != 9:
        return "its block-sparse tiles match the selection's blocks on Hopper GPUs only"
    try:
        from vllm.vllm_flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
        from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd  # noqa: F401
    except ImportError as e:
        return f"vLLM's CuTe-DSL FlashAttention cannot be imported ({e}; it needs nvidia-cutlass-dsl and quack-kernels)"
    return None


def sparse_tiles(blocks, request: CuteRequest, tile_n: int):
    """FA4's block-sparse lists of one request, ``(mask count, mask tiles, full count, full
    tiles)``: ``[kv_heads, 1, tiles]`` counts, ``[kv_heads or 1, 1, tiles, width]`` key tiles.
    The full tiles are those of the kept blocks before the diagonal, the masked ones the diagonal
    block's (up to the request's last key)."""
    items, per_block = request.items, request.diag_tiles.shape[-1]
    blocks_below = -(-request.keys // (tile_n * per_block))
    kept = blocks.kept[items][:, :, :blocks_below]  # [tiles, kv, width] (unread past each count)
    if per_block > 1:
        kept = (kept.unsqueeze(-1) * per_block + torch.arange(per_block, dtype=kept.dtype,
                                                           device=kept.device)).flatten(2)
    full_idx = kept[:, :, :-(-request.keys // tile_n)].permute(1, 0, 2).unsqueeze(1).contiguous()
    full_cnt = (blocks.n_kept[items] * per_block).t().unsqueeze(1).contiguous()
    mask_cnt = (blocks.diag_kept[items] * request.diag_count[:, None]).t().unsqueeze(1).contiguous()
    return mask_cnt, request.diag_tiles, full_cnt, full_idx


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
    from vllm.vllm_flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd

    B, tile_n = params.block_size, kv_tile(op.head_size)
    requests = cute_requests(prepared, B, tile_n)
    if requests is None:
        return False
    for r in requests:
        q, k, v, out = request_inputs(op, query, output, packed, r)
        tiles = BlockSparseTensorsTorch(*sparse_tiles(blocks, r, tile_n), block_size=(B, tile_n))
        o = _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, tile_mn=(B, tile_n),
                            block_sparse_tensors=tiles, out=out)[0]
        if out is None or o.data_ptr() != out.data_ptr():
            output[r.tok:r.tok + r.rows] = o[:, r.pad:].permute(1, 0, 2, 3).flatten(1, 2).to(output.dtype)
    return True
