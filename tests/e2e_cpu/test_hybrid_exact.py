"""TriangleMix on a hybrid (Qwen3-Next) inside a real vLLM engine equals the exact rule.

The tiny hybrid has 8 layers: Gated DeltaNet layers 0-2 and 4-6, full attention
at 3 and 7, MoE everywhere, gated attention output, partial RoPE and QK-norm.
The map (conftest) makes both full-attention layers triangle layers, with two
parameter sets. The engine (bfloat16, the only dtype vLLM's CPU Gated DeltaNet
runs; 64-token blocks; prefix caching on, so vLLM caches the linear layers'
state in its "align" mode and cuts prefill chunks at block boundaries; a token
budget of 160 per step, so chunks of several requests and decodes share steps) is compared with
Hugging Face's Qwen3-Next in float32 with the exact mask on the full-attention
layers (tests/reference_qwen3_next.py).

Tolerances, measured on this model: the stock bfloat16 engine lands at most
0.009 from the float32 dense reference (test_hybrid_vs_stock.py holds it to
TOL), the TriangleMix engine at most 0.009 from the float32 triangle
reference; the triangle and dense references are at least 0.096 apart on
every prompt with sparse rows (0.17 at 1500 tokens). TOL = 0.02 and FAR = 0.06
keep both margins: a wrong mask, prompt length or chunk boundary fails.
"""

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.e2e_cpu.conftest import (
    first_token_logprobs,
    make_hybrid_llm,
    prompt_logprobs,
    random_prompt,
    shutdown,
)

pytestmark = pytest.mark.e2e

TOL = 2e-2  # bfloat16 engine vs float32 reference, max abs over logprobs
FAR = 6e-2  # the dense reference is at least this far on prompts with sparse rows

LENGTHS = [50, 127, 128, 202, 293, 701, 1500]


@pytest.fixture(scope="module")
def hybrid_llm(hybrid_model_dir, hybrid_map_path):
    llm = make_hybrid_llm(hybrid_model_dir, hybrid_map_path)
    yield llm
    shutdown(llm)


def gen(llm, prompts, **sp):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, **sp), use_tqdm=False)


def test_prompts_batched_together_match_the_exact_rule(hybrid_llm, hybrid_reference, hybrid_map):
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    outs = gen(hybrid_llm, prompts, max_tokens=1, prompt_logprobs=0)
    for p, out in zip(prompts, outs):
        got = prompt_logprobs(out, p)
        ref_tri = hybrid_reference.prompt_logprobs(p, hybrid_map)
        ref_dense = hybrid_reference.prompt_logprobs(p, None)
        assert (got - ref_tri).abs().max().item() < TOL, len(p)
        if len(p) >= hybrid_map.min_prompt_len:
            assert (ref_tri - ref_dense).abs().max().item() > FAR, len(p)
            assert (got - ref_dense).abs().max().item() > FAR, len(p)


def test_result_does_not_depend_on_the_batch(hybrid_llm):
    p = random_prompt(701, seed=701)
    alone = prompt_logprobs(gen(hybrid_llm, [p], max_tokens=1, prompt_logprobs=0)[0], p)
    others = [random_prompt(n, seed=n + 1) for n in (90, 333, 1000)]
    batched = prompt_logprobs(gen(hybrid_llm, others + [p], max_tokens=1, prompt_logprobs=0)[-1], p)
    # Same chunks, other neighbours: bfloat16 kernels may round a little differently.
    assert (alone - batched).abs().max().item() < TOL / 2


def test_decode_rows_are_dense(hybrid_llm, hybrid_reference, hybrid_map):
    p = random_prompt(300, seed=3)
    out = gen(hybrid_llm, [p], max_tokens=6, logprobs=5)[0]
    tokens = list(out.outputs[0].token_ids)
    ref = hybrid_reference.logprobs(p + tokens[:-1], hybrid_map, prompt_len=len(p))[len(p) - 1:]
    for step, lps in enumerate(out.outputs[0].logprobs):
        assert max(abs(v.logprob - ref[step, t].item()) for t, v in lps.items()) < TOL


# -- Prefix caching. vLLM caches a hybrid's attention K/V per block and the
# -- linear layers' state at block boundaries ("align" mode: in practice at the
# -- last block boundary of each prompt); a hit needs both, and both are found
# -- through the same chained block hashes, which carry the plugin's tag. So a
# -- linear-layer state is reused only when every row before it was computed
# -- the way this request computes it. The stock backend's hits in the same
# -- scenarios are given for comparison (test_hybrid_vs_stock.py checks that
# -- a map without sparse rows gets exactly the stock hits). --

def cached_run(llm, prompt, max_tokens=1):
    return gen(llm, [prompt], max_tokens=max_tokens, logprobs=5)[0]


def assert_first_token_matches(out, ref_last):
    got = first_token_logprobs(out)
    assert max(abs(v - ref_last[t].item()) for t, v in got.items()) < TOL


def test_repeated_prompt_hits_the_cache_exactly(hybrid_llm, hybrid_reference, hybrid_map):
    p = random_prompt(600, seed=600)
    first, second = cached_run(hybrid_llm, p), cached_run(hybrid_llm, p)
    assert second.num_cached_tokens == 576  # the last block boundary before the last token (stock: 576)
    ref = hybrid_reference.logprobs(p, hybrid_map)[-1]
    assert_first_token_matches(first, ref)
    assert_first_token_matches(second, ref)


def test_shared_document_hits_exactly(hybrid_llm, hybrid_reference, hybrid_map):
    """A document sent alone, then with a question: its rows up to the cached
    boundary (384) are sparse rows in both requests."""
    doc = random_prompt(400, seed=601)
    question = doc + random_prompt(301, seed=602)[1:]
    cached_run(hybrid_llm, doc)
    out = cached_run(hybrid_llm, question)
    assert out.num_cached_tokens == 384  # stock: 384
    assert_first_token_matches(out, hybrid_reference.logprobs(question, hybrid_map)[-1])


def test_next_turn_does_not_reuse_state_computed_with_dense_rows(
        hybrid_llm, hybrid_reference, hybrid_map):
    """Turn 1 (330 tokens) cached K/V and linear state at 320, with rows 314-319
    computed dense (its last n_last rows). In turn 2 those rows are sparse, so
    that state is not what a fresh prefill computes: no hit (stock: 320)."""
    turn1 = random_prompt(330, seed=603)
    answer = list(cached_run(hybrid_llm, turn1, max_tokens=20).outputs[0].token_ids)
    turn2 = turn1 + answer + random_prompt(201, seed=604)[1:]
    out = cached_run(hybrid_llm, turn2)
    assert out.num_cached_tokens == 0
    assert_first_token_matches(out, hybrid_reference.logprobs(turn2, hybrid_map)[-1])


def test_shorter_prompt_does_not_reuse_state_with_other_sparse_rows(
        hybrid_llm, hybrid_reference, hybrid_map):
    """A 600-token prompt cached its state at 576 with rows 512-575 sparse; the
    same prompt cut to 590 tokens computes rows 574-575 dense: no hit (stock: 576)."""
    a = random_prompt(600, seed=605)
    cached_run(hybrid_llm, a)
    out = cached_run(hybrid_llm, a[:590])
    assert out.num_cached_tokens == 0
    assert_first_token_matches(out, hybrid_reference.logprobs(a[:590], hybrid_map)[-1])


def test_long_prompt_reuses_what_a_short_one_computed_dense(
        hybrid_llm, hybrid_reference, hybrid_map):
    """A short prompt (dense everywhere) caches its state at 64; rows below 64
    are dense in every triangle layer of the map (n_init + n_local >= 64), so a
    long prompt that starts the same way reuses it (stock: 64)."""
    a = random_prompt(600, seed=606)
    cached_run(hybrid_llm, a[:100])
    out = cached_run(hybrid_llm, a)
    assert out.num_cached_tokens == 64
    assert_first_token_matches(out, hybrid_reference.logprobs(a, hybrid_map)[-1])
