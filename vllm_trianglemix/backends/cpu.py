"""TriangleMix on vLLM's CPU platform: stock CPU_ATTN plus the exact float32 path.

Dense layers, decode tokens and short prompts run vLLM's CPU attention
unchanged; the prompt rows of triangle layers run
:class:`~vllm_trianglemix.ops.triangle_torch.TorchTriangleOp`, which reads the
K/V that the stock kernel wrote into the paged cache. The stock kernel stores
keys and values in an ISA-specific layout (strided for the vector ISAs, 16-row
tiles of element pairs for AMX), so the builder probes where it writes every
element once at start (:func:`probe_layout`) and refuses to start on a layout
it cannot read back exactly. An fp8 KV cache (vLLM's CPU
attention supports it on AVX-512/AMX) is probed the same way and dequantized
with the layer's scales when the triangle op gathers keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

KEY_LAYOUTS = ("token_major", "channel_major")

# How the stock CPU kernel lays out K and V inside a (block, head): per ISA, probed.
_LAYOUTS: dict[tuple, "CacheLayout"] = {}  # (ISA, fp8 cache, head size, block size) -> layout


@dataclass(frozen=True)
class CacheLayout:
    """Where the stock CPU kernel puts key and value (token t, channel c) of one (block, head).

    ``key_pos[t, c]`` and ``value_pos[t, c]`` are offsets in that (block, head)'s
    ``2 * block_size * head_size`` elements; ``strided`` names the layouts a strided view
    reads directly ("token_major" or "channel_major" keys, token-major values), None for a
    tiled one (AMX packs keys and values in 16-row tiles of element pairs).
    """

    key_pos: torch.Tensor
    value_pos: torch.Tensor
    strided: str | None


def _strided_positions(block_size: int, head_size: int, key_layout: str):
    t = torch.arange(block_size)[:, None]
    c = torch.arange(head_size)[None, :]
    key = t * head_size + c if key_layout == "token_major" else c * block_size + t
    return key, block_size * head_size + t * head_size + c


class TiledCacheView:
    """One of K or V of a CPU cache in a tiled layout, read as [blocks, block_size, kv_heads, dim].

    Supports what the CPU ops use: ``shape``, ``dtype`` and gathering ``view[blocks, offsets]``
    -> [n, kv_heads, dim] (a copy).
    """

    def __init__(self, kv_cache: torch.Tensor, pos: torch.Tensor):
        nb, nh, bs, two_d = kv_cache.shape
        if kv_cache.stride()[2:] != (two_d, 1):
            raise TriangleMixUnsupportedError(
                f"TriangleMix CPU path: KV cache strides {kv_cache.stride()} are not dense per "
                "(block, head)"
            )
        self._s_block, self._s_head = kv_cache.stride(0), kv_cache.stride(1)
        # One flat view over the cache's own extent (blocks may be padded apart, as in
        # hybrid models whose attention pages share memory with Mamba state).
        span = (nb - 1) * self._s_block + (nh - 1) * self._s_head + bs * two_d
        self._flat = torch.as_strided(kv_cache, (span,), (1,), kv_cache.storage_offset())
        self._pos = pos
        self.shape = torch.Size((nb, bs, nh, two_d // 2))
        self.dtype = kv_cache.dtype
        self.device = kv_cache.device

    def __getitem__(self, index):
        blocks, offsets = index
        heads = torch.arange(self.shape[2]) * self._s_head
        flat = (blocks.long()[:, None, None] * self._s_block + heads[None, :, None]
                + self._pos[offsets.long()][:, None, :])
        return self._flat[flat]


def kv_cache_views(kv_cache: torch.Tensor, layout: "CacheLayout | str"):
    """CPU cache [blocks, kv_heads, block_size, 2*dim] as two [blocks, block_size, kv_heads, dim] views.

    Per (block, head) the stock kernel stores block_size*dim keys, then block_size*dim
    values: strided layouts (values token-major; keys token- or channel-major) become
    strided tensor views, tiled ones :class:`TiledCacheView`.
    """
    key_layout = layout if isinstance(layout, str) else layout.strided
    if key_layout is None:
        return TiledCacheView(kv_cache, layout.key_pos), TiledCacheView(kv_cache, layout.value_pos)
    nb, nh, bs, two_d = kv_cache.shape
    d = two_d // 2
    s_block, s_head = kv_cache.stride(0), kv_cache.stride(1)
    off = kv_cache.storage_offset()
    size = (nb, bs, nh, d)
    key_strides = (s_block, d, s_head, 1) if key_layout == "token_major" else (s_block, 1, s_head, bs)
    keys = torch.as_strided(kv_cache, size, key_strides, off)
    values = torch.as_strided(kv_cache, size, (s_block, d, s_head, 1), off + bs * d)
    return keys, values


def _write(isa, key, value, kv, slots, k_scale, v_scale, kv_cache_dtype):
    nb, nh, bs, two_d = kv.shape
    k_view, v_view = kv.view(nb, nh, 2 * bs, two_d // 2).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, k_view, v_view, slots, isa, k_scale=k_scale,
                                   v_scale=v_scale, kv_cache_dtype=kv_cache_dtype)


def probe_layout(isa: str, dtype: torch.dtype, head_size: int, block_size: int,
                 kv_cache_dtype: str = "auto") -> CacheLayout:
    """Find where the stock kernel writes each key and value element, and check it.

    Token and channel indices are written as base-8 digits (exact in every cache dtype,
    fp8 e4m3 included) with the stock kernel, one digit per write, and read back from
    the raw (block, head) memory; the positions found are then checked on random K/V
    (an fp8 cache as the stock kernel writes it: uint8 storage, scales 0.5 and 0.25,
    values exact in e4m3). A layout that fails the check stops the engine at start.
    """
    fp8 = kv_cache_dtype in FP8_KV_CACHE_DTYPES
    key = (isa, fp8, head_size, block_size)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    cache_dtype = kv_cache_dtype if fp8 else "auto"
    nh, bs, d = 1, block_size, head_size
    region = 2 * bs * d
    kv = torch.zeros(1, nh, bs, 2 * d, dtype=torch.uint8 if fp8 else dtype)
    slots = torch.arange(bs, dtype=torch.int64)
    tok = torch.zeros(region, dtype=torch.long)
    chan = torch.zeros(region, dtype=torch.long)
    for target, values_of in ((tok, lambda t, c: t), (chan, lambda t, c: c)):
        digits = max(1, math.ceil(math.log(max(bs, d), 8)))
        for k in range(digits):
            grid = values_of(torch.arange(bs)[:, None], torch.arange(d)[None, :])
            digit = ((grid // 8**k) % 8).float().expand(bs, d)
            x = (digit + 1.0)[:, None, :].to(dtype)  # 1..8: nonzero, exact in e4m3
            kv.zero_()
            _write(isa, x, x, kv, slots, 1.0, 1.0, cache_dtype)
            raw = as_fp8_cache(kv, kv_cache_dtype)[0, 0].reshape(-1).float()
            target += ((raw - 1.0).clamp(min=0).round().long()) * 8**k
    positions = torch.arange(region)
    key_pos = torch.full((bs, d), -1, dtype=torch.long)
    value_pos = torch.full((bs, d), -1, dtype=torch.long)
    half = bs * d
    key_pos[tok[:half].clamp(max=bs - 1), chan[:half].clamp(max=d - 1)] = positions[:half]
    value_pos[tok[half:].clamp(max=bs - 1), chan[half:].clamp(max=d - 1)] = positions[half:]
    strided = None
    for name in KEY_LAYOUTS:
        k_pos, v_pos = _strided_positions(bs, d, name)
        if torch.equal(k_pos, key_pos) and torch.equal(v_pos, value_pos):
            strided = name
    layout = CacheLayout(key_pos, value_pos, strided)
    if (key_pos < 0).any() or (value_pos < 0).any() or not _reads_back(
            layout, isa, dtype, head_size, block_size, kv_cache_dtype):
        raise TriangleMixUnsupportedError(
            f"TriangleMix CPU path cannot read the KV cache layout of CPU attention ISA '{isa}' "
            f"(dtype {dtype}, KV cache dtype {kv_cache_dtype}, head size {head_size}, block size "
            f"{block_size}); serve without TriangleMix on this CPU"
        )
    _LAYOUTS[key] = layout
    return layout


def _reads_back(layout, isa, dtype, head_size, block_size, kv_cache_dtype) -> bool:
    """Random K/V written by the stock kernel read back exactly through ``layout``."""
    fp8 = kv_cache_dtype in FP8_KV_CACHE_DTYPES
    gen = torch.Generator().manual_seed(0)
    nb, nh, n = 2, 2, block_size + 3
    kv = torch.zeros(nb, nh, block_size, 2 * head_size, dtype=torch.uint8 if fp8 else dtype)
    key = torch.randn(n, nh, head_size, generator=gen)
    value = torch.randn(n, nh, head_size, generator=gen)
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    if fp8:  # values the fp8 cache holds exactly
        key = key.to(torch.float8_e4m3fn).float() * k_scale
        value = value.to(torch.float8_e4m3fn).float() * v_scale
    key, value = key.to(dtype), value.to(dtype)
    slots = torch.randperm(nb * block_size, generator=gen)[:n].to(torch.int64)
    _write(isa, key, value, kv, slots, k_scale, v_scale, kv_cache_dtype if fp8 else "auto")
    blocks, offsets = slots // block_size, slots % block_size
    keys, values = kv_cache_views(as_fp8_cache(kv, kv_cache_dtype), layout)
    got_k = keys[blocks, offsets].to(dtype) * k_scale if fp8 else keys[blocks, offsets]
    got_v = values[blocks, offsets].to(dtype) * v_scale if fp8 else values[blocks, offsets]
    return torch.equal(got_k, key) and torch.equal(got_v, value)


class TriangleMixCPUMetadataBuilder(TriangleMixBuilderMixin, CPUAttentionMetadataBuilder):
    stock_builder_cls = CPUAttentionMetadataBuilder
    triangle_op = TorchTriangleOp()
    dynamic_op = TorchXAttentionOp()

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        probe_layout(self.isa, self.dtype, self.head_dim, self.block_size, self.kv_cache_dtype)


class TriangleMixCPUImpl(TriangleMixImplMixin, CPUAttentionBackendImpl):
    triangle_op = TriangleMixCPUMetadataBuilder.triangle_op
    dynamic_op = TriangleMixCPUMetadataBuilder.dynamic_op

    def kv_cache_views(self, layer, kv_cache):
        # The builder probed at start with the model's dtype; this finds its result.
        layout = probe_layout(layer.isa, torch.float32 if self._kv_fp8 else kv_cache.dtype,
                              self.head_size, kv_cache.shape[2], self.kv_cache_dtype)
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
