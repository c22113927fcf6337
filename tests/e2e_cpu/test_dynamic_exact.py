"""Dynamic layers (TriangleMix + XAttention) inside real vLLM engines, against the
independent float64 reference.

The tiny Llama runs the bundled ``tiny-llama-demo-dynamic`` map: triangle
layers 2-3 as in the demo map, XAttention in layers 0-1 (blocks of 64 rows,
stride 8, threshold 0.9). The reference (tests/reference_llama.py with
tests/xattention_reference.py) derives every selection itself in float64 and
reports how close each decision came to flipping; the prompts below were
chosen with every margin above ``MARGIN``, so the float32 engine and the
float64 reference must make the same selections, and the logprobs agree to
``TOL``. The dynamic layers change the result by far more than that (``FAR``),
so a wrong selection fails.

Chunk boundaries: on query-block boundaries (chunk sizes 64 and 256 and prompt
lengths that keep the splits there) results do not depend on the chunking; a
chunk size of 96 cuts query blocks, and the engine then equals the reference
told where the steps begin (the documented behaviour). A dynamic-only map (no
triangle layer: XAttention in all four layers) is checked the same way.
"""

from contextlib import contextmanager

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.e2e_cpu.conftest import (
    BLOCK,
    first_token_logprobs,
    make_llm,
    prompt_logprobs,
    random_prompt,
    shutdown,
)
from vllm_trianglemix.config import ADDITIONAL_CONFIG_KEY, parse_layer_map, resolve_layer_map

pytestmark = pytest.mark.e2e

TOL = 2e-4
FAR = 1e-2
MARGIN = 1e-5  # selection decisions of the chosen prompts are at least this far from flipping;
# the float32 block masses of the engine are within 1e-6 of float64 ones (test_xattention_mass.py)
MAP_NAME = "tiny-llama-demo-dynamic"


@pytest.fixture(scope="module")
def dyn_map():
    return resolve_layer_map({ADDITIONAL_CONFIG_KEY: MAP_NAME}, "any")


@pytest.fixture(scope="module")
def tri_map():
    return resolve_layer_map({ADDITIONAL_CONFIG_KEY: "tiny-llama-demo"}, "any")


@contextmanager
def engine(model_dir, map_ref=MAP_NAME, **overrides):
    llm = make_llm(model_dir, "TRIANGLEMIX", additional_config={ADDITIONAL_CONFIG_KEY: map_ref},
                   **overrides)
    try:
        yield llm
    finally:
        shutdown(llm)


def gen(llm, prompts, **sp):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, **sp), use_tqdm=False)


def checked_reference(reference, prompt, layer_map, chunk_starts=()):
    lp = reference.prompt_logprobs(prompt, layer_map, chunk_starts=chunk_starts)
    assert reference.margin > MARGIN, (len(prompt), reference.margin)
    return lp


# Lengths: multiples of 64 (so batched splits stay on query-block boundaries), and odd ones
# that go alone or last in a batch; 127/128 straddle min_prompt_len.
ALONE = [701, 1500]
BATCH = [640, 384, 203]


@pytest.fixture(scope="module")
def dyn64(model_dir):
    with engine(model_dir, max_num_batched_tokens=64) as llm:  # prefix caching on (conftest)
        yield llm


def test_chunk_sizes_give_the_same_logprobs_and_match_the_reference(model_dir, dyn64, reference, dyn_map,
                                                                    tri_map):
    """Chunks of 64 tokens (the module's engine; these prompts are in no cache) and of 256."""
    prompts = [random_prompt(n, seed=n) for n in ALONE]
    results = {64: [prompt_logprobs(gen(dyn64, [p], max_tokens=1, prompt_logprobs=0)[0], p)
                    for p in prompts]}
    with engine(model_dir, max_num_batched_tokens=256, enable_prefix_caching=False) as llm:
        results[256] = [prompt_logprobs(gen(llm, [p], max_tokens=1, prompt_logprobs=0)[0], p)
                        for p in prompts]
    for i, p in enumerate(prompts):
        ref = checked_reference(reference, p, dyn_map)
        assert (ref - reference.prompt_logprobs(p, tri_map)).abs().max().item() > FAR, len(p)
        assert (results[256][i] - results[64][i]).abs().max().item() < 1e-5, len(p)
        assert (results[64][i] - ref).abs().max().item() < TOL, len(p)


def test_batched_requests_match_the_reference(dyn64, reference, dyn_map):
    prompts = [random_prompt(n, seed=n + 7) for n in BATCH] + [random_prompt(100, seed=3)]
    outs = gen(dyn64, prompts, max_tokens=1, prompt_logprobs=0)
    for p, out in zip(prompts, outs):
        got = prompt_logprobs(out, p)
        assert (got - checked_reference(reference, p, dyn_map)).abs().max().item() < TOL, len(p)


def assert_first_token_matches(out, ref_last):
    got = first_token_logprobs(out)
    assert max(abs(v - ref_last[t].item()) for t, v in got.items()) < TOL


def test_prefix_hits_end_on_query_block_boundaries_and_are_exact(dyn64, reference, dyn_map):
    a = random_prompt(700, seed=801)
    first = gen(dyn64, [a], max_tokens=1, logprobs=5)[0]
    again = gen(dyn64, [a], max_tokens=1, logprobs=5)[0]
    # Stock would reuse 672 tokens (21 blocks of 32); 672 is inside query block [640, 704).
    assert again.num_cached_tokens == 640
    ref = reference.logprobs(a, dyn_map)[-1]
    assert reference.margin > MARGIN
    assert_first_token_matches(first, ref)
    assert_first_token_matches(again, ref)
    b = a[:420] + random_prompt(300, seed=802)[1:]  # shares 420 tokens: blocks up to 416, cut to 384
    out = gen(dyn64, [b], max_tokens=1, logprobs=5)[0]
    assert out.num_cached_tokens == 384
    ref_b = reference.logprobs(b, dyn_map)[-1]
    assert reference.margin > MARGIN
    assert_first_token_matches(out, ref_b)


def preemptions(llm) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


PREEMPT_LENGTHS = (384, 448, 512)
PREEMPT_BLOCKS = 24
"""The smallest engine that preempts: 4 KiB per token (conftest's model in float32), 24
blocks of 32 tokens (768 tokens) for three prompts of 1,344 tokens in all."""


def test_preempted_prefills_match_the_reference(model_dir, reference, dyn_map):
    # At most 128 tokens per prefill per step: the three prefills run side by side and fill the
    # cache in their second step, so the third preempts one; every split stays on a
    # query-block boundary (multiples of 128).
    prompts = [random_prompt(n, seed=n + 11) for n in PREEMPT_LENGTHS]
    with engine(model_dir, max_model_len=640, max_num_batched_tokens=512,
                long_prefill_token_threshold=128, max_num_seqs=3,
                kv_cache_memory_bytes=PREEMPT_BLOCKS * BLOCK * 4096, disable_log_stats=False) as llm:
        before = preemptions(llm)
        outs = gen(llm, prompts, max_tokens=1, prompt_logprobs=0)
        assert preemptions(llm) > before, "the test must force preemption"
    for p, out in zip(prompts, outs):
        got = prompt_logprobs(out, p)
        assert (got - checked_reference(reference, p, dyn_map)).abs().max().item() < TOL, len(p)


@pytest.fixture(scope="module")
def dyn_only_map_path(dyn_map, tmp_path_factory):
    """A dynamic-only map: no triangle layers, XAttention in every layer the
    TriangleMix + dynamic map covers (0-3)."""
    import yaml

    data = {k: v for k, v in dyn_map.raw.items() if k != "triangle_layers"}
    data["dynamic_layers"] = "0-3"
    path = tmp_path_factory.mktemp("maps") / "dynamic-only.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_dynamic_only_map_and_chunks_that_cut_query_blocks(model_dir, reference, dyn_map,
                                                            dyn_only_map_path):
    """A map without triangle layers runs XAttention in every layer, exact; a chunk
    size of 96 cuts query blocks, and only those blocks change (the documented rule)."""
    from vllm_trianglemix.config import load_layer_map

    only = load_layer_map(dyn_only_map_path)
    assert only.layers == {} and sorted(only.dynamic_layers) == [0, 1, 2, 3]
    prompts = [random_prompt(701, seed=701), random_prompt(203, seed=210)]
    with engine(model_dir, map_ref=dyn_only_map_path, max_num_batched_tokens=96,
                enable_prefix_caching=False) as llm:
        got = [prompt_logprobs(gen(llm, [p], max_tokens=1, prompt_logprobs=0)[0], p) for p in prompts]
    for p, lp in zip(prompts, got):
        ref_cut = checked_reference(reference, p, only, chunk_starts=range(96, len(p), 96))
        assert (lp - ref_cut).abs().max().item() < TOL, len(p)
        # no triangle layer ran: the TriangleMix + dynamic map's result is far
        assert (lp - reference.prompt_logprobs(p, dyn_map, chunk_starts=range(96, len(p), 96))
                ).abs().max().item() > FAR, len(p)


def test_threshold_one_equals_the_map_without_dynamic_layers(model_dir, reference, dyn_map, tri_map,
                                                              tmp_path):
    keep_all = dict(dyn_map.raw, dynamic={**dyn_map.raw["dynamic"], "threshold": 1.0})
    path = tmp_path / "keep-all.yaml"
    import yaml

    path.write_text(yaml.safe_dump(keep_all))
    parse_layer_map(keep_all, str(path))
    prompts = [random_prompt(n, seed=n + 5) for n in (701, 203)]
    with engine(model_dir, map_ref=str(path), max_num_batched_tokens=64) as llm:
        outs = gen(llm, prompts, max_tokens=1, prompt_logprobs=0)
    for p, out in zip(prompts, outs):
        got = prompt_logprobs(out, p)
        assert (got - reference.prompt_logprobs(p, tri_map)).abs().max().item() < TOL, len(p)
