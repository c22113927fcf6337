"""TriangleMix on CUDA with FlashInfer as the stock backend.

The same split as backends/cuda.py, around vLLM's FlashInfer backend: dense
layers, decode tokens and short prompts run FlashInfer unchanged (decode
batches with FlashInfer's CUDA graphs: the builder declares the stock level,
capped at single-token decode batches); the prompt rows of triangle layers run
the Triton kernel on FlashInfer's paged cache. Chosen by
``trianglemix_stock_backend`` (see stock_backend.py).

The cache view: vLLM hands the impl the cache in its logical shape (K and V
packed in the last dim; ``compat.paged_cache_layout``), laid out in memory NHD
or HND; the stock impl permutes it into memory order before calling
FlashInfer. The kernel takes the K and V views and their strides from the
tensor itself, so either layout is read as allocated; the shape is checked
against the expected one so that a release with another layout stops with an
error instead of reading the wrong numbers.

fp8 KV cache: on Hopper, FlashInfer keeps the query in bf16/fp16 at the impl
(it quantizes a copy for its own prefill kernel); triangle rows use that
query with the dequantized cache.
"""

from __future__ import annotations

from vllm.v1.attention.backends.flashinfer import (
    FlashInferBackend,
    FlashInferImpl,
    FlashInferMetadataBuilder,
)

from vllm_trianglemix import compat
from vllm_trianglemix.backends.common import TriangleMixBuilderMixin, TriangleMixImplMixin
from vllm_trianglemix.backends.cuda import dynamic_op, flash_kv_cache_views, triangle_op, triangle_refusals
from vllm_trianglemix.ops.triangle_triton import TritonTriangleOp
from vllm_trianglemix.selection import SUPPORTED_HEAD_SIZES_CUDA, TriangleMixUnsupportedError


def flashinfer_kv_cache_views(kv_cache, num_kv_heads: int, head_size: int, kv_cache_dtype: str):
    """FlashInfer's cache -> key and value views, each (blocks, block_size, kv_heads, dim)."""
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[2]
    expected, _ = compat.paged_cache_layout(FlashInferBackend, num_blocks, block_size,
                                            num_kv_heads, head_size)
    if tuple(kv_cache.shape) != expected:
        raise TriangleMixUnsupportedError(
            f"TriangleMix: FlashInfer KV cache of shape {tuple(kv_cache.shape)}, expected "
            f"{expected} (blocks, kv_heads, block_size, 2*head_size); this vLLM release "
            "lays out FlashInfer's cache differently"
        )
    # Same logical layout as FlashAttention's: the shared view reads it.
    return flash_kv_cache_views(kv_cache, head_size, kv_cache_dtype)


class SubsetFlashInferMetadataBuilder(FlashInferMetadataBuilder):
    """The stock builder for the requests a triangle layer leaves to FlashInfer.

    Its wrappers plan on the workspace of the builder that owns it (vLLM
    shares one FlashInfer workspace between builders the same way), read
    when first needed, so a workspace vLLM sets on the owner later is used.
    """

    owner: FlashInferMetadataBuilder | None = None

    def _get_workspace_buffer(self):
        return self.owner._get_workspace_buffer()


class TriangleMixFlashInferMetadataBuilder(TriangleMixBuilderMixin, FlashInferMetadataBuilder):
    stock_builder_cls = SubsetFlashInferMetadataBuilder

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.triangle_op = triangle_op(self.num_qo_heads, self.num_kv_heads, self.head_dim)
        self.dynamic_op = dynamic_op(self.num_qo_heads, self.num_kv_heads, self.head_dim)
        self.warm_up_kernels(vllm_config, device)
        # Built now, inside vLLM's config context: FlashInfer's builder reads
        # the current vLLM config, which is not set while batches run.
        for n_last in self.n_lasts:
            self._subset_builder(n_last).owner = self


class TriangleMixFlashInferImpl(TriangleMixImplMixin, FlashInferImpl):
    @property
    def triangle_op(self) -> TritonTriangleOp:
        return triangle_op(self.num_heads, self.num_kv_heads, self.head_size)

    @property
    def dynamic_op(self):
        return dynamic_op(self.num_heads, self.num_kv_heads, self.head_size)

    def kv_cache_views(self, layer, kv_cache):
        return flashinfer_kv_cache_views(kv_cache, self.num_kv_heads, self.head_size,
                                         self.kv_cache_dtype)


class TriangleMixFlashInferBackend(FlashInferBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return TriangleMixFlashInferImpl

    @staticmethod
    def get_builder_cls():
        return TriangleMixFlashInferMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES_CUDA)

    @classmethod
    def validate_configuration(cls, **kwargs) -> list[str]:
        return triangle_refusals(super().validate_configuration(**kwargs), kwargs)
