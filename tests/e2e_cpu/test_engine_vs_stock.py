"""TriangleMix engine against vLLM's stock CPU backend, same model and settings.

Prompts shorter than min_prompt_len run the stock backend in every layer:
tokens and logprobs are identical. A short request batched with a long one
still runs stock (on its own sub-batch). Long prompts differ from stock by far
more than rounding, exactly where the rule changes the attention.
"""

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.e2e_cpu.conftest import prompt_logprobs, random_prompt

pytestmark = pytest.mark.e2e


def run(llm, prompts, **sp):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, **sp), use_tqdm=False)


def as_plain(logprobs):
    return [{t: (lp.logprob, lp.rank) for t, lp in d.items()} if d else None for d in logprobs]


def test_short_prompts_are_bit_identical_to_stock(tri_llm, stock_llm):
    prompts = [random_prompt(n, seed=10 + n) for n in (20, 64, 100, 127)]
    sp = dict(max_tokens=12, logprobs=5, prompt_logprobs=5)
    for a, b in zip(run(tri_llm, prompts, **sp), run(stock_llm, prompts, **sp)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert as_plain(a.outputs[0].logprobs) == as_plain(b.outputs[0].logprobs)
        assert as_plain(a.prompt_logprobs) == as_plain(b.prompt_logprobs)


def test_short_request_batched_with_a_long_one_stays_stock(tri_llm, stock_llm):
    short, long_ = random_prompt(100, seed=21), random_prompt(900, seed=22)
    sp = dict(max_tokens=8, logprobs=5, prompt_logprobs=0)
    a = run(tri_llm, [long_, short], **sp)[1]
    b = run(stock_llm, [long_, short], **sp)[1]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert (prompt_logprobs(a, short) - prompt_logprobs(b, short)).abs().max().item() < 1e-5


def test_long_prompts_differ_from_stock_only_where_the_rule_does(tri_llm, stock_llm, layer_map):
    p = random_prompt(800, seed=23)
    a = prompt_logprobs(run(tri_llm, [p], max_tokens=1, prompt_logprobs=0)[0], p)
    b = prompt_logprobs(run(stock_llm, [p], max_tokens=1, prompt_logprobs=0)[0], p)
    first_sparse = min(q.n_init + q.n_local for q in layer_map.layers.values())
    # logprob i predicts token i+1 from rows 0..i: rows before the first sparse row are dense rows
    assert (a[:first_sparse] - b[:first_sparse]).abs().max().item() < 1e-4
    assert (a - b).abs().max().item() > 1e-2
