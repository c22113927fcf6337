"""Preemption on the hybrid: a KV cache too small for all requests makes vLLM
preempt and later re-prefill prompt + generated tokens, attention K/V and
linear-layer state alike. The prompt length stays the original one, so the
recomputed generated tokens are dense rows, as they were while decoding, and
every output equals the exact rule.

A token budget of 128 per step: vLLM's "align" mode cuts a hybrid's prefill
chunks at block boundaries, so a budget below two blocks would let a waiting
prompt in only when no request decodes, and nothing would be preempted.
"""

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.e2e_cpu.conftest import make_hybrid_llm, random_prompt, shutdown
from tests.e2e_cpu.test_hybrid_exact import TOL
from tests.e2e_cpu.test_preemption import preemptions

pytestmark = pytest.mark.e2e

# One 64-token block: 4 kv heads x 256 dims x (K+V) x 2 bytes x 64 = 256 KiB per
# layer, and vLLM lays 2 layers (one of each KV-cache group) over each block: 32 blocks,
# about 1400 tokens: two of the prompts fit, their answers do not.
BLOCKS = 32


@pytest.fixture(scope="module")
def small_cache_hybrid(hybrid_model_dir, hybrid_map_path):
    llm = make_hybrid_llm(hybrid_model_dir, hybrid_map_path, max_model_len=1024,
                          max_num_batched_tokens=128, kv_cache_memory_bytes=BLOCKS * 2 * (256 << 10),
                          max_num_seqs=3, disable_log_stats=False)
    yield llm
    shutdown(llm)


def test_preempted_requests_match_the_exact_rule(small_cache_hybrid, hybrid_reference, hybrid_map):
    prompts = [random_prompt(n, seed=100 + n) for n in (500, 600, 700)]
    before = preemptions(small_cache_hybrid)
    outs = small_cache_hybrid.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                       SamplingParams(temperature=0, max_tokens=200, logprobs=3),
                                       use_tqdm=False)
    assert preemptions(small_cache_hybrid) > before, "the test must force preemption"
    for p, out in zip(prompts, outs):
        tokens = list(out.outputs[0].token_ids)
        assert len(tokens) == 200
        ref = hybrid_reference.logprobs(p + tokens[:-1], hybrid_map, prompt_len=len(p))[len(p) - 1:]
        for step, lps in enumerate(out.outputs[0].logprobs):
            assert max(abs(v.logprob - ref[step, t].item()) for t, v in lps.items()) < TOL
