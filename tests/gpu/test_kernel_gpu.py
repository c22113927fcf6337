"""The compiled Triton kernel on the GPU against the float32 reference of the exact mask.

Skipped without a CUDA GPU. On the device: bf16 and fp16, GQA ratios 1/4/8
(and a non-power-of-two group), head sizes 64/128/256, several requests per
batch with chunks that start and end inside the window and inside the last
rows, prompt lengths that are not multiples of the block size, n_init 0 and
larger than a block, n_local smaller and larger than a chunk, long dense rows
(one program per block and KV head). Outputs are poisoned with NaN first, so an
unwritten row fails. One test writes the cache with vLLM's own FlashAttention
cache layout and ``reshape_and_cache_flash`` and compares with FA3 itself.
"""

import pytest
import torch

from tests.paged import make_batch, plan_for, reference_output, relative_error
from vllm_trianglemix import compat
from vllm_trianglemix.pattern import TriangleParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BATCHES = {
    "mixed": [(3000, 1000, 777), (450, 0, 450), (5000, 4900, 77), (4099, 0, 1280), (2000, 2003, 1)],
    "last_rows_chunked": [(2600, 0, 2590), (2600, 2590, 10), (2600, 2550, 50)],
    "long_dense_tail": [(20000, 19000, 1000)],
}
PARAMS = {
    "paper": (TriangleParams(8, 512, 128), 1024),
    "no_sinks_small_window": (TriangleParams(0, 100, 64), 256),
    "sinks_beyond_block_wide_window": (TriangleParams(40, 2048, 32), 256),
}


def _op(heads, kv_heads, head_dim, **cfg):
    from vllm_trianglemix.ops.triangle_triton import KernelConfig, TritonTriangleOp

    config = KernelConfig.default_for(head_dim)
    if cfg:
        config = KernelConfig(**{**config.__dict__, **cfg})
    return TritonTriangleOp(heads, kv_heads, head_dim, config=config)


def _run(op, batch, params, min_len):
    from tests.paged import FakeCommonMetadata

    plan, dense_from = plan_for(batch, params, min_len, op.block_q)
    prepared = op.prepare(plan, dense_from, FakeCommonMetadata(batch))
    out = torch.full_like(batch.query, float("nan"))
    op.run(batch.query, batch.key_cache, batch.value_cache, prepared, params, batch.scale, out)
    torch.cuda.synchronize()
    return out, plan


CASES = [
    ("mixed", "paper", (32, 8), 128, torch.bfloat16, 16),
    ("mixed", "paper", (32, 32), 128, torch.float16, 16),
    ("mixed", "no_sinks_small_window", (32, 4), 64, torch.bfloat16, 32),
    ("last_rows_chunked", "sinks_beyond_block_wide_window", (28, 4), 128, torch.bfloat16, 16),
    ("last_rows_chunked", "paper", (16, 2), 256, torch.bfloat16, 64),
    ("long_dense_tail", "paper", (32, 8), 128, torch.bfloat16, 16),
]


@pytest.mark.parametrize("batch_name,params_name,heads,head_dim,dtype,block_size", CASES)
def test_kernel_matches_reference(batch_name, params_name, heads, head_dim, dtype, block_size):
    params, min_len = PARAMS[params_name]
    op = _op(*heads, head_dim)
    batch = make_batch(BATCHES[batch_name], *heads, head_dim, block_size, dtype=dtype,
                       device="cuda", seed=len(batch_name))
    out, _ = _run(op, batch, params, min_len)
    assert not torch.isnan(out).any(), "unwritten or NaN rows"
    err = relative_error(out, reference_output(batch, params, min_len))
    assert err < 1.5e-2, err


def test_wrong_mask_is_detected_on_gpu():
    params, min_len = PARAMS["paper"]
    op = _op(32, 8, 128)
    batch = make_batch(BATCHES["mixed"], 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=7)
    dense, _ = _run(op, batch, params, 10**9)
    assert relative_error(dense, reference_output(batch, params, min_len)) > 5e-2


FP8_CASES = [
    # batch, params, heads, head_dim, dtype, block_size, per-head K scales, fp8 query
    ("mixed", "paper", (32, 8), 128, torch.bfloat16, 16, False, True),
    ("mixed", "no_sinks_small_window", (32, 4), 64, torch.float16, 32, True, False),
    ("long_dense_tail", "paper", (32, 8), 128, torch.bfloat16, 16, True, True),
]


@pytest.mark.parametrize("batch_name,params_name,heads,head_dim,dtype,block_size,per_head,fp8_q",
                         FP8_CASES)
def test_kernel_fp8_cache_matches_reference(batch_name, params_name, heads, head_dim, dtype,
                                            block_size, per_head, fp8_q):
    """fp8 (e4m3) cache with vLLM's scales (per layer or per KV head), with and without an
    fp8 query: against float32 attention on the dequantized cache (and query)."""
    from tests.paged import FakeCommonMetadata, to_fp8
    from vllm_trianglemix.ops.fp8 import Fp8Scales

    params, min_len = PARAMS[params_name]
    kv_heads = heads[1]
    k_scale = (torch.linspace(0.015, 0.04, kv_heads) if per_head else torch.tensor(0.02)).cuda()
    v_scale = (torch.linspace(0.02, 0.03, kv_heads) if per_head else torch.tensor(0.025)).cuda()
    q_scale = torch.tensor(0.015, device="cuda")
    op = _op(*heads, head_dim)
    batch = to_fp8(make_batch(BATCHES[batch_name], *heads, head_dim, block_size, dtype=dtype,
                              device="cuda", seed=11), k_scale, v_scale, q_scale if fp8_q else None)
    plan, dense_from = plan_for(batch, params, min_len, op.block_q)
    out = torch.full(batch.query.shape, float("nan"), dtype=dtype, device="cuda")
    op.run(batch.query, batch.key_cache, batch.value_cache,
           op.prepare(plan, dense_from, FakeCommonMetadata(batch)), params, batch.scale, out,
           scales=Fp8Scales(q_scale, k_scale, v_scale))
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "unwritten or NaN rows"
    err = relative_error(out, reference_output(batch, params, min_len))
    assert err < 1.5e-2, err


def test_vllm_flash_cache_layout_and_fa3_agree():
    """Cache written by vLLM's reshape_and_cache_flash in FlashAttention's layout;
    with every row dense, the kernel equals FA3 (vllm_flash_attn) on that cache."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        _flash_cache_check()


def test_vllm_fp8_flash_cache_against_reference_and_fa3():
    """fp8 cache written by vLLM (reshape_and_cache_flash, kv_cache_dtype "fp8", per-layer
    scales), read through the stock impl's view: the kernel (every row dense) against float32
    on the dequantized cache, side by side with FA3 fp8's own error on the same inputs."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        err_ours, err_fa3 = _flash_cache_check(fp8=True)
    print(f"BREADTH: vLLM fp8 cache, dense rows vs float32 on the dequantized cache: "
          f"kernel {err_ours:.2e}, FA3 fp8 {err_fa3:.2e}")
    assert err_ours < 1.5e-2 and err_ours <= err_fa3 + 5e-3, (err_ours, err_fa3)


def _gather(cache, blocks, offsets):
    """cache[blocks, offsets] as float32 (an fp8 view gathered through its bytes)."""
    if cache.dtype == torch.float8_e4m3fn:
        return cache.view(torch.uint8)[blocks, offsets].view(torch.float8_e4m3fn).float()
    return cache[blocks, offsets].float()


def _flash_cache_check(fp8: bool = False):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from vllm_trianglemix.backends.cuda import flash_kv_cache_views

    torch.manual_seed(0)
    heads, kv_heads, d, bs = 32, 8, 128, 16
    reqs = [(5000, 0, 5000), (3000, 2000, 1000)]
    seq = [p + q for _, p, q in reqs]
    nblk = [-(-s // bs) for s in seq]
    num_blocks = sum(nblk) + 4
    shape, order = compat.paged_cache_layout(FlashAttentionBackend, num_blocks, bs, kv_heads, d)
    inv = [order.index(i) for i in range(len(order))]
    cache_dtype = "fp8" if fp8 else "auto"
    kv = torch.zeros([shape[i] for i in order], dtype=torch.uint8 if fp8 else torch.bfloat16,
                     device="cuda").permute(*inv)
    key_cache, value_cache = flash_kv_cache_views(kv, d, cache_dtype)
    k_scale = torch.tensor(0.02, device="cuda") if fp8 else torch.ones(1, device="cuda")
    v_scale = torch.tensor(0.03, device="cuda") if fp8 else torch.ones(1, device="cuda")
    q_scale = torch.tensor(0.015, device="cuda")
    ref_keys, ref_values = [], []
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    bt = torch.zeros(len(reqs), max(nblk), dtype=torch.int32, device="cuda")
    used = 0
    for r, n in enumerate(nblk):
        bt[r, :n] = perm[used : used + n]
        used += n
        pos = torch.arange(seq[r], device="cuda")
        slots = (bt[r, pos // bs].long() * bs + pos % bs)
        k = torch.randn(seq[r], kv_heads, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(seq[r], kv_heads, d, device="cuda", dtype=torch.bfloat16)
        # as the stock impl writes it (an fp8 cache through its uint8 storage)
        ops.reshape_and_cache_flash(k, v, *flash_kv_cache_views(kv, d), slots, cache_dtype,
                                    k_scale, v_scale)
        blk, off = bt[r, pos // bs].long(), pos % bs
        ref_keys.append(_gather(key_cache, blk, off) * k_scale)  # what the cache holds
        ref_values.append(_gather(value_cache, blk, off) * v_scale)
    q_lens = [q for _, _, q in reqs]
    q = torch.randn(sum(q_lens), heads, d, device="cuda", dtype=torch.bfloat16)
    q_ref = q
    if fp8:  # FA3 fp8 takes an fp8 query (vLLM quantizes it in the attention layer)
        q = (q.float() / q_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        q_ref = q.float() * q_scale
    cu = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device="cuda")
    seqused = torch.tensor(seq, dtype=torch.int32, device="cuda")
    fa = torch.empty(q.shape, dtype=torch.bfloat16, device="cuda")
    descale = {}
    if fp8:
        shape2 = (len(reqs), kv_heads)
        descale = dict(q_descale=q_scale.expand(shape2), k_descale=k_scale.expand(shape2),
                       v_descale=v_scale.expand(shape2))
    flash_attn_varlen_func(q=q, k=key_cache, v=value_cache, out=fa, cu_seqlens_q=cu,
                           max_seqlen_q=max(q_lens), seqused_k=seqused, max_seqlen_k=max(seq),
                           softmax_scale=d ** -0.5, causal=True, block_table=bt, fa_version=3,
                           **descale)

    import numpy as np

    from tests.paged import FakeCommonMetadata, PagedBatch

    batch = PagedBatch(q, key_cache, value_cache, bt, np.array([0, q_lens[0], sum(q_lens)]),
                       np.array(seq), np.array([p for p, _, _ in reqs]), ref_keys, ref_values,
                       d ** -0.5, reference_query=q_ref)
    params = TriangleParams(8, 512, 128)
    op = _op(heads, kv_heads, d)
    plan, dense_from = plan_for(batch, params, min_prompt_len=10**9, block_q=op.block_q)
    out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    from vllm_trianglemix.ops.fp8 import Fp8Scales

    op.run(q, key_cache, value_cache, op.prepare(plan, dense_from, FakeCommonMetadata(batch)),
           params, d ** -0.5, out, scales=Fp8Scales(q_scale, k_scale, v_scale) if fp8 else None)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    if not fp8:
        assert relative_error(out, fa) < 1e-2
        return None
    ref = reference_output(batch, params, min_prompt_len=10**9)
    return relative_error(out, ref), relative_error(fa, ref)
