"""Random batches on a paged KV cache, and the float32 reference of their attention.

Shared by the CPU op tests, the Triton interpreter tests and the GPU tests.
A batch is a list of requests ``(prompt_len, first_pos, q_len)``: the request
has ``first_pos`` tokens already in the cache and ``q_len`` new query rows
(one chunk of a chunked prefill). Blocks are assigned in a shuffled order so
that block-table indexing is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_trianglemix.pattern import TriangleParams, dense_start, plan_blocks
from vllm_trianglemix.reference import reference_attention


@dataclass
class PagedBatch:
    query: torch.Tensor  # [T, Hq, D]
    key_cache: torch.Tensor  # [blocks, block_size, Hkv, D] view
    value_cache: torch.Tensor
    block_table: torch.Tensor  # int32 [R, max_blocks]
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    prompt_lens: np.ndarray
    keys: list[torch.Tensor]  # per request [seq_len, Hkv, D]
    values: list[torch.Tensor]
    scale: float
    reference_query: torch.Tensor | None = None  # the dequantized query when ``query`` is fp8


class FakeCommonMetadata:
    """What the ops' ``prepare`` reads from vLLM's CommonAttentionMetadata."""

    def __init__(self, batch: PagedBatch):
        self.block_table_tensor = batch.block_table


def make_batch(requests, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32,
               device="cpu", seed=0, key_layout="token_major") -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = np.array([p + q for _, p, q in requests], dtype=np.int64)
    q_lens = np.array([q for _, _, q in requests], dtype=np.int64)
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    blocks_per_req = [-(-int(s) // block_size) for s in seq_lens]
    total_blocks = sum(blocks_per_req) + 3
    order = torch.randperm(total_blocks, generator=gen)
    max_blocks = max(blocks_per_req)
    block_table = torch.zeros(len(requests), max_blocks, dtype=torch.int32)
    if key_layout == "token_major":
        k_store = torch.zeros(total_blocks, block_size, num_kv_heads, head_dim)
        key_cache = k_store
    else:  # channel-major per (block, head): the CPU kernel's layout
        k_store = torch.zeros(total_blocks, num_kv_heads, head_dim, block_size)
        key_cache = k_store.permute(0, 3, 1, 2)
    value_cache = torch.zeros(total_blocks, block_size, num_kv_heads, head_dim)
    keys, values, used = [], [], 0
    for r, s in enumerate(seq_lens):
        ids = order[used : used + blocks_per_req[r]]
        used += blocks_per_req[r]
        block_table[r, : len(ids)] = ids.to(torch.int32)
        k = torch.randn(int(s), num_kv_heads, head_dim, generator=gen)
        v = torch.randn(int(s), num_kv_heads, head_dim, generator=gen)
        pos = torch.arange(int(s))
        key_cache[ids[pos // block_size].long(), pos % block_size] = k
        value_cache[ids[pos // block_size].long(), pos % block_size] = v
        keys.append(k.to(dtype))
        values.append(v.to(dtype))
    query = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=gen)
    to = dict(dtype=dtype, device=device)
    if key_layout == "token_major":
        key_cache = k_store.to(**to)
    else:
        key_cache = k_store.to(**to).permute(0, 3, 1, 2)
    return PagedBatch(
        query=query.to(**to),
        key_cache=key_cache,
        value_cache=value_cache.to(**to),
        block_table=block_table.to(device),
        query_start_loc=qsl,
        seq_lens=seq_lens,
        prompt_lens=np.array([p for p, _, _ in requests], dtype=np.int64),
        keys=keys,
        values=values,
        scale=head_dim ** -0.5,
    )


def plan_for(batch: PagedBatch, params: TriangleParams, min_prompt_len: int, block_q: int):
    dense_from = dense_start(batch.prompt_lens, params.n_last, min_prompt_len)
    reqs = np.arange(len(batch.seq_lens))
    plan = plan_blocks(batch.query_start_loc, batch.seq_lens, dense_from, reqs, params, block_q)
    return plan, dense_from


def reference_output(batch: PagedBatch, params: TriangleParams, min_prompt_len: int) -> torch.Tensor:
    """Brute-force float32 attention of every query row of the batch."""
    outs = []
    for r in range(len(batch.seq_lens)):
        lo, hi = batch.query_start_loc[r], batch.query_start_loc[r + 1]
        first = int(batch.seq_lens[r]) - int(hi - lo)
        ds = int(dense_start(batch.prompt_lens[r], params.n_last, min_prompt_len))
        dev = batch.query.device
        query = batch.query if batch.reference_query is None else batch.reference_query
        outs.append(
            reference_attention(
                query[lo:hi], batch.keys[r].to(dev), batch.values[r].to(dev), first, ds,
                params.n_init, params.n_local, batch.scale,
            )
        )
    return torch.cat(outs)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return float((out - ref).norm() / ref.norm())


def to_fp8(batch: PagedBatch, k_scale: torch.Tensor, v_scale: torch.Tensor,
           q_scale: torch.Tensor | None = None) -> PagedBatch:
    """The batch with an fp8 (e4m3) cache, as vLLM stores it: ``x8 = fp8(x / scale)``.

    Scales are float32, one value or one per KV head; values beyond e4m3's range saturate. The reference K/V
    (``keys``/``values``) become the dequantized cache, ``float(x8) * scale``,
    so the float32 reference is the exact answer for this cache. With
    ``q_scale`` the query is quantized too (vLLM does it for FA3) and
    ``reference_query`` holds its dequantized value.
    """
    import dataclasses

    def quant(x, s):  # x [..., Hkv, D]; saturating, as vLLM's kernels quantize
        return (x.float() / s.to(x.device).reshape(-1, 1)).clamp(-448, 448).to(torch.float8_e4m3fn)

    def dequant(x8, s):
        return x8.float() * s.to(x8.device).reshape(-1, 1)

    kc, vc = quant(batch.key_cache, k_scale), quant(batch.value_cache, v_scale)
    keys = [dequant(quant(k, k_scale), k_scale) for k in batch.keys]
    values = [dequant(quant(v, v_scale), v_scale) for v in batch.values]
    out = dataclasses.replace(batch, key_cache=kc, value_cache=vc, keys=keys, values=values)
    if q_scale is not None:
        hq, hkv = batch.query.shape[1], batch.key_cache.shape[2]
        qs = q_scale.reshape(-1).float().expand(hkv).repeat_interleave(hq // hkv)
        q8 = (batch.query.float() / qs.to(batch.query.device)[:, None]).clamp(-448, 448).to(
            torch.float8_e4m3fn)
        out = dataclasses.replace(out, query=q8, reference_query=q8.float() * qs.to(q8.device)[:, None])
    return out
