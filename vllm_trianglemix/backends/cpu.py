"""TriangleMix on vLLM's CPU platform: stock CPU_ATTN plus the exact float32 path.

Dense layers, decode tokens and short prompts run vLLM's CPU attention
unchanged; the prompt rows of triangle layers run
:class:`~vllm_trianglemix.ops.triangle_torch.TorchTriangleOp`, which reads the
K/V that the stock kernel wrote into the paged cache. The stock kernel stores
keys in an ISA-specific layout, so the builder probes it once at start and
refuses to start on a layout it cannot read. An fp8 KV cache (vLLM's CPU
attention supports it on AVX-512/AMX) is probed the same way and dequantized
with the layer's scales when the triangle op gathers keys.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_trianglemix.backends.common import TriangleMixBuilderMixin, TriangleMixImplMixin
from vllm_trianglemix.ops.fp8 import as_fp8_cache
from vllm_trianglemix.ops.triangle_torch import TorchTriangleOp
from vllm_trianglemix.ops.xattention_torch import TorchXAttentionOp
from vllm_trianglemix.selection import FP8_KV_CACHE_DTYPES, TriangleMixUnsupportedError

# How the stock CPU kernel lays out K inside a (block, head): per ISA, probed.
_KEY_LAYOUTS: dict[tuple[str, bool], str] = {}  # (ISA, fp8 cache) -> layout
KEY_LAYOUTS = ("token_major", "channel_major", "vnni_pairs")
VNNI_TOKENS = 16
"""``vnni_pairs`` (the AMX kernel, bf16): keys per group of 16 tokens as ``[dim / 2,
16 tokens, 2 channels]``, values per group of 16 channels as ``[block_size / 2 token
pairs, 16 channels, 2 tokens]``."""


class PackedCache:
    """K or V that no strided view can express (``vnni_pairs``), gathered as a
    ``[blocks, block_size, kv_heads, dim]`` tensor would be: ``cache[blocks, offsets]``."""

    def __init__(self, packed: torch.Tensor, shape: tuple[int, int, int, int], split: int):
        self.packed = packed  # [blocks, block_size / split, split, kv_heads, ...channels]
        self.split = split
        self.shape = torch.Size(shape)
        self.dtype = packed.dtype
        self.device = packed.device

    def __getitem__(self, index):
        blocks, offsets = index
        got = self.packed[blocks, offsets // self.split, offsets % self.split]
        return got.reshape(got.shape[0], self.shape[2], self.shape[3])


def kv_cache_views(kv_cache: torch.Tensor, key_layout: str):
    """CPU cache [blocks, kv_heads, block_size, 2*dim] as two [blocks, block_size, kv_heads, dim] views.

    Per (block, head) the stock kernel stores block_size*dim keys, then
    block_size*dim values (values token-major; keys in ``key_layout``), except
    ``vnni_pairs`` (AMX, bf16): both packed for AMX tiles, read through :class:`PackedCache`.
    """
    nb, nh, bs, two_d = kv_cache.shape
    d = two_d // 2
    s_block, s_head = kv_cache.stride(0), kv_cache.stride(1)
    off = kv_cache.storage_offset()
    size = (nb, bs, nh, d)
    if key_layout == "vnni_pairs":
        keys = PackedCache(torch.as_strided(
            kv_cache, (nb, bs // VNNI_TOKENS, VNNI_TOKENS, nh, d // 2, 2),
            (s_block, VNNI_TOKENS * d, 2, s_head, 2 * VNNI_TOKENS, 1), off), size, VNNI_TOKENS)
        values = PackedCache(torch.as_strided(
            kv_cache, (nb, bs // 2, 2, nh, d // VNNI_TOKENS, VNNI_TOKENS),
            (s_block, 2 * VNNI_TOKENS, 1, s_head, bs * VNNI_TOKENS, 2), off + bs * d), size, 2)
        return keys, values
    key_strides = (s_block, d, s_head, 1) if key_layout == "token_major" else (s_block, 1, s_head, bs)
    keys = torch.as_strided(kv_cache, size, key_strides, off)
    values = torch.as_strided(kv_cache, size, (s_block, d, s_head, 1), off + bs * d)
    return keys, values


def probe_key_layout(isa: str, dtype: torch.dtype, head_size: int, block_size: int,
                     kv_cache_dtype: str = "auto") -> str:
    """Write known K/V with the stock kernel and find the layout that reads them back.

    An fp8 cache is written as the stock kernel writes it (uint8 storage,
    scales 0.5 and 0.25, values exact in e4m3) and read as float8_e4m3fn.
    """
    fp8 = kv_cache_dtype in FP8_KV_CACHE_DTYPES
    if (isa, fp8) in _KEY_LAYOUTS:
        return _KEY_LAYOUTS[(isa, fp8)]
    gen = torch.Generator().manual_seed(0)
    nb, nh, n = 2, 2, block_size + 3
    kv = torch.zeros(nb, nh, block_size, 2 * head_size, dtype=torch.uint8 if fp8 else dtype)
    k_view, v_view = kv.view(nb, nh, 2 * block_size, head_size).chunk(2, dim=2)
    key = torch.randn(n, nh, head_size, generator=gen)
    value = torch.randn(n, nh, head_size, generator=gen)
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    if fp8:  # values the fp8 cache holds exactly
        key = key.to(torch.float8_e4m3fn).float() * k_scale
        value = value.to(torch.float8_e4m3fn).float() * v_scale
    key, value = key.to(dtype), value.to(dtype)
    slots = torch.randperm(nb * block_size, generator=gen)[:n].to(torch.int64)
    ops.cpu_attn_reshape_and_cache(
        key, value, k_view, v_view, slots, isa, k_scale=k_scale, v_scale=v_scale,
        kv_cache_dtype=kv_cache_dtype if fp8 else "auto",
    )
    blocks, offsets = slots // block_size, slots % block_size
    for layout in KEY_LAYOUTS:
        if layout == "vnni_pairs" and (block_size % VNNI_TOKENS or head_size % VNNI_TOKENS):
            continue
        keys, values = kv_cache_views(as_fp8_cache(kv, kv_cache_dtype), layout)
        got_k = keys[blocks, offsets].to(dtype) * k_scale if fp8 else keys[blocks, offsets]
        got_v = values[blocks, offsets].to(dtype) * v_scale if fp8 else values[blocks, offsets]
        if torch.equal(got_k, key) and torch.equal(got_v, value):
            _KEY_LAYOUTS[(isa, fp8)] = layout
            return layout
    raise TriangleMixUnsupportedError(
        f"TriangleMix CPU path cannot read the KV cache layout of CPU attention ISA '{isa}' "
        f"(dtype {dtype}, KV cache dtype {kv_cache_dtype}, head size {head_size}, block size "
        f"{block_size}); serve without TriangleMix on this CPU"
    )


class TriangleMixCPUMetadataBuilder(TriangleMixBuilderMixin, CPUAttentionMetadataBuilder):
    stock_builder_cls = CPUAttentionMetadataBuilder
    triangle_op = TorchTriangleOp()
    dynamic_op = TorchXAttentionOp()

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        probe_key_layout(self.isa, self.dtype, self.head_dim, self.block_size, self.kv_cache_dtype)


class TriangleMixCPUImpl(TriangleMixImplMixin, CPUAttentionBackendImpl):
    triangle_op = TriangleMixCPUMetadataBuilder.triangle_op
    dynamic_op = TriangleMixCPUMetadataBuilder.dynamic_op

    def kv_cache_views(self, layer, kv_cache):
        layout = _KEY_LAYOUTS.get((layer.isa, self._kv_fp8)) or probe_key_layout(
            layer.isa, torch.float32 if self._kv_fp8 else kv_cache.dtype, self.head_size,
            kv_cache.shape[2], self.kv_cache_dtype)
        return kv_cache_views(as_fp8_cache(kv_cache, self.kv_cache_dtype), layout)


class TriangleMixCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return TriangleMixCPUImpl

    @staticmethod
    def get_builder_cls():
        return TriangleMixCPUMetadataBuilder
