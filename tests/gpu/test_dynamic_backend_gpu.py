"""Dynamic layers (TriangleMix + XAttention) inside vLLM on the GPU (skipped without a GPU).

The tiny Llama in float16 with the bundled ``tiny-llama-demo-dynamic`` map
(XAttention in layers 0-1, triangle layers 2-3), chunks of 256 tokens (on
query-block boundaries): long prompts match the float64 reference, which
derives every selection itself, and are far from the triangle-only reference;
short prompts stay bit for bit the stock backend's.
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


def test_long_prompts_match_the_reference(engines, model_dir):
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
