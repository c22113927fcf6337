"""Dynamic layers (TriangleMix + XAttention) inside vLLM on the GPU (skipped without a GPU).

The tiny Llama in float16 with the bundled ``tiny-llama-demo-dynamic`` map
(XAttention in layers 0-1, triangle layers 2-3), chunks of 256 tokens (on
query-block boundaries): long prompts match the float64 reference, which
derives every selection itself, and are far from the triangle-only reference;
short prompts stay bit for bit the stock backend's. The same checks with
FlashInfer as the stock backend (``trianglemix_stock_backend: FLASHINFER``,
against stock FlashInfer) and with a dynamic-only map (an fp8 KV cache: test_breadth_gpu.py);
the kernels compile while the engine starts, not on the first long prompt.
"""

import pytest
import torch

from tests.gpu import test_backend_gpu as backend_gpu
from tests.gpu.conftest import engine, shutdown

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def engines(model_dir, stock_engine):
    dyn = engine(model_dir, "TRIANGLEMIX",
                 additional_config={"trianglemix_config": "tiny-llama-demo-dynamic"})
    yield stock_engine, dyn
    shutdown(dyn)


def test_short_prompts_are_stock_bit_for_bit(engines):
    backend_gpu.test_short_prompts_are_stock_bit_for_bit(engines)


def _long_prompts_match(dyn, model_dir, dyn_map, other_map, tol=5e-3, **fp8):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tests.reference_llama import ReferenceLlama

    ref = ReferenceLlama(model_dir, device="cuda")
    ids = [backend_gpu._prompt(n, n) for n in (704, 1536)]
    outs = dyn.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                        use_tqdm=False)
    for p, out in zip(ids, outs):
        got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], p[1:])],
                           dtype=torch.float64)
        err_dyn = (got - ref.prompt_logprobs(p, dyn_map, **fp8)).abs().mean().item()
        err_other = (got - ref.prompt_logprobs(p, other_map, **fp8)).abs().mean().item()
        assert err_dyn < tol, err_dyn
        assert err_other > 3 * err_dyn, (err_dyn, err_other)


def _maps():
    from vllm_trianglemix.config import parse_layer_map, resolve_layer_map

    dyn_map = resolve_layer_map({"trianglemix_config": "tiny-llama-demo-dynamic"}, "any")
    tri_map = resolve_layer_map({"trianglemix_config": "tiny-llama-demo"}, "any")
    only = {k: v for k, v in dyn_map.raw.items() if k != "triangle_layers"}
    only_map = parse_layer_map({**only, "dynamic_layers": "0-3"}, "dynamic-only")
    return dyn_map, tri_map, only_map


def test_long_prompts_match_the_reference(engines, model_dir):
    dyn_map, tri_map, _ = _maps()
    _long_prompts_match(engines[1], model_dir, dyn_map, tri_map)


FLASHINFER = {"trianglemix_stock_backend": "FLASHINFER"}


@pytest.fixture(scope="module")
def flashinfer_engines(model_dir):
    stock = engine(model_dir, "FLASHINFER")
    dyn = engine(model_dir, "TRIANGLEMIX",
                 additional_config={"trianglemix_config": "tiny-llama-demo-dynamic", **FLASHINFER})
    try:
        yield stock, dyn
    finally:
        for llm in (dyn, stock):
            shutdown(llm)


def test_flashinfer_short_prompts_are_stock_bit_for_bit(flashinfer_engines):
    backend_gpu.test_short_prompts_are_stock_bit_for_bit(flashinfer_engines)


def test_flashinfer_long_prompts_match_the_reference(flashinfer_engines, model_dir):
    dyn_map, tri_map, _ = _maps()
    _long_prompts_match(flashinfer_engines[1], model_dir, dyn_map, tri_map)


def test_dynamic_only_map_matches_the_reference(model_dir, tmp_path):
    import yaml

    dyn_map, _, only_map = _maps()
    path = tmp_path / "dynamic-only.yaml"
    path.write_text(yaml.safe_dump(only_map.raw))
    llm = engine(model_dir, "TRIANGLEMIX", additional_config={"trianglemix_config": str(path)})
    try:
        _long_prompts_match(llm, model_dir, only_map, dyn_map)
    finally:
        shutdown(llm)


def test_kernels_compile_before_serving(model_dir, capfd):
    """The plugin's Triton kernels compile while the engine starts (warmup.py), for the map's
    parameters, dtypes and the longest prompt: the first long prompts afterwards, of lengths
    the warm-up never saw, make vLLM's JIT monitor say nothing about them."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(model_dir, "TRIANGLEMIX", enforce_eager=False,
                 additional_config={"trianglemix_config": "tiny-llama-demo-dynamic"})
    try:
        started = capfd.readouterr()
        prompts = [backend_gpu._prompt(n, n) for n in (1000, 2900, 4000)]
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                     SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
        served = capfd.readouterr()
    finally:
        shutdown(llm)
    log = started.out + started.err
    assert "TriangleMix: kernels compiled for" in log, "the warm-up did not run"
    during = [line for line in (served.out + served.err).splitlines()
              if "JIT compilation during inference" in line]
    print("BREADTH: JIT lines while serving:", len(during))
    assert not during, during
