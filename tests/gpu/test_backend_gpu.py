"""The whole backend inside vLLM on the GPU (skipped without a GPU and vLLM).

Two engines of the tiny random Llama (head dim 64, float16) live side by side,
one stock (FlashAttention), one TriangleMix:

* prompts shorter than ``min_prompt_len`` run the stock backend in every
  layer: greedy tokens and their logprobs are identical, bit for bit;
* long prompts, chunked by a small token budget, match a float64 reference
  forward with the exact mask per layer and are far from the dense reference;
* decode after a triangle prefill matches the reference with dense decode rows.
"""

import random

import pytest
import torch

from tests.gpu.conftest import engine, shutdown

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def engines(model_dir, stock_engine):
    tri = engine(model_dir, "TRIANGLEMIX")
    yield stock_engine, tri
    shutdown(tri)


def _prompt(n, seed):
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 1003) for _ in range(n - 1)]


def test_short_prompts_are_stock_bit_for_bit(engines):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    stock, tri = engines
    prompts = [TokensPrompt(prompt_token_ids=_prompt(n, n)) for n in (40, 100, 127)]
    sp = SamplingParams(max_tokens=24, temperature=0, logprobs=5)
    a = stock.generate(prompts, sp, use_tqdm=False)
    b = tri.generate(prompts, sp, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert {t: l.logprob for t, l in lx.items()} == {t: l.logprob for t, l in ly.items()}


def test_long_prompts_match_exact_reference(engines, model_dir):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tests.reference_llama import ReferenceLlama
    from vllm_trianglemix.config import find_bundled_map

    _, tri = engines
    ref = ReferenceLlama(model_dir, device="cuda")
    layer_map = find_bundled_map("tiny-llama-trianglemix-demo")
    ids = [_prompt(n, n) for n in (700, 1501)]
    outs = tri.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                        SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0, logprobs=1),
                        use_tqdm=False)
    for p, out in zip(ids, outs):
        got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], p[1:])],
                           dtype=torch.float64)
        err_tri = (got - ref.prompt_logprobs(p, layer_map)).abs().mean().item()
        err_dense = (got - ref.prompt_logprobs(p, None)).abs().mean().item()
        assert err_tri < 5e-3, err_tri
        assert err_dense > 4 * err_tri, (err_tri, err_dense)
        # decode: generated tokens are dense rows on top of the triangle prefill
        # (greedy in fp16 may pick a near-tie differently: compare logprobs)
        gen = list(out.outputs[0].token_ids)
        lp = ref.logprobs(p + gen[:-1], layer_map, prompt_len=len(p))[len(p) - 1 :]
        chosen = lp.gather(1, torch.tensor(gen)[:, None])[:, 0]
        assert (lp.max(-1).values - chosen).max().item() < 0.05
        vllm_lp = torch.tensor([list(d.values())[0].logprob for d in out.outputs[0].logprobs],
                               dtype=torch.float64)
        assert (vllm_lp - chosen).abs().max().item() < 2e-2
