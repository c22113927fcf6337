"""Dynamic (XAttention) layers on a hybrid (the tiny Qwen3-Next) inside a real vLLM engine.

The map: XAttention on full-attention layer 3 (blocks of 128 rows, stride 8,
threshold 0.5: on these random weights it drops blocks, 0.9 keeps them all),
triangle on full-attention layer 7. The bfloat16 engine (vLLM's CPU Gated
DeltaNet runs only in bfloat16) is compared with Hugging Face's float32
Qwen3-Next whose full-attention layers apply the exact rules
(tests/reference_qwen3_next.py with tests/xattention_reference.py), with the
tolerance of test_hybrid_exact.py. bfloat16 moves the block masses far more
than float32 does, so the prompts (up to 400 tokens: few decisions per
prompt) were chosen with every selection decision of the reference at least
``MARGIN`` from flipping; on longer prompts a near tie flips in bfloat16.

One engine with a small KV cache covers chunked prefill (at most 128 tokens per
prefill per step: vLLM's "align" mode cuts chunks at its 64-token blocks, the
threshold keeps them on 128-row query blocks), several requests per step,
preemption (re-prefill of prompt and generated tokens, with hits on what is
still cached), and prefix-cache hits, which must end on a query-block boundary
and where vLLM keeps a linear-layer state: vLLM's hit (576 tokens, inside the
query block with sparse rows) is looked up again no longer than the query-block
boundary before it.
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
from tests.e2e_cpu.test_hybrid_exact import TOL
from tests.e2e_cpu.test_preemption import preemptions

pytestmark = pytest.mark.e2e

MARGIN = 2e-2
FAR = 4e-2
CACHE_BLOCKS = 22
"""64-token blocks (see test_hybrid_preemption.py): 1408 tokens, room for three
400-token prompts but not for their 200-token answers."""  # threshold 1.0 (every block kept) is at least this far from the selection
MAP = """\
n_init: 4
n_local: 64
n_last: 16
min_prompt_len: 128
triangle_layers: [7]
layer_overrides:
  7: {n_init: 32, n_local: 32}
dynamic_layers: [3]
dynamic: {block_size: 128, stride: 8, threshold: 0.5}
"""


@pytest.fixture(scope="module")
def dyn_map_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("maps") / "hybrid-dynamic.yaml"
    path.write_text(MAP)
    return str(path)


@pytest.fixture(scope="module")
def dyn_map(dyn_map_path):
    from vllm_trianglemix.config import load_layer_map

    return load_layer_map(dyn_map_path)


@pytest.fixture(scope="module")
def dyn_hybrid(hybrid_model_dir, dyn_map_path):
    llm = make_hybrid_llm(hybrid_model_dir, dyn_map_path, max_model_len=768,
                          max_num_batched_tokens=512, long_prefill_token_threshold=128,
                          kv_cache_memory_bytes=CACHE_BLOCKS * 2 * (256 << 10), max_num_seqs=3,
                          disable_log_stats=False)
    yield llm
    shutdown(llm)


def gen(llm, prompts, **sp):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, **sp), use_tqdm=False)


def checked(reference, prompt, layer_map, **kw):
    lp = reference.logprobs(prompt, layer_map, **kw)
    assert reference.margin > MARGIN, (len(prompt), reference.margin)
    return lp


def test_batched_chunked_prompts_match_the_exact_rules(dyn_hybrid, hybrid_reference, dyn_map):
    prompts = [random_prompt(400, seed=1006), random_prompt(400, seed=1014),
               random_prompt(360, seed=1002)]
    outs = gen(dyn_hybrid, prompts, max_tokens=1, prompt_logprobs=0)
    for p, out in zip(prompts, outs):
        got = prompt_logprobs(out, p)
        checked(hybrid_reference, p, dyn_map)
        ref = hybrid_reference.prompt_logprobs(p, dyn_map)
        assert (got - ref).abs().max().item() < TOL, len(p)
    from vllm_trianglemix.config import parse_layer_map

    keep_all = parse_layer_map({**dyn_map.raw, "dynamic": {**dyn_map.raw["dynamic"], "threshold": 1.0}}, "k")
    assert (hybrid_reference.prompt_logprobs(p, keep_all) - ref).abs().max().item() > FAR


def test_prefix_hits_end_on_query_block_boundaries_with_a_state(dyn_hybrid, hybrid_reference, dyn_map):
    p = random_prompt(360, seed=1000)
    first = gen(dyn_hybrid, [p], max_tokens=1, logprobs=5)[0]
    again = gen(dyn_hybrid, [p], max_tokens=1, logprobs=5)[0]
    # stock: 320 (the state vLLM keeps), inside query block [256, 384) whose rows up to
    # the dense start (344) are sparse: looked up again no longer than 256
    assert again.num_cached_tokens % 128 == 0 and again.num_cached_tokens <= 256
    ref = checked(hybrid_reference, p, dyn_map)[-1]
    for out in (first, again):
        got = first_token_logprobs(out)
        assert max(abs(v - ref[t].item()) for t, v in got.items()) < TOL


def test_preempted_requests_match_the_exact_rules(dyn_hybrid, hybrid_reference, dyn_map):
    prompts = [random_prompt(400, seed=s) for s in (1004, 1005, 1010)]
    before = preemptions(dyn_hybrid)
    outs = gen(dyn_hybrid, prompts, max_tokens=200, logprobs=3)
    assert preemptions(dyn_hybrid) > before, "the test must force preemption"
    for p, out in zip(prompts, outs):
        tokens = list(out.outputs[0].token_ids)
        assert len(tokens) == 200
        ref = checked(hybrid_reference, p + tokens[:-1], dyn_map, prompt_len=len(p))[len(p) - 1:]
        for step, lps in enumerate(out.outputs[0].logprobs):
            assert max(abs(v.logprob - ref[step, t].item()) for t, v in lps.items()) < TOL
