"""TriangleMix inside a real vLLM engine equals the exact rule, whatever vLLM does.

The engine (conftest: chunks of 96 tokens, 32-token blocks, prefix caching)
is compared with an independent float64 forward of the same weights that
applies the exact mask per layer. float32 vLLM lands about 1e-6 from it; a
dense mask lands about 1e-2 away, so every comparison below would fail if the
mask, the prompt length or the chunking were wrong.
"""

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.e2e_cpu.conftest import BLOCK, first_token_logprobs, prompt_logprobs, random_prompt

pytestmark = pytest.mark.e2e

TOL = 2e-4  # float32 engine vs float64 reference, max abs over logprobs
FAR = 1e-2  # a dense mask is at least this far on prompts that have sparse rows


def gen(llm, prompts, **sp):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, **sp), use_tqdm=False)


def assert_first_token_matches(out, ref_logprobs_last):
    got = first_token_logprobs(out)
    assert max(abs(v - ref_logprobs_last[t].item()) for t, v in got.items()) < TOL


# Lengths: below n_init + n_local (68), just below / at min_prompt_len (128),
# and prompts whose chunk boundaries (multiples of 96 when alone) fall inside
# the last 16 rows: 202 (dense from 186, boundary 192), 293 (277, 288).
LENGTHS = [50, 127, 128, 202, 293, 701, 1500]


def test_prompts_batched_together_match_the_exact_rule(tri_llm, reference, layer_map):
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    outs = gen(tri_llm, prompts, max_tokens=1, prompt_logprobs=0)
    for p, out in zip(prompts, outs):
        got = prompt_logprobs(out, p)
        ref_tri = reference.prompt_logprobs(p, layer_map)
        ref_dense = reference.prompt_logprobs(p, None)
        assert (got - ref_tri).abs().max().item() < TOL, len(p)
        if len(p) >= layer_map.min_prompt_len:
            assert (got - ref_dense).abs().max().item() > FAR, len(p)
        else:
            assert (got - ref_dense).abs().max().item() < TOL, len(p)


def test_result_does_not_depend_on_the_batch(tri_llm):
    p = random_prompt(701, seed=701)
    alone = prompt_logprobs(gen(tri_llm, [p], max_tokens=1, prompt_logprobs=0)[0], p)
    others = [random_prompt(n, seed=n + 1) for n in (90, 333, 1000)]
    batched = prompt_logprobs(gen(tri_llm, others + [p], max_tokens=1, prompt_logprobs=0)[-1], p)
    assert (alone - batched).abs().max().item() < 1e-5


def test_decode_rows_are_dense(tri_llm, reference, layer_map):
    """Generated tokens are rows past the prompt: dense, on top of the triangle prefill."""
    p = random_prompt(300, seed=3)
    out = gen(tri_llm, [p], max_tokens=6, logprobs=5)[0]
    tokens = list(out.outputs[0].token_ids)
    ref = reference.logprobs(p + tokens[:-1], layer_map, prompt_len=len(p))[len(p) - 1:]
    for step, (tok, lps) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        assert ref[step, tok].item() >= ref[step].max().item() - 1e-4  # greedy under the rule
        assert max(abs(v.logprob - ref[step, t].item()) for t, v in lps.items()) < TOL


# -- Prefix caching (cached blocks are reused only when computed the same way) --

def cached_run(llm, prompt):
    return gen(llm, [prompt], max_tokens=1, logprobs=5)[0]


def test_repeated_prompt_hits_the_cache_exactly(tri_llm, reference, layer_map):
    p = random_prompt(600, seed=600)
    first, second = cached_run(tri_llm, p), cached_run(tri_llm, p)
    assert second.num_cached_tokens == (len(p) - 1) // BLOCK * BLOCK  # every full block but the last token's
    ref = reference.logprobs(p, layer_map)[-1]
    assert_first_token_matches(first, ref)
    assert_first_token_matches(second, ref)


def test_shared_prefix_hits_exactly(tri_llm, reference, layer_map):
    a = random_prompt(600, seed=601)
    b = a[:400] + random_prompt(301, seed=602)[1:]
    cached_run(tri_llm, a)
    out = cached_run(tri_llm, b)
    assert out.num_cached_tokens == 384  # the full blocks of the shared 400 tokens
    assert_first_token_matches(out, reference.logprobs(b, layer_map)[-1])


def test_next_turn_recomputes_rows_that_were_dense(tri_llm, reference, layer_map):
    """Turn 1's last n_last rows and answer were dense rows; in turn 2 they are
    triangle rows, so the cache hit stops before them and turn 2 equals a fresh prefill."""
    turn1 = random_prompt(300, seed=603)
    answer = list(gen(tri_llm, [turn1], max_tokens=20)[0].outputs[0].token_ids)
    turn2 = turn1 + answer + random_prompt(201, seed=604)[1:]
    out = cached_run(tri_llm, turn2)
    # turn 1 computed rows 284.. dense; block [256, 288) holds 28 sparse rows in
    # turn 1 but 32 in turn 2, so the hit is the 8 blocks before it.
    assert out.num_cached_tokens == 256
    assert_first_token_matches(out, reference.logprobs(turn2, layer_map)[-1])


def test_short_prompt_reuses_only_dense_blocks(tri_llm, reference, layer_map):
    """A short prompt is dense everywhere; it must not reuse blocks that a long
    prompt computed with sparse rows (rows >= n_init + n_local = 68)."""
    a = random_prompt(600, seed=605)
    cached_run(tri_llm, a)
    s = a[:100]
    out = cached_run(tri_llm, s)
    assert out.num_cached_tokens == 64  # blocks [0, 64): rows the rule leaves dense
    assert_first_token_matches(out, reference.logprobs(s, None)[-1])

