"""The compiled dynamic-layer (XAttention) kernels on the GPU, on vLLM's own paged cache.

Skipped without a CUDA GPU. K/V are written by vLLM's ``reshape_and_cache_flash``
into FlashAttention's cache layout (shuffled blocks), queries are bf16/fp16.
A dynamic layer runs as the backend runs it: the triangle op on the dense
rows, the dynamic op on the others, into a NaN-poisoned output. Checked:

* the selection equals the float64 reference's (``tests/xattention_reference``)
  for every (item, KV head) decision whose margin exceeds ``MARGIN`` (most of
  them; near ties of a bf16 estimate may go either way and are counted);
* the output equals float32 attention under the selected blocks;
* a fixed budget keeps exactly its number of blocks; keeping everything equals
  FA3 itself on the same cache; a wrong selection is detected.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.paged import FakeCommonMetadata, PagedBatch, relative_error
from tests.xattention_reference import block_masses, keep_rule
from vllm_trianglemix import compat
from vllm_trianglemix.ops.xattention_triton import attend_cute
from vllm_trianglemix.pattern import (
    DynamicParams,
    dense_row_params,
    dense_start,
    plan_blocks,
    plan_query_blocks,
    select_key_blocks,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MARGIN = 1e-4
MIN_PROMPT_LEN = 1024
BATCHES = {
    # chunks cut inside query blocks, a short (dense) prompt, a chunk ending in the last rows
    "mixed": [(3000, 1000, 777), (450, 0, 450), (2500, 2400, 100), (2099, 0, 1280), (2000, 2003, 1)],
    "whole": [(4000, 0, 4000)],
}
PARAMS = {
    "default": DynamicParams("xattention", 128, 8, 0.9, None, 128),
    "budget": DynamicParams("xattention", 128, 8, 1.0, 0.2, 128),
    "tau_budget_stride16": DynamicParams("xattention", 64, 16, 0.8, 0.5, 64),
    "block48_stride3": DynamicParams("xattention", 48, 3, 0.9, None, 32),
}


def _vllm_config():
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config

    return set_current_vllm_config(VllmConfig())


def flash_batch(requests, heads, kv_heads, d, page, dtype, seed, fill=float("nan"),
                fp8_scales=None) -> PagedBatch:
    """Random requests in FlashAttention's paged layout, written by reshape_and_cache_flash.

    Slots no request writes hold ``fill`` (NaN: a kernel that reads them fails).
    ``fp8_scales`` (an Fp8Scales of per-layer scales): an fp8 cache written by vLLM
    (kv_cache_dtype "fp8", allocated as uint8, unwritten bytes e4m3 NaN), the batch's
    keys/values its dequantized content; with a ``q`` scale the query is quantized as vLLM
    does for FA3 and ``reference_query`` is its dequantized value.
    """
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    from vllm_trianglemix.backends.cuda import flash_kv_cache_views

    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq = [p + q for _, p, q in requests]
    nblk = [-(-s // page) for s in seq]
    num_blocks = sum(nblk) + 3
    shape, order = compat.paged_cache_layout(FlashAttentionBackend, num_blocks, page, kv_heads, d)
    inv = [order.index(i) for i in range(len(order))]
    fp8 = fp8_scales is not None
    cache_dtype = "fp8" if fp8 else "auto"
    if fp8:
        kv = torch.full([shape[i] for i in order], 0x7F, dtype=torch.uint8, device="cuda").permute(*inv)
    else:
        kv = torch.full([shape[i] for i in order], fill, dtype=dtype, device="cuda").permute(*inv)
    key_cache, value_cache = flash_kv_cache_views(kv, d, cache_dtype)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    bt = torch.zeros(len(requests), max(nblk), dtype=torch.int32, device="cuda")
    keys, values, used = [], [], 0
    one = torch.ones(1, device="cuda")
    k_scale, v_scale = (fp8_scales.k, fp8_scales.v) if fp8 else (one, one)
    for r, n in enumerate(nblk):
        bt[r, :n] = perm[used: used + n]
        used += n
        pos = torch.arange(seq[r], device="cuda")
        slots = bt[r, pos // page].long() * page + pos % page
        k = torch.randn(seq[r], kv_heads, d, device="cuda", generator=gen).to(dtype)
        v = torch.randn(seq[r], kv_heads, d, device="cuda", generator=gen).to(dtype)
        # as the stock impl writes it (an fp8 cache through its uint8 storage)
        ops.reshape_and_cache_flash(k, v, *flash_kv_cache_views(kv, d), slots, cache_dtype, k_scale, v_scale)
        if fp8:  # what the cache holds
            blk, off = bt[r, pos // page].long(), pos % page
            k = key_cache.view(torch.uint8)[blk, off].view(torch.float8_e4m3fn).float() * k_scale
            v = value_cache.view(torch.uint8)[blk, off].view(torch.float8_e4m3fn).float() * v_scale
        keys.append(k)
        values.append(v)
    q_lens = [q for _, _, q in requests]
    q = torch.randn(sum(q_lens), heads, d, device="cuda", generator=gen).to(dtype)
    q_ref = None
    if fp8 and fp8_scales.q is not None:
        q = (q.float() / fp8_scales.q).clamp(-448, 448).to(torch.float8_e4m3fn)
        q_ref = q.float() * fp8_scales.q
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    return PagedBatch(q, key_cache, value_cache, bt, qsl, np.array(seq),
                      np.array([p for p, _, _ in requests]), keys, values, d ** -0.5,
                      reference_query=q_ref)


def _query(batch):
    """The query the references use (the dequantized one for an fp8 query)."""
    return batch.query if batch.reference_query is None else batch.reference_query


def _ops(heads, kv_heads, d, overrides=""):
    """The backend's ops; ``overrides``: XAttnKernelConfig fields ("attn_cute=0,block_n=128")."""
    from vllm_trianglemix.backends.cuda import dynamic_op, triangle_op
    from vllm_trianglemix.ops.xattention_triton import TritonXAttentionOp

    dyn = dynamic_op(heads, kv_heads, d)
    if overrides:
        dyn = TritonXAttentionOp(heads, kv_heads, d, config=dyn.config.with_overrides(overrides))
    return dyn, triangle_op(heads, kv_heads, d)


class _Recorder:
    def __init__(self, select=select_key_blocks):
        self.select, self.keep = select, None

    def __call__(self, mass, q_block, threshold, max_density):
        self.keep = self.select(mass, q_block, threshold, max_density)
        return self.keep


def _run_layer(batch, params, heads, kv_heads, d, select=None, overrides="", scales=None, ran=None):
    """The layer as the backend runs it; returns (output, plan, dense starts, kept blocks).

    ``select`` None: the op's own selection (the fused kernel), its kept-block mask returned;
    else that function through ``run`` (recorded). ``ran``: a list the dynamic op is appended to.
    """
    dyn, tri = _ops(heads, kv_heads, d, overrides)
    if ran is not None:
        ran.append(dyn)
    dense_from = dense_start(batch.prompt_lens, params.n_last, MIN_PROMPT_LEN)
    reqs = np.arange(len(batch.seq_lens))
    block_plan = plan_query_blocks(batch.query_start_loc, batch.seq_lens, dense_from, reqs,
                                   params.block_size)
    dense_plan = plan_blocks(batch.query_start_loc, batch.seq_lens, dense_from, reqs,
                             dense_row_params(params.n_last), tri.block_q, rows="dense")
    cam = FakeCommonMetadata(batch)
    out_dtype = torch.bfloat16 if batch.query.dtype == torch.float8_e4m3fn else batch.query.dtype
    out = torch.full(batch.query.shape, float("nan"), dtype=out_dtype, device="cuda")
    tri.run(batch.query, batch.key_cache, batch.value_cache, tri.prepare(dense_plan, dense_from, cam),
            dense_row_params(params.n_last), batch.scale, out, scales=scales)
    prepared = dyn.prepare(block_plan, dense_from, cam)
    if select is None:  # run()'s steps, with the kept-block mask asked for
        mass = dyn.estimate_row_tiles(batch.query, batch.key_cache, prepared, params, batch.scale, scales)
        blocks = dyn.select(mass, prepared, params, keep_mask=True)
        dyn.attend(batch.query, batch.key_cache, batch.value_cache, prepared, params, batch.scale, out,
                   blocks, scales)
        keep = blocks.keep
    else:
        recorder = _Recorder(select)
        dyn.run(batch.query, batch.key_cache, batch.value_cache, prepared, params, batch.scale, out,
                select=recorder, scales=scales)
        keep = recorder.keep
    torch.cuda.synchronize()
    from vllm_trianglemix.ops.xattention_triton import XAttnKernelConfig

    requested = XAttnKernelConfig.from_env(d)
    requested = requested.with_overrides(overrides) if overrides else requested
    assert dyn.config == requested, "a kernel did not build and fell back (see the warning)"
    return out, block_plan, dense_from, keep


def _attention_rows(q, k, v, pos, allowed_keys, scale):
    """Float32 attention of rows at positions ``pos`` over keys ``0..``: causal & allowed_keys [Hq, K]."""
    kpos = torch.arange(k.shape[0], device=q.device)
    allowed = (kpos[None, :] <= pos[:, None])[None] & allowed_keys[:, None, :]
    s = torch.einsum("rhd,khd->hrk", q.float(), k.float()) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return torch.einsum("hrk,khd->rhd", p, v.float())


def _masked_reference(batch, params, block_plan, dense_from, keep):
    """Float32 attention of every row: causal, and for dynamic rows only the kept blocks."""
    heads, kv_heads = batch.query.shape[1], batch.keys[0].shape[1]
    rep = heads // kv_heads
    dev = batch.query.device
    query = _query(batch)
    out = torch.full(batch.query.shape, float("nan"), dtype=torch.float32, device=dev)
    kk = [k.repeat_interleave(rep, 1) for k in batch.keys]
    vv = [v.repeat_interleave(rep, 1) for v in batch.values]
    for i in range(block_plan.num_items):  # dynamic rows: kept blocks of their item
        req, tok, n = int(block_plan.req[i]), int(block_plan.q_tok[i]), int(block_plan.n_q[i])
        pos = torch.arange(int(block_plan.q_pos[i]), int(block_plan.q_pos[i]) + n, device=dev)
        nk = int(pos[-1]) + 1
        kept = keep[i][:, torch.arange(nk, device=dev) // params.block_size].repeat_interleave(rep, 0)
        out[tok: tok + n] = _attention_rows(query[tok: tok + n], kk[req][:nk], vv[req][:nk],
                                            pos, kept, batch.scale)
    for r in range(len(batch.seq_lens)):  # dense rows: causal, in slices of 512 rows
        lo, hi = int(batch.query_start_loc[r]), int(batch.query_start_loc[r + 1])
        first = int(batch.seq_lens[r]) - (hi - lo)
        start = lo + max(0, int(dense_from[r]) - first)
        for a in range(start, hi, 512):
            z = min(a + 512, hi)
            pos = torch.arange(first + a - lo, first + z - lo, device=dev)
            nk = int(pos[-1]) + 1
            every = torch.ones(heads, nk, dtype=torch.bool, device=dev)
            out[a:z] = _attention_rows(query[a:z], kk[r][:nk], vv[r][:nk], pos, every, batch.scale)
    assert not torch.isnan(out).any()
    return out


def _compare_selection(batch, params, block_plan, keep):
    """Decisions with a margin above MARGIN equal the reference's; returns (compared, total)."""
    compared = total = 0
    for i in range(block_plan.num_items):
        req, tok, n = int(block_plan.req[i]), int(block_plan.q_tok[i]), int(block_plan.n_q[i])
        pos0, b = int(block_plan.q_pos[i]), int(block_plan.q_block[i])
        mass = block_masses(_query(batch)[tok: tok + n].cpu(), batch.keys[req][: pos0 + n].cpu(), pos0,
                            params.block_size, params.stride, batch.scale)
        for t in range(mass.shape[0]):
            k_ref, margin = keep_rule(mass[t: t + 1], b, params.threshold, params.max_density)
            total += 1
            if margin > MARGIN:
                compared += 1
                got = keep[i, t, : b + 1].cpu()
                assert torch.equal(got, k_ref[0]), f"item {i} kv head {t}: {got} != {k_ref[0]}"
    return compared, total


TRITON = "attn_cute=0"  # the Triton attention (on Hopper the default is FA4's where it can run)
CASES = [  # the kernels' defaults, and the other variants
    ("mixed", "default", (32, 8), 128, torch.bfloat16, 16, ""),
    ("mixed", "default", (32, 8), 128, torch.bfloat16, 16, TRITON),
    ("mixed", "default", (32, 8), 128, torch.bfloat16, 16, TRITON + ",block_n=128,block_m=128"),
    ("mixed", "budget", (32, 8), 128, torch.bfloat16, 16,
     "est_block_m=256,est_block_n=128,est_num_stages=2,est_block_d=0"),  # whole-head dots
    ("mixed", "budget", (32, 32), 128, torch.float16, 16, ""),
    ("mixed", "budget", (32, 32), 128, torch.float16, 16, TRITON),
    ("whole", "tau_budget_stride16", (28, 4), 128, torch.bfloat16, 32, ""),  # blocks of 64: Triton's
    ("mixed", "block48_stride3", (16, 2), 64, torch.bfloat16, 16, ""),  # blocks of 48: Triton's
    ("mixed", "block48_stride3", (16, 2), 64, torch.bfloat16, 16,
     "est_block_n=128,est_num_warps=4,est_num_stages=3,block_m=128"),
    ("whole", "budget", (16, 2), 256, torch.bfloat16, 64, ""),
    ("whole", "budget", (16, 2), 256, torch.bfloat16, 64, TRITON),
    ("whole", "budget", (16, 2), 256, torch.bfloat16, 64,  # whole-head dots (the default steps them)
     "est_block_m=64,est_block_n=64,est_num_warps=4,est_num_stages=3,est_block_d=0"),
    ("mixed", "default", (32, 8), 128, torch.bfloat16, 16, "est_block_d=64,est_num_stages=3"),
    ("mixed", "default", (32, 8), 128, torch.bfloat16, 16, "attn_cute=1"),  # FA4's block-sparse forward
    ("mixed", "budget", (32, 32), 128, torch.float16, 16, "attn_cute=1"),
    ("mixed", "default", (16, 2), 64, torch.bfloat16, 16, "attn_cute=1"),
    ("mixed", "default", (16, 4), 256, torch.bfloat16, 16, "attn_cute=1"),  # two 64-key tiles per block
    ("whole", "budget", (16, 2), 256, torch.bfloat16, 64, "attn_cute=1"),
]


@pytest.mark.parametrize("batch_name,params_name,heads,head_dim,dtype,page,overrides", CASES)
def test_dynamic_layer_matches_reference(batch_name, params_name, heads, head_dim, dtype, page, overrides,
                                        caplog):
    params = PARAMS[params_name]
    with _vllm_config(), caplog.at_level("WARNING", logger="vllm.trianglemix"):
        batch = flash_batch(BATCHES[batch_name], *heads, head_dim, page, dtype, seed=len(batch_name))
        why = attend_cute.usable(SimpleNamespace(head_size=head_dim), batch.query, batch.key_cache,
                                 SimpleNamespace(q_fp8=False, kv_fp8=False), params.block_size)
        if "attn_cute=1" in overrides and why is not None:  # FA4's attention itself runs, where usable
            pytest.skip(f"attn_cute: {why}")
        ran = []
        out, plan, dense_from, keep = _run_layer(batch, params, *heads, head_dim, overrides=overrides, ran=ran)
    # FA4's attention wherever it can run (the default and attn_cute=1), else the Triton attention
    assert ran[0].last_attention == ("triton" if why is not None or "attn_cute=0" in overrides else "cute")
    fallbacks = [r.getMessage() for r in caplog.records if "cannot run here" in r.getMessage()
                 or "refused this step" in r.getMessage()]
    assert not fallbacks, fallbacks
    assert not torch.isnan(out).any(), "unwritten or NaN rows"
    compared, total = _compare_selection(batch, params, plan, keep)
    # Random inputs put many decisions within 1e-4 of flipping (on the H100, 38-63% of them were
    # clear in the cases with the most ties); every clear one must agree, and there must be some.
    assert compared >= 0.25 * total, f"only {compared} of {total} decisions clear of near ties"
    ref = _masked_reference(batch, params, plan, dense_from, keep)
    err = relative_error(out, ref)
    assert err < 1.5e-2, err
    if params.max_density is not None and params.threshold >= 1.0:
        b = torch.as_tensor(plan.q_block, device=keep.device)
        budget = torch.clamp(torch.ceil(params.max_density * (b + 1).double()), min=2).long()
        expect = torch.minimum(budget, b + 1)
        assert torch.equal(keep.sum(-1), expect[:, None].expand(-1, keep.shape[1]))


def test_cute_attention_compiles_once_for_every_step_shape(caplog):
    """``attn_cute``: the engine's warm-up prompt (warmup.py: one step of at most 1400 rows from
    position 0) compiles FA4's block-sparse forward; longer steps, chunks that start inside a
    block and several requests in a step reuse that kernel, so a user's first long prompt
    compiles nothing."""
    params = PARAMS["budget"]
    with _vllm_config(), caplog.at_level("WARNING", logger="vllm.trianglemix"):
        warm = flash_batch([(1400, 0, 1400)], 32, 8, 128, 16, torch.bfloat16, seed=1)
        why = attend_cute.usable(SimpleNamespace(head_size=128), warm.query, warm.key_cache,
                                 SimpleNamespace(q_fp8=False, kv_fp8=False), params.block_size)
        if why is not None:
            pytest.skip(f"attn_cute: {why}")
        from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd

        cache = _flash_attn_fwd.compile_cache
        assert hasattr(cache, "cache"), "FA4's compile cache changed shape"
        _run_layer(warm, params, 32, 8, 128, overrides="attn_cute=1")
        compiled = set(cache.cache)
        long = flash_batch([(40000, 23000, 16384), (3000, 1000, 777)], 32, 8, 128, 16, torch.bfloat16,
                           seed=2)
        out, _, _, _ = _run_layer(long, params, 32, 8, 128, overrides="attn_cute=1")
    assert compiled and not [r.getMessage() for r in caplog.records if "attn_cute" in r.getMessage()]
    assert not torch.isnan(out).any()
    new = set(cache.cache) - compiled
    assert not new, f"FA4 compiled again for a longer step: {new}"


def test_wrong_selection_is_detected_on_gpu():
    params = PARAMS["default"]

    def drop_diagonal(mass, q_block, threshold, max_density):
        keep = select_key_blocks(mass, q_block, threshold, max_density)
        j = torch.arange(keep.shape[-1], device=keep.device)
        b = torch.as_tensor(q_block, device=keep.device)[..., None]
        return keep & ((j != b) | (b == 0))

    with _vllm_config():
        batch = flash_batch(BATCHES["mixed"], 32, 8, 128, 16, torch.bfloat16, seed=3)
        _, plan, dense_from, good = _run_layer(batch, params, 32, 8, 128)
        wrong, _, _, _ = _run_layer(batch, params, 32, 8, 128, select=drop_diagonal)
    ref = _masked_reference(batch, params, plan, dense_from, good)
    assert relative_error(wrong, ref) > 5e-2


def test_keep_everything_equals_fa3():
    """threshold 1 without a budget: every causal block, i.e. FA3's causal attention."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    params = DynamicParams("xattention", 128, 8, 1.0, None, 128)
    heads, kv_heads, d = 32, 8, 128
    with _vllm_config():
        batch = flash_batch([(5000, 0, 5000), (3000, 2000, 1000)], heads, kv_heads, d, 16,
                            torch.bfloat16, seed=0, fill=0.0)
        out, _, _, _ = _run_layer(batch, params, heads, kv_heads, d, select=select_key_blocks)
        q_lens = np.diff(batch.query_start_loc)
        fa = torch.empty_like(batch.query)
        flash_attn_varlen_func(
            q=batch.query, k=batch.key_cache, v=batch.value_cache, out=fa,
            cu_seqlens_q=torch.tensor(batch.query_start_loc, dtype=torch.int32, device="cuda"),
            max_seqlen_q=int(q_lens.max()),
            seqused_k=torch.tensor(batch.seq_lens, dtype=torch.int32, device="cuda"),
            max_seqlen_k=int(batch.seq_lens.max()), softmax_scale=batch.scale, causal=True,
            block_table=batch.block_table, fa_version=3)
        torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    assert relative_error(out, fa) < 1e-2


ESTIMATE_KERNELS = ["", "est_block_m=256,est_block_n=128,est_num_stages=2,est_block_d=0",
                    "est_block_n=64,est_num_stages=4",
                    "est_block_d=64,est_num_stages=3",
                    "est_fp8_score=1", "est_fp8_score=1,est_fp8_fast_acc=1", "est_tma=0",
                    "est_tma=0,est_fp8_score=1,est_fp8_fast_acc=1",
                    "est_head_major=1", "est_key_splits=2",  # (default tiles: parts without tiles)
                    "est_key_splits=2,est_block_n=16", "est_key_splits=3,est_head_major=1,est_block_n=16",
                    # the Gluon loop (asserted to have run): defaults, one part, 32-wide steps, 128-group tiles
                    "est_gluon=1", "est_gluon=1,est_key_splits=1,est_head_major=0",
                    "est_gluon=1,est_block_d=32,est_num_stages=8", "est_gluon=1,est_key_splits=3,est_block_n=128"]


def _e4m3(x):
    return x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


@pytest.mark.parametrize("overrides", ESTIMATE_KERNELS)
def test_estimate_is_exact_against_float32_op(overrides, monkeypatch):
    """The bf16 estimate's block masses (defaults and other tiles) equal the float32 CPU op's;
    fp8-scored (``est_fp8_score``), the CPU op's on the e4m3-rounded query and keys."""
    from vllm_trianglemix.ops.xattention_torch import antidiagonal_block_mass
    from vllm_trianglemix.ops.xattention_triton import estimate_gluon

    gluon_runs = []
    loop = estimate_gluon.run_loop
    monkeypatch.setattr(estimate_gluon, "run_loop", lambda *a, **k: gluon_runs.append(1) or loop(*a, **k))

    rounded = _e4m3 if "est_fp8_score=1" in overrides else (lambda x: x.float())

    params = PARAMS["default"]
    dyn = _ops(32, 8, 128, overrides)[0]
    with _vllm_config():
        batch = flash_batch(BATCHES["mixed"], 32, 8, 128, 16, torch.bfloat16, seed=5)
    dense_from = dense_start(batch.prompt_lens, params.n_last, MIN_PROMPT_LEN)
    plan = plan_query_blocks(batch.query_start_loc, batch.seq_lens, dense_from,
                             np.arange(len(batch.seq_lens)), params.block_size)
    mass = dyn.estimate(batch.query, batch.key_cache, dyn.prepare(plan, dense_from, FakeCommonMetadata(batch)),
                        params, batch.scale).cpu()
    worst = 0.0
    for i in range(plan.num_items):
        req, tok, n = int(plan.req[i]), int(plan.q_tok[i]), int(plan.n_q[i])
        pos0, b = int(plan.q_pos[i]), int(plan.q_block[i])
        expect = antidiagonal_block_mass(rounded(batch.query[tok: tok + n].cpu()),
                                         rounded(batch.keys[req].cpu()), pos0, b,
                                         params.block_size, params.stride, batch.scale)
        worst = max(worst, float((mass[i, :, : b + 1] - expect).abs().max() / expect.abs().max()))
    # (the tensor cores' own fp8 accumulation rounds the scores further)
    assert worst < (1e-2 if "est_fp8_fast_acc=1" in overrides else 1e-4), worst
    # (the Gluon loop ran, and was not dropped for the Triton loop after a build failure)
    assert bool(gluon_runs) == ("est_gluon=1" in overrides and torch.cuda.get_device_capability()[0] == 9)
    assert dyn.config.est_gluon == int("est_gluon=1" in overrides)
    assert not math.isnan(worst)


def test_fused_selection_is_the_rule_on_gpu():
    """The fused selection kernel keeps exactly what select_key_blocks keeps, on the GPU: the
    estimate's masses of a batch, and masses with many ties (small integers) and zero rows."""
    from vllm_trianglemix.ops.xattention_triton import kept_blocks_from_mask

    dyn = _ops(32, 8, 128)[0]
    with _vllm_config():
        batch = flash_batch(BATCHES["mixed"], 32, 8, 128, 16, torch.bfloat16, seed=2)
    params = PARAMS["default"]
    dense_from = dense_start(batch.prompt_lens, params.n_last, MIN_PROMPT_LEN)
    plan = plan_query_blocks(batch.query_start_loc, batch.seq_lens, dense_from,
                             np.arange(len(batch.seq_lens)), params.block_size)
    prepared = dyn.prepare(plan, dense_from, FakeCommonMetadata(batch))
    estimated = dyn.estimate(batch.query, batch.key_cache, prepared, params, batch.scale)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ties = torch.randint(0, 4, estimated.shape, generator=gen, device="cuda").float()
    ties[::7] = 0.0
    # Thresholds no prefix of small-integer masses can equal (where a prefix sum equals tau, the
    # float64 rounding of the sum decides, here and in torch alike, on CPU and GPU differently).
    cases = {0: [(0.9, None), (1.0, 0.1), (1.0, 0.2), (0.5, 0.3)],
             1: [(0.537, None), (0.9013, None), (1.0, 0.1), (1.0, 0.2), (0.3141, 0.3)]}
    for which, mass in enumerate((estimated, ties)):
        for threshold, max_density in cases[which]:
            p = DynamicParams("xattention", 128, 8, threshold, max_density, 128)
            got = dyn.select(mass, prepared, p, keep_mask=True)
            ref = select_key_blocks(mass, prepared.q_block[:, None], threshold, max_density)
            assert torch.equal(got.keep, ref), (threshold, max_density)
            want = kept_blocks_from_mask(ref, prepared.q_block)
            assert torch.equal(got.n_kept, want.n_kept) and torch.equal(got.diag_kept, want.diag_kept)
            cols = torch.arange(got.kept.shape[-1], device="cuda")
            live = cols < want.n_kept[..., None]
            assert torch.equal(torch.where(live, got.kept, 0), torch.where(live, want.kept[..., :got.kept.shape[-1]], 0))


FP8_CASES = [  # params, overrides, fp8 query
    ("default", "", True),
    ("default", "est_fp8_dot=1", True),
    ("budget", "", False),
    ("default", "block_n=128,block_m=128", True),  # the Triton attention's other tiles
]


@pytest.mark.parametrize("params_name,overrides,fp8_query", FP8_CASES)
def test_dynamic_layer_fp8_cache_within_stock_fp8_error(params_name, overrides, fp8_query):
    """An fp8 (e4m3) cache written by vLLM (kv_cache_dtype "fp8", per-layer scales), with and
    without an fp8 query: the selection equals the float64 reference's on the dequantized cache
    (decisions clear of near ties), and the layer's error against float32 attention under that
    selection stays within FA3 fp8's own error on the same cache (dense, against float32)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from vllm_trianglemix.ops.fp8 import Fp8Scales

    params = PARAMS[params_name]
    heads, kv_heads, d = 32, 8, 128
    scales = Fp8Scales(torch.tensor(0.015, device="cuda") if fp8_query else None,
                       torch.tensor(0.02, device="cuda"), torch.tensor(0.03, device="cuda"))
    with _vllm_config():
        batch = flash_batch(BATCHES["mixed"], heads, kv_heads, d, 16, torch.bfloat16, seed=4,
                            fp8_scales=scales)
        out, plan, dense_from, keep = _run_layer(batch, params, heads, kv_heads, d, overrides=overrides,
                                                 scales=scales)
        q_lens = np.diff(batch.query_start_loc)
        fa = torch.empty(batch.query.shape, dtype=torch.bfloat16, device="cuda")
        q_fa = batch.query
        if not fp8_query:  # FA3 fp8 takes an fp8 query (vLLM quantizes it in the attention layer)
            q_fa = (batch.query.float() / 0.015).clamp(-448, 448).to(torch.float8_e4m3fn)
        shape2 = (len(batch.seq_lens), kv_heads)
        flash_attn_varlen_func(
            q=q_fa, k=batch.key_cache, v=batch.value_cache, out=fa,
            cu_seqlens_q=torch.tensor(batch.query_start_loc, dtype=torch.int32, device="cuda"),
            max_seqlen_q=int(q_lens.max()),
            seqused_k=torch.tensor(batch.seq_lens, dtype=torch.int32, device="cuda"),
            max_seqlen_k=int(batch.seq_lens.max()), softmax_scale=batch.scale, causal=True,
            block_table=batch.block_table, fa_version=3,
            q_descale=torch.full(shape2, 0.015, device="cuda"), k_descale=scales.k.expand(shape2),
            v_descale=scales.v.expand(shape2))
        torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "unwritten or NaN rows"
    compared, total = _compare_selection(batch, params, plan, keep)
    assert compared >= 0.25 * total, f"only {compared} of {total} decisions clear of near ties"
    err = relative_error(out, _masked_reference(batch, params, plan, dense_from, keep))
    every = torch.ones_like(keep)
    err_fa3 = relative_error(fa, _masked_reference(batch, params, plan, dense_from, every))
    print(f"XATTN fp8 {params_name} {overrides or 'defaults'} fp8 query {fp8_query}: layer vs float32 "
          f"on the dequantized cache {err:.2e}, FA3 fp8 (dense) {err_fa3:.2e}")
    assert err < 1.5e-2 and err <= err_fa3 + 5e-3, (err, err_fa3)
