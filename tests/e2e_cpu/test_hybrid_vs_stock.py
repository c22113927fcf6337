"""The tiny hybrid (Qwen3-Next) under TriangleMix against vLLM's stock CPU backend.

* The stock bfloat16 engine is within TOL of the float32 reference: the
  tolerance of test_hybrid_exact.py is what bfloat16 costs, nothing more.
* A map whose triangle layers cannot differ from dense (a window longer than
  any prompt, no minimum length) serves what the stock backend serves, bit
  for bit (one request per call: see that test), and the same
  prefix-cache hits (its blocks carry no tag). Everything else in the model
  (Gated DeltaNet layers and their cached state, MoE, gated attention output,
  partial RoPE, QK-norm) runs as vLLM runs it.
"""

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.e2e_cpu.conftest import (
    make_hybrid_llm,
    prompt_logprobs,
    random_prompt,
    shutdown,
    write_map,
)
from tests.e2e_cpu.test_hybrid_exact import LENGTHS, TOL

pytestmark = pytest.mark.e2e

WIDE_MAP = """\
n_init: 4
n_local: 100000
n_last: 16
min_prompt_len: 0
triangle_layers: [3, 7]
"""


@pytest.fixture(scope="module")
def stock_hybrid(hybrid_model_dir):
    llm = make_hybrid_llm(hybrid_model_dir, None)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def wide_hybrid(hybrid_model_dir, tmp_path_factory):
    llm = make_hybrid_llm(hybrid_model_dir, write_map(tmp_path_factory, "wide.yaml", WIDE_MAP))
    yield llm
    shutdown(llm)


def run(llm, prompts, **sp):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, **sp), use_tqdm=False)


def as_plain(logprobs):
    return [{t: (lp.logprob, lp.rank) for t, lp in d.items()} if d else None for d in logprobs]


def test_stock_engine_is_within_tol_of_the_float32_reference(stock_hybrid, hybrid_reference):
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    for p, out in zip(prompts, run(stock_hybrid, prompts, max_tokens=1, prompt_logprobs=0)):
        got = prompt_logprobs(out, p)
        assert (got - hybrid_reference.prompt_logprobs(p, None)).abs().max().item() < TOL, len(p)


def test_map_that_cannot_differ_from_dense_serves_what_stock_serves(stock_hybrid, wide_hybrid):
    """Bit for bit: the same tokens, logprob values and ranks, prompt and decode.

    One request per ``generate`` call. Requests of one call reach the engine
    core process one by one, so how many of them the first steps hold depends
    on timing, and this bfloat16 hybrid is not batch-invariant (Gated DeltaNet
    chunks, MoE): two *stock* engines given the same three prompts in one call
    differed by one bfloat16 step (0.0078) in about half of the engines of a
    process, while one request at a time every stock and wide-map engine agreed
    exactly (2026-11-23). With this map the builder never routes a request to
    the triangle path (the first sparse row lies past every prompt), so its
    attention is the stock backend's, and so is everything else.
    """
    prompts = [random_prompt(n, seed=30 + n) for n in (50, 300, 1500)]
    sp = dict(max_tokens=8, logprobs=5, prompt_logprobs=5)
    for p in prompts:
        (a,), (b,) = run(wide_hybrid, [p], **sp), run(stock_hybrid, [p], **sp)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert as_plain(a.outputs[0].logprobs) == as_plain(b.outputs[0].logprobs)
        assert as_plain(a.prompt_logprobs) == as_plain(b.prompt_logprobs)


def _cache_scenarios(llm):
    """num_cached_tokens of the prefix-cache scenarios of test_hybrid_exact.py."""
    def hit(p, n=1):
        return run(llm, [p], max_tokens=n)[0]

    a = random_prompt(600, seed=700)
    hits = [hit(a).num_cached_tokens, hit(a).num_cached_tokens, hit(a[:590]).num_cached_tokens]
    doc = random_prompt(400, seed=701)
    hit(doc)
    hits.append(hit(doc + random_prompt(301, seed=702)[1:]).num_cached_tokens)
    turn1 = random_prompt(330, seed=703)
    answer = list(hit(turn1, 20).outputs[0].token_ids)
    hits.append(hit(turn1 + answer + random_prompt(201, seed=704)[1:]).num_cached_tokens)
    b = random_prompt(600, seed=705)
    hit(b[:100])
    hits.append(hit(b).num_cached_tokens)
    return hits


def test_prefix_cache_hits_are_the_stock_hits_when_no_row_is_sparse(stock_hybrid, wide_hybrid):
    stock = _cache_scenarios(stock_hybrid)
    assert stock == [0, 576, 576, 384, 320, 64]  # what vLLM caches for a hybrid ("align" mode)
    assert _cache_scenarios(wide_hybrid) == stock
