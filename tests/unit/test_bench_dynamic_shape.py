"""`bench dynamic --model DIR --page N`: the attention shape comes from the model's config.json
(its text part for multimodal configs), and head size 256 sweeps tiles that fit it."""

import dataclasses
from pathlib import Path

import pytest

from vllm_trianglemix.ops.xattention_triton.config import XAttnKernelConfig
from vllm_trianglemix.tools.bench_dynamic import (
    ATTN_SWEEP,
    ATTN_SWEEP_256,
    EST_SWEEP,
    EST_SWEEP_256,
    Shape,
)

MODELS = Path(__file__).resolve().parents[2] / "benchmarks" / "models"


@pytest.mark.parametrize("model,expected", [
    ("qwen3.5-4b", Shape(16, 4, 256, 528)),  # multimodal config: the text_config's heads
    ("llama-3.1-8b-instruct", Shape(32, 8, 128, 528)),
])
def test_shape_from_a_models_config(model, expected):
    assert Shape.from_model(str(MODELS / model), 528) == expected


def test_default_shape_is_llama_3_1_8b_on_vllms_page():
    assert Shape() == Shape(32, 8, 128, 16)
    assert Shape.from_model(str(MODELS / "llama-3.1-8b-instruct")) == Shape()  # --model without --page


@pytest.mark.parametrize("head_dim,sweeps", [(128, (EST_SWEEP, ATTN_SWEEP)), (256, (EST_SWEEP_256, ATTN_SWEEP_256))])
def test_each_head_size_sweeps_its_defaults_first(head_dim, sweeps):
    """The first configuration of each sweep is the defaults for that head size on a GPU with TMA
    (where the sweep was chosen), so the sweep's choice can only be as fast as the defaults or faster."""
    assert Shape(head_dim=head_dim).sweeps() == sweeps
    default = XAttnKernelConfig.default_for(head_dim, tma=True)
    for sweep in sweeps:
        assert default.with_overrides(sweep[0]) == default, sweep[0]


def test_gpus_without_tma_keep_the_tiles_swept_for_loads_by_pointers():
    """Head size 256: the TMA tiles (256 key groups, 64-wide head steps) are not those swept for
    loads by pointers, which a GPU without TMA keeps; only the estimate's tiles differ. Head size
    128: the TMA sweep chose the tiles of the loads by pointers, the same either way."""
    tma, pointers = (XAttnKernelConfig.default_for(256, tma=t) for t in (True, False))
    assert pointers == pointers.with_overrides("est_block_n=128,est_num_stages=3,est_block_d=128") != tma
    est = [f.name for f in dataclasses.fields(XAttnKernelConfig) if f.name.startswith("est_")]
    assert dataclasses.replace(tma, **{f: getattr(pointers, f) for f in est}) == pointers
    assert XAttnKernelConfig.default_for(128, tma=True) == XAttnKernelConfig.default_for(128, tma=False)


@pytest.mark.parametrize("est_tma,tma", [("0", False), ("1", True)])
def test_est_tma_in_the_environment_chooses_the_tiles_swept_for_it(monkeypatch, est_tma, tma):
    """``est_tma=0`` (loads by pointers) takes the tiles swept for loads by pointers whatever the
    GPU, ``est_tma=1`` those swept for TMA; other fields of the same line still apply."""
    from vllm_trianglemix.settings import XATTN_CONFIG

    monkeypatch.setenv(XATTN_CONFIG, f"est_tma={est_tma},block_n=32")
    config = XAttnKernelConfig.from_env(256)
    expected = dataclasses.replace(XAttnKernelConfig.default_for(256, tma=tma), est_tma=int(est_tma), block_n=32)
    assert config == expected


@pytest.mark.parametrize("options,expected", [
    (["--model", "/no/such/model"], "--model: no such model folder or config.json: /no/such/model"),
    (["--page", "0"], "--page: a page holds at least one token; got 0"),
])
def test_bad_shape_options_are_one_line_before_the_gpu_is_looked_for(capsys, options, expected):
    from tests.unit.test_cli import one_error_line
    from vllm_trianglemix.tools.cli import main

    assert main(["bench", "dynamic", *options]) == 2
    assert expected in one_error_line(capsys, "bench dynamic")


@pytest.mark.parametrize("length,chunk", [(128000, 16384), (1000, 0), (40, 16)])
def test_estimate_flops_count_every_scored_pair(length, chunk):
    """The FLOPs `bench dynamic` puts next to the estimate's time: per query group, the key groups
    up to its own (causal) and up to its step's end (the plain GEMM), counted pair by pair."""
    from types import SimpleNamespace

    from vllm_trianglemix.tools.bench_dynamic import STRIDE, estimate_flops

    shape = Shape()
    chunk = chunk or length
    steps = [SimpleNamespace(p0=p0, n=min(chunk, length - p0)) for p0 in range(0, length, chunk)]
    causal = rect = 0
    for s in steps:
        last = -(-(s.p0 + s.n) // STRIDE)
        for g in range(s.p0 // STRIDE, last):
            causal += g + 1
            rect += last
    per = 2 * STRIDE * shape.head_dim * shape.heads
    assert estimate_flops(steps, shape) == (causal * per, rect * per)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_every_kernel_variant_is_a_configuration_the_op_takes(head_dim):
    """`bench dynamic --variants NAME`: each name's overrides build an op with both head sizes'
    defaults (a variant that names a field wrongly or a value the op refuses fails here, not on the GPU)."""
    from vllm_trianglemix.ops.xattention_triton import TritonXAttentionOp
    from vllm_trianglemix.tools.bench_dynamic import VARIANTS

    for name, overrides in VARIANTS.items():
        base = XAttnKernelConfig.default_for(head_dim, tma=True)
        config = base.with_overrides(overrides) if overrides else base
        op = TritonXAttentionOp(32, 8, head_dim, config=config)
        assert op.config == config, name
