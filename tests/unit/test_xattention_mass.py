"""The CPU path's float32 block masses against the independent float64 reference.

The end-to-end tests compare selections made in float32 (the engine) and in
float64 (the reference) on inputs whose decisions are at least 1e-5 from
flipping; this shows the float32 masses are well within that.
"""

import torch

from tests.xattention_reference import block_masses
from vllm_trianglemix.ops.xattention_torch import antidiagonal_block_mass


def test_float32_masses_are_within_1e_6_of_float64():
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for pos0, n, heads, stride in [(0, 64, (4, 2), 8), (320, 64, (8, 2), 8), (200, 56, (4, 4), 16),
                                   (1000, 24, (6, 2), 4), (448, 64, (4, 1), 64)]:
        hq, hkv = heads
        q = torch.randn(n, hq, 32, generator=gen) * 2
        k = torch.randn(pos0 + n, hkv, 32, generator=gen) * 2
        b = pos0 // 64
        got = antidiagonal_block_mass(q, k, pos0, b, 64, stride, 32 ** -0.5)
        ref = block_masses(q, k, pos0, 64, stride, 32 ** -0.5)
        got, ref = got / got.sum(-1, keepdim=True), ref / ref.sum(-1, keepdim=True)
        worst = max(worst, (got.double() - ref).abs().max().item())
    assert worst < 1e-6
