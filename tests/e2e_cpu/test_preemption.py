"""Preemption and recompute: a KV cache too small for all requests forces vLLM to
preempt and later re-prefill prompt + generated tokens. The prompt length
stays the original one, so the recomputed generated tokens are dense rows, as
they were while decoding, and every output equals the exact rule. This engine
also uses a different chunk size (64) from the others: the results do not
depend on it.
"""

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.e2e_cpu.conftest import make_llm, random_prompt, shutdown

pytestmark = pytest.mark.e2e

TOL = 2e-4


@pytest.fixture(scope="module")
def small_cache_llm(model_dir):
    # 4 layers x 2 kv heads x 64 dims x (K+V) x 4 bytes = 4 KiB per token: 40 blocks of 32.
    llm = make_llm(model_dir, "TRIANGLEMIX", max_model_len=1024, max_num_batched_tokens=64,
                   kv_cache_memory_bytes=40 * 32 * 4096, max_num_seqs=3, disable_log_stats=False)
    yield llm
    shutdown(llm)


def preemptions(llm) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preempted_requests_match_the_exact_rule(small_cache_llm, reference, layer_map):
    prompts = [random_prompt(n, seed=100 + n) for n in (500, 600, 700)]
    before = preemptions(small_cache_llm)
    outs = small_cache_llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                    SamplingParams(temperature=0, max_tokens=200, logprobs=3),
                                    use_tqdm=False)
    assert preemptions(small_cache_llm) > before, "the test must force preemption"
    for p, out in zip(prompts, outs):
        tokens = list(out.outputs[0].token_ids)
        ref = reference.logprobs(p + tokens[:-1], layer_map, prompt_len=len(p))[len(p) - 1:]
        for step, (tok, lps) in enumerate(zip(tokens, out.outputs[0].logprobs)):
            assert ref[step, tok].item() >= ref[step].max().item() - 1e-4
            assert max(abs(v.logprob - ref[step, t].item()) for t, v in lps.items()) < TOL
