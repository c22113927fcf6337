"""Attend through FlashAttention 3 (opt-in, ``attn_fa3=1``): the kept blocks as a page table.

The same attention as attend.py, by vLLM's own FA3 kernel on the paged cache: for each KV head,
each item (a query block's rows in this step) is one FA3 sequence whose keys are its kept blocks
before the diagonal, in ascending order, followed by the diagonal block up to the item's last
row. Its page table lists those blocks' cache pages (``block_size / page_size`` pages per
block), and FA3's causal mask, aligned to the end of the keys, is then exactly the diagonal
block's causal mask: row ``p`` sees the kept blocks whole and the diagonal block's keys up to
``p``. The diagonal block is always kept by the selection rule (pattern.select_key_blocks).

Needs: vLLM's FA3 (``vllm.vllm_flash_attn``), a bf16/fp16 cache and query, and cache pages that
tile the blocks (``block_size % page_size == 0``); op.py falls back to the Triton attention
otherwise. Per KV head, the items' queries are gathered into one packed buffer and the outputs
scattered back (FA3 takes each sequence's rows contiguous); everything stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Fa3Rows:
    """The step's rows as FA3 sequences (the same for every layer and KV head of a plan)."""

    rows: torch.Tensor  # int64 [total]: the query rows of the items, item after item
    cu_seqlens_q: torch.Tensor  # int32 [items + 1]
    max_seqlen_q: int
    max_seqlen_k: int  # an upper bound: the diagonal blocks' ends
    diag_keys: torch.Tensor  # int32 [items]: keys of the diagonal block up to the item's last row
    req: torch.Tensor  # int64 [items]
    q_block: torch.Tensor  # int64 [items]: the plan's own (prepared.q_block)


def fa3_rows(prepared, block_size: int) -> Fa3Rows:
    """Built once per plan from the host copy of the items (no device synchronisation)."""
    key = ("fa3", block_size)
    if key not in prepared.groups:
        items = prepared.host_items  # req, q_tok, q_pos, n_q, q_block
        req, q_tok, q_pos, n_q, b = (items[:, i] for i in range(5))
        rows = np.concatenate([np.arange(t, t + n) for t, n in zip(q_tok, n_q)]) if len(items) else \
            np.zeros(0, dtype=np.int64)
        last = q_pos + n_q - 1
        dev = prepared.items.device
        prepared.groups[key] = Fa3Rows(
            rows=torch.from_numpy(rows.astype(np.int64)).to(dev, non_blocking=True),
            cu_seqlens_q=torch.from_numpy(np.concatenate([[0], np.cumsum(n_q)]).astype(np.int32))
            .to(dev, non_blocking=True),
            max_seqlen_q=int(n_q.max()) if len(items) else 0,
            max_seqlen_k=int((last + 1).max()) if len(items) else 0,
            diag_keys=torch.from_numpy((last - b * block_size + 1).astype(np.int32)).to(dev, non_blocking=True),
            req=torch.from_numpy(req.astype(np.int64)).to(dev, non_blocking=True),
            q_block=prepared.q_block,
        )
    return prepared.groups[key]


def page_table(blocks, seqs: Fa3Rows, block_table: torch.Tensor, kv_head: int, block_size: int,
               page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(page table ``[items, (kept width + 1) * pages per block]``, keys per sequence) of one KV head.

    Slot ``n_kept`` of each row holds the diagonal block (so do the slots after it, which FA3
    does not read: they lie past the sequence's keys).
    """
    per_block = block_size // page_size
    kept = blocks.kept[:, kv_head].to(torch.int64)  # [items, width]
    n_kept = blocks.n_kept[:, kv_head].to(torch.int64)
    width = kept.shape[1] + 1
    slot = torch.arange(width, device=kept.device)
    padded = torch.cat([kept, seqs.q_block[:, None]], 1)
    chosen = torch.where(slot[None, :] < n_kept[:, None], padded, seqs.q_block[:, None])
    page = chosen[:, :, None] * per_block + torch.arange(per_block, device=kept.device)
    # (a last block's pages past the table's width are never read: they lie past the keys)
    page = page.clamp_(max=block_table.shape[1] - 1)
    pages = block_table[seqs.req[:, None, None], page].reshape(kept.shape[0], width * per_block)
    seqused_k = (n_kept * block_size + seqs.diag_keys).to(torch.int32)
    return pages.to(torch.int32), seqused_k


def usable(op, query, key_cache, fp8, block_size: int) -> str | None:
    """Why the FA3 attention cannot run this step (None: it can)."""
    if fp8.q_fp8 or fp8.kv_fp8:
        return "an fp8 query or cache"
    if query.dtype not in (torch.bfloat16, torch.float16) or key_cache.dtype != query.dtype:
        return f"dtype {query.dtype} (bf16/fp16 only)"
    page_size = key_cache.shape[1]
    if block_size % page_size:
        return f"cache pages of {page_size} tokens do not tile blocks of {block_size}"
    if not query.is_cuda:
        return "not a CUDA tensor"
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    except ImportError:
        return "vLLM's FlashAttention is not installed"
    if torch.cuda.get_device_capability(query.device)[0] != 9 or not is_fa_version_supported(3):
        return "FlashAttention 3 runs on Hopper GPUs only"
    return None


def attend(op, query, key_cache, value_cache, prepared, params, scale: float, output, blocks) -> None:
    """Block-sparse attention of every item's rows over its kept blocks into ``output``, by FA3."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    B = params.block_size
    seqs = fa3_rows(prepared, B)
    if seqs.rows.numel() == 0:
        return
    page_size = key_cache.shape[1]
    G = op.group
    for h in range(op.num_kv_heads):
        pages, seqused_k = page_table(blocks, seqs, prepared.block_table, h, B, page_size)
        heads = slice(h * G, (h + 1) * G)
        q_h = query[seqs.rows, heads]  # a packed copy (the cache's head stays a strided view)
        out_h = torch.empty_like(q_h)
        flash_attn_varlen_func(
            q=q_h, k=key_cache[:, :, h:h + 1], v=value_cache[:, :, h:h + 1], out=out_h,
            cu_seqlens_q=seqs.cu_seqlens_q, max_seqlen_q=seqs.max_seqlen_q, seqused_k=seqused_k,
            max_seqlen_k=seqs.max_seqlen_k, softmax_scale=scale, causal=True, block_table=pages,
            fa_version=3)
        output[seqs.rows, heads] = out_h.to(output.dtype)
