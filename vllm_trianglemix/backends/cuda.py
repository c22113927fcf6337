"""TriangleMix on CUDA: stock FlashAttention plus the Triton triangle kernel.

Dense layers, decode tokens and short prompts run vLLM's FlashAttention
backend (FA3 on Hopper) unchanged, decode batches with full CUDA graphs; the
prompt rows of triangle layers run :class:`TritonTriangleOp` on the same
paged KV cache, viewed exactly as the stock impl views it; the prompt rows of
dynamic layers run :class:`TritonXAttentionOp`. The dense last rows of both run
the stock FlashAttention (backends/common.py).

fp8 KV cache (``--kv-cache-dtype fp8``): the stock FA3 path quantizes the
query in the attention layer, before the impl; triangle rows read that same
fp8 query and the fp8 cache, converted exactly to bf16/fp16 and scaled by the
layer's ``_q_scale``/``_k_scale``/``_v_scale`` (P·V in bf16/fp16, softmax in
float32). The helpers here are shared with the FlashInfer backend
(backends/flashinfer.py).
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from vllm_trianglemix.backends.common import TriangleMixBuilderMixin, TriangleMixImplMixin
from vllm_trianglemix.ops.fp8 import as_fp8_cache
from vllm_trianglemix.ops.triangle_triton import TritonTriangleOp
from vllm_trianglemix.ops.xattention_triton import TritonXAttentionOp
from vllm_trianglemix.selection import FP8_KV_CACHE_DTYPES, SUPPORTED_HEAD_SIZES_CUDA

_OPS: dict[tuple[int, int, int], TritonTriangleOp] = {}
_DYNAMIC_OPS: dict[tuple[int, int, int], TritonXAttentionOp] = {}


def flash_kv_cache_views(kv_cache, head_size: int, kv_cache_dtype: str = "auto"):
    """The stock FlashAttention impl's view of its cache, exactly.

    (blocks, kv_heads, block_size, 2*dim), in whatever physical stride order
    vLLM allocated, -> key and value views, each (blocks, block_size, kv_heads, dim).
    An fp8 cache (allocated as uint8) is viewed as float8_e4m3fn, as the stock impl does.
    """
    return as_fp8_cache(kv_cache, kv_cache_dtype).transpose(1, 2).split(head_size, dim=-1)


def triangle_refusals(reasons: list[str], kwargs) -> list[str]:
    """The stock backend's reasons plus TriangleMix's (validate_configuration)."""
    reasons = list(reasons)
    if kwargs.get("use_mla"):
        reasons.append("TriangleMix does not support MLA")
    if kwargs.get("has_sink"):
        reasons.append("TriangleMix does not support attention sinks")
    if kwargs.get("has_sliding_window"):
        reasons.append("TriangleMix does not support sliding-window layers")
    if kwargs.get("head_size") not in SUPPORTED_HEAD_SIZES_CUDA:
        reasons.append(f"TriangleMix supports head sizes {SUPPORTED_HEAD_SIZES_CUDA}")
    kv_dtype = kwargs.get("kv_cache_dtype")
    if kv_dtype not in (None, "auto", "bfloat16", "float16", *FP8_KV_CACHE_DTYPES):
        reasons.append(f"TriangleMix does not support KV cache dtype {kv_dtype}")
    cap = kwargs.get("device_capability")
    if kv_dtype in FP8_KV_CACHE_DTYPES and cap is not None and (cap.major, cap.minor) < (8, 9):
        # Triton converts e4m3 natively from sm_89 on.
        reasons.append("TriangleMix reads an fp8 KV cache on compute capability >= 8.9 only")
    return reasons


def triangle_op(num_heads: int, num_kv_heads: int, head_size: int) -> TritonTriangleOp:
    """One op (kernel configuration) per model shape, shared by builder and impls."""
    key = (num_heads, num_kv_heads, head_size)
    if key not in _OPS:
        _OPS[key] = TritonTriangleOp(num_heads, num_kv_heads, head_size)
    return _OPS[key]


def dynamic_op(num_heads: int, num_kv_heads: int, head_size: int) -> TritonXAttentionOp:
    """One dynamic-layer (XAttention) op per model shape, shared by builder and impls."""
    key = (num_heads, num_kv_heads, head_size)
    if key not in _DYNAMIC_OPS:
        _DYNAMIC_OPS[key] = TritonXAttentionOp(num_heads, num_kv_heads, head_size)
    return _DYNAMIC_OPS[key]


class TriangleMixFlashAttentionMetadataBuilder(
    TriangleMixBuilderMixin, FlashAttentionMetadataBuilder
):
    stock_builder_cls = FlashAttentionMetadataBuilder

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.triangle_op = triangle_op(self.num_heads_q, self.num_heads_kv, self.headdim)
        self.dynamic_op = dynamic_op(self.num_heads_q, self.num_heads_kv, self.headdim)
        self.warm_up_kernels(vllm_config, device)


class TriangleMixFlashAttentionImpl(TriangleMixImplMixin, FlashAttentionImpl):
    @property
    def triangle_op(self) -> TritonTriangleOp:
        return triangle_op(self.num_heads, self.num_kv_heads, self.head_size)

    @property
    def dynamic_op(self) -> TritonXAttentionOp:
        return dynamic_op(self.num_heads, self.num_kv_heads, self.head_size)

    def kv_cache_views(self, layer, kv_cache):
        return flash_kv_cache_views(kv_cache, self.head_size, self.kv_cache_dtype)


class TriangleMixFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return TriangleMixFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TriangleMixFlashAttentionMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES_CUDA)

    @classmethod
    def validate_configuration(cls, **kwargs) -> list[str]:
        return triangle_refusals(super().validate_configuration(**kwargs), kwargs)
