"""Triangle attention in Triton, read straight from vLLM's paged KV cache (GPU path).

One launch computes every triangle-layer prompt row of a batch: the work
items of a :class:`~vllm_trianglemix.pattern.BlockPlan` (any number of
requests, chunked prefills, dense and triangle rows). A program takes one
item and one KV head and packs the item's rows of all the query heads that
share that KV head (GQA) into one ``BLOCK_M = BLOCK_Q * GROUP_P`` tile, so a
K/V tile loaded once serves the whole group. It visits only the item's key
ranges (sinks, then the window or the whole row), reading K/V through the
block table with the strides of the cache views it is given (the layout of
the stock backend, never assumed), masks with :func:`pattern.visible` only
where :func:`pattern.tile_fully_visible` says a tile needs it, and keeps an
online softmax in float32. Items come heaviest first, so long items start
first.

In the engine the plan holds only the rows below each dense start (the last
``n_last`` rows run on the stock backend); plans that hold dense rows too (the
op-level tests) are computed the same way, one item per block.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from vllm.logger import init_logger

from vllm_trianglemix import pattern, settings
from vllm_trianglemix.ops.fp8 import Fp8Scales, kernel_fp8_args
from vllm_trianglemix.pattern import ITEM_FIELDS, BlockPlan, TriangleParams

LOG2E = 1.4426950408889634
CONFIG_ENV = settings.KERNEL_CONFIG
RETIRED_FIELDS = ("split_kv",)
"""Fields of earlier releases, ignored with one warning: ``split_kv`` split long dense rows over
several programs, and the stock backend now computes the dense rows."""

logger = init_logger("vllm.trianglemix")


def _jit_rule(fn):
    """``triton.jit`` a rule from pattern.py (which does not import Triton)."""
    return triton.jit(
        types.FunctionType(fn.__code__, {**fn.__globals__, "tl": tl}, fn.__name__)
    )


_visible = _jit_rule(pattern.visible)
_tile_fully_visible = _jit_rule(pattern.tile_fully_visible)
_unmasked_key_span = _jit_rule(pattern.unmasked_key_span)

MASK_NONE, MASK_ALWAYS, MASK_PER_TILE = 0, 1, 2


@triton.jit
def _load_cache_t(K, blk, slot, kv_head, stride_b, stride_s, stride_h, stride_d, offs_d, ok, like,
                  KV_FP8: tl.constexpr, MASKED: tl.constexpr):
    """Cache rows at (block, slot) pairs as a ``[HEAD_D, n]`` tile (zero where not ``ok`` if
    ``MASKED``), converted to ``like``'s dtype when the cache is fp8."""
    ptrs = K + blk[None, :] * stride_b + slot[None, :] * stride_s + kv_head * stride_h + offs_d[:, None] * stride_d
    if MASKED:
        k = tl.load(ptrs, mask=ok[None, :], other=0.0)
    else:
        k = tl.load(ptrs)
    if KV_FP8:
        k = k.to(like.dtype)  # exact: e4m3 values are bf16/fp16 values; k_scale is in qk_scale
    return k


@triton.jit
def _load_cache(V, blk, slot, kv_head, stride_b, stride_s, stride_h, stride_d, offs_d, ok, like,
                KV_FP8: tl.constexpr, MASKED: tl.constexpr):
    """Cache rows at (block, slot) pairs as an ``[n, HEAD_D]`` tile (zero where not ``ok`` if
    ``MASKED``), converted to ``like``'s dtype when the cache is fp8."""
    ptrs = V + blk[:, None] * stride_b + slot[:, None] * stride_s + kv_head * stride_h + offs_d[None, :] * stride_d
    if MASKED:
        v = tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        v = tl.load(ptrs)
    if KV_FP8:
        v = v.to(like.dtype)  # exact; v_scale is applied to the output (k_scale: in qk_scale)
    return v


@triton.jit
def _fp8_scales(qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr, kv_head,
                stride_q_scale, stride_k_scale, stride_v_scale,
                Q_FP8: tl.constexpr, KV_FP8: tl.constexpr):
    """(score scale, output scale) with the fp8 dequantization scales folded in.

    fp8 inputs are converted exactly to bf16/fp16 for ``tl.dot``; a cached value
    ``x8`` stands for ``float(x8) * scale``, so ``q_scale * k_scale`` multiplies
    the scores and ``v_scale`` the normalised output.
    """
    out_scale = 1.0
    if Q_FP8:
        qk_scale = qk_scale * tl.load(q_scale_ptr + kv_head * stride_q_scale)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head * stride_k_scale)
        out_scale = tl.load(v_scale_ptr + kv_head * stride_v_scale)
    return qk_scale, out_scale


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, lo, t_begin, t_end, hi,
    q_pos, q_lo, q_hi, dense_from, n_init, n_local,
    K, V, bt_row, block_size, kv_head,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    qk_scale,
    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, MASK: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Online softmax over key tiles ``lo + t*BLOCK_N`` for t in [t_begin, t_end), keys < hi.

    MASK: 0 = tiles known fully visible, 1 = mask every tile,
    2 = mask the tiles ``tile_fully_visible`` cannot vouch for.
    """
    offs_d = tl.arange(0, HEAD_D)
    for t in range(t_begin, t_end):
        n0 = lo + t * BLOCK_N
        k_idx = n0 + tl.arange(0, BLOCK_N)
        in_range = k_idx < hi
        blk = tl.load(bt_row + k_idx // block_size, mask=in_range, other=0).to(tl.int64)
        slot = (k_idx % block_size).to(tl.int64)
        k = _load_cache_t(K, blk, slot, kv_head, stride_kb, stride_ks, stride_kh, stride_kd,
                          offs_d, in_range, q, KV_FP8, True)
        s = tl.dot(q, k) * qk_scale
        if MASK == 1:
            seen = _visible(q_pos[:, None], k_idx[None, :], dense_from, n_init, n_local)
            s = tl.where(seen & in_range[None, :], s, float("-inf"))
        if MASK == 2:
            full = _tile_fully_visible(q_lo, q_hi, n0, n0 + BLOCK_N - 1, dense_from, n_init, n_local)
            if (n0 + BLOCK_N > hi) | (full == 0):
                seen = _visible(q_pos[:, None], k_idx[None, :], dense_from, n_init, n_local)
                s = tl.where(seen & in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_cache(V, blk, slot, kv_head, stride_vb, stride_vs, stride_vh, stride_vd,
                        offs_d, in_range, q, KV_FP8, True)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["stride_bt"])  # the block table's width varies by engine
def _triangle_attention_kernel(
    Q, K, V, O,
    items, dense_from_ptr, block_table,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt, num_kv_heads, block_size, n_init, n_local, qk_scale,
    q_scale_ptr, k_scale_ptr, v_scale_ptr, stride_q_scale, stride_k_scale, stride_v_scale,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_N_SINK: tl.constexpr, HEAD_D: tl.constexpr,
    MASK_MODE: tl.constexpr, Q_FP8: tl.constexpr, KV_FP8: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    pid = tl.program_id(0)
    item = pid // num_kv_heads
    kv_head = pid % num_kv_heads
    it = items + item * 7
    req = tl.load(it + 0)
    q_tok = tl.load(it + 1)
    q_lo = tl.load(it + 2)
    n_q = tl.load(it + 3)
    sink_end = tl.load(it + 4)
    k_start = tl.load(it + 5)
    k_end = tl.load(it + 6)
    dense_from = tl.load(dense_from_ptr + req)

    offs_m = tl.arange(0, BLOCK_M)
    g = offs_m // BLOCK_Q
    i = offs_m % BLOCK_Q
    row_ok = (g < GROUP) & (i < n_q)
    q_head = (kv_head * GROUP + g).to(tl.int64)
    tok = (q_tok + i).to(tl.int64)
    offs_d = tl.arange(0, HEAD_D)
    q = tl.load(
        Q + tok[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )
    # fp8 inputs: converted exactly to the output dtype for tl.dot, their
    # scales folded into the score scale (q, k) and the output (v).
    if Q_FP8:
        q = q.to(O.dtype.element_ty)
    qk_scale, out_scale = _fp8_scales(qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr, kv_head,
                                      stride_q_scale, stride_k_scale, stride_v_scale, Q_FP8, KV_FP8)
    q_pos = q_lo + i
    q_hi = q_lo + n_q - 1

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    bt_row = block_table + req.to(tl.int64) * stride_bt
    # Sinks: a few keys, narrow tiles, always masked.
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, 0, 0, tl.cdiv(sink_end, BLOCK_N_SINK), sink_end,
        q_pos, q_lo, q_hi, dense_from, n_init, n_local, K, V, bt_row, block_size, kv_head,
        stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
        qk_scale, BLOCK_N_SINK, HEAD_D, 1, KV_FP8,
    )
    n_tiles = tl.cdiv(k_end - k_start, BLOCK_N)
    if MASK_MODE == 1:
        # Masked tiles before the span every row sees, unmasked tiles inside it, masked after.
        span_lo, span_hi = _unmasked_key_span(q_lo, q_hi, dense_from, n_init, n_local)
        a = tl.minimum(tl.maximum(span_lo, k_start), k_end)
        b = tl.minimum(tl.maximum(span_hi, a), k_end)
        t1 = tl.cdiv(a - k_start, BLOCK_N)
        t2 = tl.maximum((b - k_start) // BLOCK_N, t1)
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_start, 0, t1, k_end,
            q_pos, q_lo, q_hi, dense_from, n_init, n_local, K, V, bt_row, block_size, kv_head,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            qk_scale, BLOCK_N, HEAD_D, 1, KV_FP8,
        )
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_start, t1, t2, k_end,
            q_pos, q_lo, q_hi, dense_from, n_init, n_local, K, V, bt_row, block_size, kv_head,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            qk_scale, BLOCK_N, HEAD_D, 0, KV_FP8,
        )
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_start, t2, n_tiles, k_end,
            q_pos, q_lo, q_hi, dense_from, n_init, n_local, K, V, bt_row, block_size, kv_head,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            qk_scale, BLOCK_N, HEAD_D, 1, KV_FP8,
        )
    elif MASK_MODE == 2:
        # One loop, every tile masked.
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_start, 0, n_tiles, k_end,
            q_pos, q_lo, q_hi, dense_from, n_init, n_local, K, V, bt_row, block_size, kv_head,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            qk_scale, BLOCK_N, HEAD_D, 1, KV_FP8,
        )
    else:
        # One loop, masking the tiles tile_fully_visible cannot vouch for.
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_start, 0, n_tiles, k_end,
            q_pos, q_lo, q_hi, dense_from, n_init, n_local, K, V, bt_row, block_size, kv_head,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            qk_scale, BLOCK_N, HEAD_D, 2, KV_FP8,
        )
    out = acc * (out_scale / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
    tl.store(
        O + tok[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :],
        out.to(O.dtype.element_ty), mask=row_ok[:, None],
    )


@dataclass(frozen=True)
class KernelConfig:
    # Defaults: the fastest of `bench kernel`'s sweep on an H100 (BENCHMARKS.md).
    block_m: int = 128
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 3
    mask_mode: int = 0  # 0: one loop, a per-tile check; 1: masked/unmasked/masked loops; 2: one loop, every tile masked

    @classmethod
    def default_for(cls, head_size: int) -> "KernelConfig":
        if head_size >= 256:
            return cls(block_m=64, block_n=32, num_warps=8, num_stages=1)
        return cls()

    @classmethod
    def from_env(cls, head_size: int) -> "KernelConfig":
        """Defaults, with ``TRIANGLEMIX_KERNEL_CONFIG="block_n=64,num_warps=8"`` overrides."""
        config = cls.default_for(head_size)
        text = settings.env_setting(CONFIG_ENV, "").strip()
        return config.with_overrides(text, CONFIG_ENV) if text else config

    def with_overrides(self, text: str, source: str = "config") -> "KernelConfig":
        return with_overrides(self, text, source, RETIRED_FIELDS)


def with_overrides(config, text: str, source: str, retired_fields=()):
    """A kernel config dataclass with ``"field=int,field=int"`` overrides (errors name ``source``).

    Fields of ``retired_fields`` (those of earlier releases that no longer choose anything) are
    ignored with one warning, so that an old setting keeps working."""
    values, retired = {}, []
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key in retired_fields:
            retired.append(part.strip())
        elif key not in config.__dataclass_fields__:
            raise ValueError(f"{source}: unknown field '{key}'")
        else:
            values[key] = int(value)
    if retired:
        logger.warning("%s: %s no longer choose anything (what they chose was removed); ignored",
                       source, ", ".join(retired))
    return dataclasses.replace(config, **values)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass
class TritonPlan:
    items: torch.Tensor  # int32 [num_items, 7], ITEM_FIELDS order
    dense_from: torch.Tensor  # int32 [num_reqs]
    block_table: torch.Tensor
    num_items: int


class TritonTriangleOp:
    """Plans and launches the triangle kernel for one model shape."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int,
                 config: KernelConfig | None = None):
        if head_size not in (64, 128, 256):
            raise ValueError(f"TriangleMix Triton kernel: head size {head_size} not in 64/128/256")
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.group = num_heads // num_kv_heads
        self.group_p = _next_pow2(self.group)
        self.config = config or KernelConfig.from_env(head_size)
        self.block_q = max(self.config.block_m // self.group_p, 1)

    def prepare(self, plan: BlockPlan, dense_from: np.ndarray, cam) -> TritonPlan:
        device = cam.block_table_tensor.device
        items = np.stack([getattr(plan, f) for f in ITEM_FIELDS], axis=1).astype(np.int32)
        return TritonPlan(
            items=torch.from_numpy(items).to(device, non_blocking=True),
            dense_from=torch.from_numpy(np.asarray(dense_from, dtype=np.int32)).to(device, non_blocking=True),
            block_table=cam.block_table_tensor,
            num_items=plan.num_items,
        )

    def run(self, query, key_cache, value_cache, prepared: TritonPlan,
            params: TriangleParams, scale: float, output, scales: Fp8Scales | None = None) -> None:
        """query/output: [tokens, heads, dim]; caches: [blocks, block_size, kv_heads, dim] views.

        An fp8 cache (float8_e4m3fn views) needs ``scales``, and so does an
        fp8 query (vLLM quantizes the query for FA3 when the cache is fp8).
        """
        if prepared.num_items == 0:
            return
        cfg = self.config
        assert query.stride(-1) == 1 and output.stride(-1) == 1
        fp8 = kernel_fp8_args(query, key_cache, value_cache, scales, self.num_kv_heads,
                              placeholder=prepared.dense_from)
        bt = prepared.block_table
        _triangle_attention_kernel[(prepared.num_items * self.num_kv_heads,)](
            query, key_cache, value_cache, output,
            prepared.items, prepared.dense_from, bt,
            query.stride(0), query.stride(1), output.stride(0), output.stride(1),
            *key_cache.stride(), *value_cache.stride(),
            bt.stride(0), self.num_kv_heads, key_cache.shape[1],
            params.n_init, params.n_local, scale * LOG2E,
            *fp8.pointers, *fp8.strides,
            GROUP=self.group, GROUP_P=self.group_p, BLOCK_Q=self.block_q,
            BLOCK_N=cfg.block_n, BLOCK_N_SINK=16, HEAD_D=self.head_size,
            MASK_MODE=cfg.mask_mode, Q_FP8=fp8.q_fp8, KV_FP8=fp8.kv_fp8,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
