"""The triangle ops against the brute-force float32 reference of the exact mask.

The torch op (the CPU path) runs here directly. The Triton kernel runs under
Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before Triton is
imported; tests/conftest.py sets it): the same kernel source the GPU compiles, checked on random paged
caches; tests/gpu runs it compiled on the device. The interpreter emulates
bfloat16 with integer arrays (its dot products on them are meaningless), so
bfloat16 is checked on the GPU only.
"""

import os

import numpy as np
import pytest
import torch

from vllm_trianglemix.ops.triangle_torch import TorchTriangleOp
from vllm_trianglemix.pattern import TriangleParams
from tests.paged import (
    FakeCommonMetadata,
    make_batch,
    plan_for,
    reference_output,
    relative_error,
    to_fp8,
)

# (prompt_len, tokens already cached, query rows): chunks that start and end
# inside the window, inside the last n_last rows, short prompts, a decode row,
# lengths that are not multiples of the block size.
BATCHES = {
    "whole_prompt": [(300, 0, 300)],
    "chunk_ends_in_last_rows": [(300, 0, 290), (300, 290, 10)],
    "mixed": [(300, 100, 77), (45, 0, 45), (1000, 900, 13), (999, 0, 128), (200, 205, 1)],
    "long_dense_tail": [(700, 600, 100)],
}
PARAMS = {
    "paper_like": (TriangleParams(4, 32, 16), 64),
    "no_sinks": (TriangleParams(0, 40, 24), 64),
    "sinks_beyond_a_block": (TriangleParams(40, 24, 8), 64),
    "window_wider_than_chunk": (TriangleParams(8, 200, 16), 64),
}
HEADS = {"mha": (4, 4), "gqa4": (8, 2), "gqa8": (8, 1), "gqa3": (6, 2)}


def _run(op, batch, params, min_prompt_len, scales=None, out_dtype=None):
    plan, dense_from = plan_for(batch, params, min_prompt_len, op.block_q)
    prepared = op.prepare(plan, dense_from, FakeCommonMetadata(batch))
    # poison: every row must be written
    out = torch.full(batch.query.shape, float("nan"), dtype=out_dtype or batch.query.dtype)
    extra = {} if scales is None else {"scales": scales}
    op.run(batch.query, batch.key_cache, batch.value_cache, prepared, params, batch.scale, out, **extra)
    return out


@pytest.mark.parametrize("batch_name", list(BATCHES))
@pytest.mark.parametrize("params_name", list(PARAMS))
@pytest.mark.parametrize("heads", ["mha", "gqa4"])
def test_torch_op_matches_reference(batch_name, params_name, heads):
    params, min_len = PARAMS[params_name]
    batch = make_batch(BATCHES[batch_name], *HEADS[heads], head_dim=32, block_size=16, seed=1)
    out = _run(TorchTriangleOp(), batch, params, min_len)
    assert not torch.isnan(out).any()
    assert relative_error(out, reference_output(batch, params, min_len)) < 1e-5


def test_torch_op_reads_channel_major_keys():
    """The CPU kernel stores keys channel-major; the op reads any strided view."""
    params, min_len = PARAMS["paper_like"]
    batch = make_batch(BATCHES["mixed"], 8, 2, 32, 16, seed=2, key_layout="channel_major")
    out = _run(TorchTriangleOp(), batch, params, min_len)
    assert relative_error(out, reference_output(batch, params, min_len)) < 1e-5


def test_wrong_mask_is_detected():
    """The comparison can fail: dense attention is far from the triangle reference."""
    params, min_len = PARAMS["paper_like"]
    batch = make_batch(BATCHES["whole_prompt"], 4, 4, 32, 16, seed=3)
    dense = _run(TorchTriangleOp(), batch, params, min_prompt_len=10**9)
    assert relative_error(dense, reference_output(batch, params, min_len)) > 1e-2


# -- The Triton kernel, interpreted on the CPU --------------------------------

def _triton_op(num_heads, num_kv_heads, head_dim, **cfg):
    if torch.cuda.is_available():
        pytest.skip("compiled on the GPU by tests/gpu instead")
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" or "Interpreted" not in type(triton.language.zeros).__name__:
        pytest.skip("needs TRITON_INTERPRET=1 before Triton is imported (tests/conftest.py sets it)")
    from vllm_trianglemix.ops import triangle_triton as tt

    config = tt.KernelConfig(**{"block_m": 32, "block_n": 16, "num_warps": 1, "num_stages": 1, **cfg})
    return tt.TritonTriangleOp(num_heads, num_kv_heads, head_dim, config=config)


@pytest.mark.parametrize(
    "batch_name,params_name,heads,dtype",
    [
        ("mixed", "paper_like", "gqa4", torch.float32),
        ("mixed", "sinks_beyond_a_block", "mha", torch.float32),
        ("chunk_ends_in_last_rows", "no_sinks", "gqa8", torch.float16),
        ("whole_prompt", "window_wider_than_chunk", "gqa3", torch.float16),
    ],
)
def test_triton_kernel_interpreted(batch_name, params_name, heads, dtype):
    params, min_len = PARAMS[params_name]
    op = _triton_op(*HEADS[heads], 64)
    batch = make_batch(BATCHES[batch_name], *HEADS[heads], head_dim=64, block_size=16, dtype=dtype, seed=4)
    out = _run(op, batch, params, min_len)
    assert not torch.isnan(out).any()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(out, reference_output(batch, params, min_len)) < tol


@pytest.mark.parametrize("mask_mode", [1, 2])
def test_triton_kernel_other_mask_modes(mask_mode):
    """The kernel's other masking variants (split loops; mask every tile) are exact too."""
    params, min_len = PARAMS["paper_like"]
    op = _triton_op(8, 2, 64, mask_mode=mask_mode)
    batch = make_batch(BATCHES["mixed"], 8, 2, 64, 16, seed=6)
    out = _run(op, batch, params, min_len)
    assert relative_error(out, reference_output(batch, params, min_len)) < 1e-5


def test_triton_kernel_long_dense_rows():
    """Dense rows over long contexts (in a plan of every row; the engine leaves them to the
    stock backend): one item per block, each over all of its keys, exact."""
    params, min_len = PARAMS["paper_like"]
    op = _triton_op(8, 2, 64)
    batch = make_batch(BATCHES["long_dense_tail"] + [(300, 0, 300)], 8, 2, 64, 16, seed=5)
    plan, dense_from = plan_for(batch, params, min_len, op.block_q)
    dense = plan.q_pos >= dense_from[plan.req]
    assert dense.any() and np.array_equal(plan.k_end[dense], plan.q_pos[dense] + plan.n_q[dense])
    assert not plan.k_start[dense].any() and not plan.sink_end[dense].any()
    out = _run(op, batch, params, min_len)
    assert not torch.isnan(out).any()
    assert relative_error(out, reference_output(batch, params, min_len)) < 1e-5


# -- fp8 (e4m3) KV cache: the kernel against float32 on the dequantized cache --

# Per-head K scales, one V scale (vLLM keeps either form per layer).
K_SCALE, V_SCALE, Q_SCALE = torch.tensor([0.02, 0.05]), torch.tensor(0.03), torch.tensor(0.01)


@pytest.mark.parametrize(
    "batch_name,fp8_query",
    [("mixed", False), ("long_dense_tail", False), ("mixed", True)],
)
def test_triton_kernel_fp8_cache_interpreted(batch_name, fp8_query):
    """An fp8 cache read with its scales equals float32 attention on the dequantized cache;
    with an fp8 query (vLLM quantizes it for FA3) the query's scale is applied too."""
    from vllm_trianglemix.ops.fp8 import Fp8Scales

    params, min_len = PARAMS["paper_like"]
    op = _triton_op(8, 2, 64)
    batch = to_fp8(make_batch(BATCHES[batch_name], 8, 2, 64, 16, seed=8), K_SCALE, V_SCALE,
                   Q_SCALE if fp8_query else None)
    out_dtype = torch.float16 if fp8_query else torch.float32
    out = _run(op, batch, params, min_len, Fp8Scales(Q_SCALE, K_SCALE, V_SCALE), out_dtype)
    assert not torch.isnan(out).any()
    ref = reference_output(batch, params, min_len)
    assert relative_error(out, ref) < (2e-3 if fp8_query else 1e-5)
    # the check can fail: ignoring the scales is far off
    one = torch.tensor(1.0)
    unscaled = _run(op, batch, params, min_len, Fp8Scales(one, one, one), out_dtype)
    assert relative_error(unscaled, ref) > 0.5


def test_torch_op_fp8_cache():
    """The CPU path dequantizes the fp8 cache with the layer's scales when it gathers keys."""
    from vllm_trianglemix.ops.fp8 import Fp8Scales

    params, min_len = PARAMS["paper_like"]
    batch = to_fp8(make_batch(BATCHES["mixed"], 8, 2, 32, 16, seed=9), K_SCALE, V_SCALE)
    out = _run(TorchTriangleOp(), batch, params, min_len, scales=Fp8Scales(None, K_SCALE, V_SCALE))
    assert relative_error(out, reference_output(batch, params, min_len)) < 1e-5
