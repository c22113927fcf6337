"""The CPU path reads vLLM's CPU KV cache exactly, whatever the ISA's layout.

vLLM's CPU attention writes keys and values in an ISA-specific layout (strided for the
vector ISAs, 16-row tiles of element pairs for AMX); ``probe_layout`` finds it with the
stock write kernel. Here random keys and values are written with that same kernel for
every ISA this CPU runs and read back through ``kv_cache_views`` at random slots.
"""

import pytest
import torch

pytest.importorskip("vllm")
from vllm import _custom_ops as ops  # noqa: E402

from vllm_trianglemix.backends.cpu import probe_layout, kv_cache_views  # noqa: E402


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read()
    except OSError:
        return False


CASES = [("vec", torch.float32, 64, 16), ("vec", torch.bfloat16, 128, 32),
         ("vec16", torch.bfloat16, 64, 32)]
if _cpu_has("amx_bf16"):
    CASES += [("amx", torch.bfloat16, 64, 32), ("amx", torch.bfloat16, 256, 32),
              ("amx", torch.float16, 128, 128)]


def _write_random(kv, isa, n, seed):
    """n random keys and values written by the stock kernel at random slots of ``kv``."""
    nb, nh, block_size, two_d = kv.shape
    gen = torch.Generator().manual_seed(seed)
    k_view, v_view = kv.view(nb, nh, 2 * block_size, two_d // 2).chunk(2, dim=2)
    key = torch.randn(n, nh, two_d // 2, generator=gen).to(kv.dtype)
    value = torch.randn(n, nh, two_d // 2, generator=gen).to(kv.dtype)
    slots = torch.randperm(nb * block_size, generator=gen)[:n].to(torch.int64)
    ops.cpu_attn_reshape_and_cache(key, value, k_view, v_view, slots, isa, k_scale=1.0,
                                   v_scale=1.0, kv_cache_dtype="auto")
    return key, value, slots // block_size, slots % block_size


@pytest.mark.parametrize("isa,dtype,head_size,block_size", CASES)
def test_cache_reads_back_what_the_stock_kernel_wrote(isa, dtype, head_size, block_size):
    nb, nh, n = 5, 3, 3 * block_size + 7
    kv = torch.zeros(nb, nh, block_size, 2 * head_size, dtype=dtype)
    key, value, blocks, offsets = _write_random(kv, isa, n, seed=head_size + block_size)
    layout = probe_layout(isa, dtype, head_size, block_size)
    keys, values = kv_cache_views(kv, layout)
    assert tuple(keys.shape) == (nb, block_size, nh, head_size)
    assert torch.equal(keys[blocks, offsets], key)
    assert torch.equal(values[blocks, offsets], value)
    # a wrong slot reads something else (the views are not trivially equal)
    assert not torch.equal(keys[blocks, (offsets + 1) % block_size], key)


def test_layout_kinds():
    assert probe_layout("vec", torch.float32, 64, 16).strided in ("token_major", "channel_major")
    if _cpu_has("amx_bf16"):
        assert probe_layout("amx", torch.bfloat16, 64, 32).strided is None  # tiled


@pytest.mark.parametrize("isa,dtype,head_size,block_size", CASES[-2:])
def test_padded_blocks_are_read_in_place(isa, dtype, head_size, block_size):
    """A layer's cache whose blocks are spaced apart in a larger buffer (hybrid models pad
    attention pages to the Mamba state's size) is read in place, at its own offset."""
    nb, nh, n, pad = 4, 2, 2 * block_size + 5, 96
    page = nh * block_size * 2 * head_size
    buf = torch.zeros(17 + nb * (page + pad), dtype=dtype)
    kv = torch.as_strided(buf, (nb, nh, block_size, 2 * head_size),
                          (page + pad, block_size * 2 * head_size, 2 * head_size, 1), 17)
    key, value, blocks, offsets = _write_random(kv, isa, n, seed=7)
    keys, values = kv_cache_views(kv, probe_layout(isa, dtype, head_size, block_size))
    assert torch.equal(keys[blocks, offsets], key)
    assert torch.equal(values[blocks, offsets], value)
