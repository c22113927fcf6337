"""The CPU path reads the KV cache vLLM's CPU attention wrote, in every layout it probes.

vLLM's CPU attention picks its kernel ("ISA") per machine and dtype; with AMX and a
bfloat16 cache (block size a multiple of 32) it packs K and V for AMX tiles, which no
strided view expresses: the CPU path reads them through ``PackedCache``. The stock
kernel writes random K/V into a paged cache and the views must give them back exactly.
"""

import pytest
import torch

from vllm_trianglemix.backends.cpu import PackedCache, kv_cache_views, probe_key_layout


def _written(isa, dtype, head_size, block_size, num_blocks=3, heads=2, seed=0):
    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(seed)
    kv = torch.zeros(num_blocks, heads, block_size, 2 * head_size, dtype=dtype)
    k_view, v_view = kv.view(num_blocks, heads, 2 * block_size, head_size).chunk(2, dim=2)
    n = num_blocks * block_size - 5
    key = torch.randn(n, heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, heads, head_size, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(torch.int64)
    ops.cpu_attn_reshape_and_cache(key, value, k_view, v_view, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    return kv, key, value, slots


@pytest.mark.parametrize("head_size,block_size", [(64, 32), (256, 64), (128, 128)])
def test_amx_bf16_cache_is_read_exactly(head_size, block_size):
    if not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX: vLLM's CPU attention does not use the AMX layout")
    layout = probe_key_layout("amx", torch.bfloat16, head_size, block_size)
    assert layout == "vnni_pairs"
    kv, key, value, slots = _written("amx", torch.bfloat16, head_size, block_size, seed=head_size)
    keys, values = kv_cache_views(kv, layout)
    assert isinstance(keys, PackedCache) and keys.shape == (3, block_size, 2, head_size)
    b, o = slots // block_size, slots % block_size
    assert torch.equal(keys[b, o], key) and torch.equal(values[b, o], value)
