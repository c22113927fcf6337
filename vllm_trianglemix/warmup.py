"""Compile the plugin's Triton kernels before an engine serves (CUDA).

Triton compiles a kernel the first time it is launched with a new set of
compile-time values (tile sizes, dtypes, the map's parameters) and integer
specialisations. Left to itself that would happen on the first long prompt:
the first user waits for it, and vLLM's JIT monitor warns. The metadata
builder calls :func:`warm_up` while vLLM sets up attention, before CUDA-graph
capture: every kernel is launched once on a small synthetic prompt with the
engine's dtypes, page size and map, with the integer arguments that vary from
step to step excluded from specialisation (``do_not_specialize``) and the
selection's block axis sized for the engine's longest prompt, so that no
prompt afterwards needs a new compile.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from vllm.logger import init_logger

from vllm_trianglemix.ops.fp8 import Fp8Scales
from vllm_trianglemix.pattern import dense_start, plan_blocks, plan_query_blocks

logger = init_logger("vllm.trianglemix")


class _Cam:
    def __init__(self, block_table):
        self.block_table_tensor = block_table


def warm_up(triangle_op, dynamic_op, triangle_sets, dynamic_sets, dtype: torch.dtype, kv_fp8: bool,
            page_size: int, max_model_len: int, device) -> None:
    """Launch every kernel the engine can launch once (each op and configuration once per process)."""
    key = (tuple(triangle_sets), tuple(dynamic_sets), dtype, kv_fp8, page_size, max_model_len)
    done = getattr(triangle_op, "warmed", None)
    if done is None:
        done = triangle_op.warmed = set()
    if key in done or not (triangle_sets or dynamic_sets):
        return
    start = time.perf_counter()
    if dynamic_sets:
        widest = max(-(-max_model_len // p.block_size) for p in dynamic_sets)
        from vllm_trianglemix.ops.xattention_triton.select import blocks_width

        dynamic_op.blocks_width = max(dynamic_op.blocks_width, blocks_width(widest))
    # a prompt of several query blocks with rows past the window, no longer than the engine
    # serves (the selection's block axis is sized for that); its dense rows are the stock
    # backend's, as in the engine
    length = min(1400, max_model_len)
    g = torch.Generator(device=device).manual_seed(0)
    heads, kv_heads, d = triangle_op.num_heads, triangle_op.num_kv_heads, triangle_op.head_size
    pages = -(-length // page_size)
    # the stock FlashAttention layout ([pages, kv_heads, page, 2 * dim] viewed per K and V)
    kv = torch.randn(pages, kv_heads, page_size, 2 * d, generator=g, device=device, dtype=dtype)
    key_cache, value_cache = kv.transpose(1, 2).split(d, dim=-1)
    query = torch.randn(length, heads, d, generator=g, device=device, dtype=dtype)
    output = torch.empty_like(query)
    block_table = torch.arange(pages, dtype=torch.int32, device=device)[None, :]
    cam = _Cam(block_table)
    qsl, seq, reqs = np.array([0, length]), np.array([length]), np.array([0])
    variants = [(query, key_cache, value_cache, None)]
    if kv_fp8:
        one = torch.tensor(1.0, device=device)
        k8, v8 = (c.to(torch.float8_e4m3fn) for c in (key_cache, value_cache))
        variants = [(query, k8, v8, Fp8Scales(None, one, one)),  # query as the model computes it
                    (query.to(torch.float8_e4m3fn), k8, v8, Fp8Scales(one, one, one))]  # quantized for FA3
    for q, kc, vc, scales in variants:
        for params in triangle_sets:
            dense_from = dense_start(np.array([length]), params.n_last, 0)
            plan = plan_blocks(qsl, seq, dense_from, reqs, params, triangle_op.block_q, rows="triangle")
            triangle_op.run(q, kc, vc, triangle_op.prepare(plan, dense_from, cam), params, 0.1, output,
                            scales=scales)
        for params in dynamic_sets:
            dense_from = dense_start(np.array([length]), params.n_last, 0)
            block_plan = plan_query_blocks(qsl, seq, dense_from, reqs, params.block_size)
            prepared = dynamic_op.prepare(block_plan, dense_from, cam)
            dynamic_op.run(q, kc, vc, prepared, params, 0.1, output, scales=scales,
                           stats=torch.zeros(3, dtype=torch.float64, device=device))
    torch.cuda.synchronize(device)
    done.add(key)
    logger.info("TriangleMix: kernels compiled for %d triangle and %d dynamic parameter set(s) in %.1f s",
                len(triangle_sets), len(dynamic_sets), time.perf_counter() - start)

