"""Dynamic layers (TriangleMix + XAttention) inside vLLM on the GPU (skipped without a GPU).

The tiny Llama in float16 with the bundled ``tiny-llama-demo-dynamic`` map
(XAttention in layers 0-1, triangle layers 2-3), chunks of 256 tokens (on
query-block boundaries): long prompts match the float64 reference, which
derives every selection itself, and are far from the triangle-only reference;
short prompts stay bit for bit the stock backend's.
"""

import os

import pytest
import torch

from tests.gpu import test_backend_gpu as backend_gpu
from tests.gpu.test_backend_gpu import model_dir  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


@pytest.fixture(scope="module")
def engines(model_dir):  # noqa: F811
    stock = backend_gpu._engine(model_dir, None)
    dyn = backend_gpu._engine(model_dir, "TRIANGLEMIX",
                              additional_config={"trianglemix_config": "tiny-llama-demo-dynamic"})
    try:
        yield stock, dyn
    finally:
        for llm in (dyn, stock):
            llm.llm_engine.engine_core.shutdown()


def test_short_prompts_are_stock_bit_for_bit(engines):
    backend_gpu.test_short_prompts_are_stock_bit_for_bit(engines)


def test_long_prompts_match_the_reference(engines, model_dir):  # noqa: F811
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tests.reference_llama import ReferenceLlama
    from vllm_trianglemix.config import resolve_layer_map

    _, dyn = engines
    ref = ReferenceLlama(model_dir)
    dyn_map = resolve_layer_map({"trianglemix_config": "tiny-llama-demo-dynamic"}, "any")
    tri_map = resolve_layer_map({"trianglemix_config": "tiny-llama-demo"}, "any")
    ids = [backend_gpu._prompt(n, n) for n in (704, 1536)]
    outs = dyn.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                        use_tqdm=False)
    for p, out in zip(ids, outs):
        got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], p[1:])],
                           dtype=torch.float64)
        err_dyn = (got - ref.prompt_logprobs(p, dyn_map)).abs().mean().item()
        err_tri = (got - ref.prompt_logprobs(p, tri_map)).abs().mean().item()
        assert err_dyn < 5e-3, err_dyn
        assert err_tri > 3 * err_dyn, (err_dyn, err_tri)
