"""fp8 (e4m3) KV cache: how the triangle ops see it.

vLLM allocates an fp8 KV cache as uint8 and keeps per-layer float32 scales on
the attention layer (``_k_scale``, ``_v_scale``; ``_q_scale`` for a query it
quantized itself): a cached value ``x8`` stands for ``float(x8) * scale``.
Scales are one number per layer or, with per-head checkpoints, one per KV
head. The ops read the cache as ``float8_e4m3fn`` and apply the scales; the
rest of the plugin only decides whether a cache is fp8 and hands the scales on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_trianglemix.selection import FP8_KV_CACHE_DTYPES

FP8_DTYPES = (torch.float8_e4m3fn,)


@dataclass(frozen=True)
class Fp8Scales:
    """Dequantization scales of one layer (float32 tensors, 1 or num_kv_heads values)."""

    q: torch.Tensor | None
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def of_layer(cls, layer) -> "Fp8Scales":
        return cls(q=getattr(layer, "_q_scale", None), k=layer._k_scale, v=layer._v_scale)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def as_fp8_cache(t: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """The cache tensor vLLM allocated (uint8 for fp8) as the dtype it holds."""
    if kv_cache_dtype in FP8_KV_CACHE_DTYPES and t.dtype == torch.uint8:
        return t.view(torch.float8_e4m3fn)
    return t


def scale_stride(scale: torch.Tensor | None, num_kv_heads: int) -> int:
    """0 for one scale per layer, 1 for one per KV head."""
    if scale is None or scale.numel() == 1:
        return 0
    if scale.numel() != num_kv_heads:
        raise ValueError(
            f"TriangleMix: fp8 scale with {scale.numel()} values; expected 1 or {num_kv_heads}"
        )
    return 1


def per_head(scale: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A scale as float32 [num_kv_heads] (CPU path and tests)."""
    return scale.reshape(-1).float().expand(num_kv_heads) if scale.numel() == 1 else scale.float()


def dequantize(x: torch.Tensor, scale: torch.Tensor | None, num_kv_heads: int) -> torch.Tensor:
    """Gathered cache entries ``[T, Hkv, D]``: fp8 -> float32 with the scale; others as they are."""
    if not is_fp8(x):
        return x
    return x.float() * per_head(scale, num_kv_heads).to(x.device)[:, None]


def dequantize_query(query: torch.Tensor, scales: "Fp8Scales | None", num_kv_heads: int) -> torch.Tensor:
    """The query ``[T, Hq, D]``: an fp8 one (vLLM quantized it) -> float32 with ``_q_scale``."""
    if not is_fp8(query):
        return query
    group = query.shape[1] // num_kv_heads
    q_scale = per_head(scales.q, num_kv_heads).repeat_interleave(group).to(query.device)
    return query.float() * q_scale[:, None]


def check_scales(query: torch.Tensor, key_cache: torch.Tensor, scales: "Fp8Scales | None", op: str) -> None:
    if (is_fp8(key_cache) or is_fp8(query)) and scales is None:
        raise ValueError(f"TriangleMix {op}: fp8 inputs need their scales")


@dataclass(frozen=True)
class KernelFp8Args:
    """What a Triton kernel with ``Q_FP8``/``KV_FP8`` flags takes for the scales."""

    q_fp8: bool
    kv_fp8: bool
    pointers: tuple  # q, k, v scale tensors (a placeholder pointer where a flag is off)
    strides: tuple  # 0 (one scale per layer) or 1 (one per KV head), each


def kernel_fp8_args(query, key_cache, value_cache, scales: Fp8Scales | None, num_kv_heads: int,
                    placeholder: torch.Tensor) -> KernelFp8Args:
    """The fp8 flags and scale arguments of a launch; fp8 inputs without ``scales`` are refused.

    ``placeholder``: any device tensor, passed where a scale is not read.
    """
    q_fp8, kv_fp8 = is_fp8(query), is_fp8(key_cache)
    if is_fp8(value_cache) != kv_fp8:
        raise ValueError("TriangleMix kernel: the key and value caches must both be fp8 or neither")
    if (q_fp8 or kv_fp8) and scales is None:
        raise ValueError("TriangleMix kernel: fp8 inputs need their scales")
    q_s = scales.q if q_fp8 else None
    k_s = scales.k if kv_fp8 else None
    v_s = scales.v if kv_fp8 else None
    if q_fp8 and q_s is None:
        raise ValueError("TriangleMix kernel: an fp8 query needs its scale (the layer's _q_scale)")
    return KernelFp8Args(
        q_fp8, kv_fp8,
        tuple(placeholder if x is None else x for x in (q_s, k_s, v_s)),
        tuple(scale_stride(x, num_kv_heads) for x in (q_s, k_s, v_s)),
    )


E4M3_MAX = 448.0
"""The largest finite e4m3 (float8_e4m3fn) value."""


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to e4m3 (nearest, ties to even; saturating at +-448), an e4m3 tensor: what an
    fp8-scored estimate (``est_fp8_score``) scores instead of the bf16/fp16 values."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
