"""TriangleMix on a hybrid (the tiny Qwen3-Next) inside vLLM on the GPU (skipped without one).

Two bfloat16 engines side by side, stock and TriangleMix (both full-attention
layers triangle, two parameter sets; FlashAttention 3 and the Triton kernel;
vLLM's GPU Gated DeltaNet kernels), compared with Hugging Face's Qwen3-Next in
float32 on the CPU with the exact mask (tests/reference_qwen3_next.py):

* the stock engine is within TOL of the dense reference (what bfloat16 costs);
* the TriangleMix engine is within TOL of the triangle reference and at least
  FAR from the dense one, on prompts batched together and chunked;
* decode after a triangle prefill matches the reference with dense decode rows;
* dynamic (XAttention) layers on the GPU kernels: with every block kept they are
  dense within TOL (the stock engine's own distance), and the CPU tests' map
  (threshold 0.5: drops blocks) matches the exact rules within TOL and is at least
  FAR from dense, on the CPU tests' prompts (every selection decision of the
  reference at least MARGIN from flipping).

The failure messages print the measured distances.
"""

import os
import random

import pytest
import torch

from tests.e2e_cpu.conftest import HYBRID_MAP
from tests.gpu.conftest import KV_CACHE_BYTES
from tests.e2e_cpu.test_hybrid_dynamic import MAP as DYNAMIC_MAP
from tests.e2e_cpu.test_hybrid_dynamic import MARGIN

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = 3e-2  # bfloat16 engine vs float32 reference (CPU engines: at most 0.009)
FAR = 6e-2  # triangle vs dense reference on these prompts: at least 0.096 (measured on CPU)
LENGTHS = [100, 128, 293, 701, 1500]
MAP = HYBRID_MAP  # the CPU tests' map: both full-attention layers, two parameter sets
# Both engines run vLLM's Triton Gated DeltaNet prefill: on Hopper vLLM 0.26 otherwise picks
# FlashInfer's CuTe-DSL kernel, which needs nvidia-cutlass-dsl (not in the device image).
GDN = {"gdn_prefill_backend": "triton"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from vllm_trianglemix.tools.demo_model import build_tiny_qwen3_next

    return build_tiny_qwen3_next(str(tmp_path_factory.mktemp("m") / "tiny-qwen3-next"))


@pytest.fixture(scope="module")
def map_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("map") / "hybrid.yaml"
    path.write_text(MAP)
    return str(path)


@pytest.fixture(scope="module")
def engines(model_dir, map_path):
    pytest.importorskip("vllm")
    from vllm import LLM

    args = dict(model=model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=4096,
                max_num_batched_tokens=256, gpu_memory_utilization=0.1,
                kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0)
    stock = LLM(**args, additional_config=dict(GDN))
    tri = LLM(**args, attention_backend="TRIANGLEMIX",
              additional_config={**GDN, "trianglemix_config": map_path})
    yield stock, tri
    del stock, tri


@pytest.fixture(scope="module")
def reference(model_dir, map_path):
    from tests.reference_qwen3_next import ReferenceQwen3Next
    from vllm_trianglemix.config import load_layer_map

    return ReferenceQwen3Next(model_dir, device="cuda"), load_layer_map(map_path)


def _prompt(n, seed):
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 1003) for _ in range(n - 1)]


def _prompt_logprobs(out, p):
    return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], p[1:])],
                        dtype=torch.float64)


def _gen(llm, prompts, **sp):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, **sp), use_tqdm=False)


def test_prompts_match_the_exact_rule(engines, reference):
    stock, tri = engines
    ref, layer_map = reference
    prompts = [_prompt(n, n) for n in LENGTHS]
    outs_s = _gen(stock, prompts, max_tokens=1, prompt_logprobs=0)
    outs_t = _gen(tri, prompts, max_tokens=1, prompt_logprobs=0)
    for p, o_s, o_t in zip(prompts, outs_s, outs_t):
        dense, tri_ref = ref.prompt_logprobs(p, None), ref.prompt_logprobs(p, layer_map)
        got_s, got_t = _prompt_logprobs(o_s, p), _prompt_logprobs(o_t, p)
        d = {"stock-dense": (got_s - dense).abs().max().item(),
             "tri-triref": (got_t - tri_ref).abs().max().item(),
             "tri-dense": (got_t - dense).abs().max().item(),
             "triref-dense": (tri_ref - dense).abs().max().item()}
        msg = f"L={len(p)} {d}"
        assert d["stock-dense"] < TOL, msg
        assert d["tri-triref"] < TOL, msg
        if len(p) >= layer_map.min_prompt_len:
            assert d["tri-dense"] > FAR, msg


def test_decode_rows_are_dense(engines, reference):
    _, tri = engines
    ref, layer_map = reference
    p = _prompt(300, 3)
    out = _gen(tri, [p], max_tokens=6, logprobs=5)[0]
    tokens = list(out.outputs[0].token_ids)
    lp = ref.logprobs(p + tokens[:-1], layer_map, prompt_len=len(p))[len(p) - 1:]
    for step, lps in enumerate(out.outputs[0].logprobs):
        err = max(abs(v.logprob - lp[step, t].item()) for t, v in lps.items())
        assert err < TOL, f"step {step}: {err}"


KEEP_ALL_MAP = """\
n_init: 4
n_local: 64
n_last: 16
min_prompt_len: 128
dynamic_layers: [3, 7]
dynamic: {block_size: 128, stride: 8, threshold: 1.0}
"""
"""Both full-attention layers dynamic, every block kept: dense, through the estimate,
selection and sparse-attention kernels."""
DYNAMIC_PROMPTS = [(400, 1006), (400, 1014), (360, 1002)]
"""The CPU tests' prompts (tests/e2e_cpu/test_hybrid_dynamic.py): no near-tie in bfloat16."""


@pytest.fixture(scope="module")
def dynamic_engines(model_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    from vllm import LLM

    from vllm_trianglemix.config import load_layer_map

    folder = tmp_path_factory.mktemp("dynamic-maps")
    maps = {}
    for name, text in (("keep-all", KEEP_ALL_MAP), ("dropping", DYNAMIC_MAP)):
        (folder / f"{name}.yaml").write_text(text)
        maps[name] = str(folder / f"{name}.yaml")
    args = dict(model=model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=4096,
                max_num_batched_tokens=256, gpu_memory_utilization=0.1,
                kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0,
                attention_backend="TRIANGLEMIX")
    llms = {name: LLM(**args, additional_config={**GDN, "trianglemix_config": path})
            for name, path in maps.items()}
    yield {name: (llms[name], load_layer_map(path)) for name, path in maps.items()}
    del llms


def _checked(ref, p, layer_map):
    lp = ref.prompt_logprobs(p, layer_map)
    assert ref.margin > MARGIN, (len(p), ref.margin)
    return lp


def test_keep_all_dynamic_layers_are_dense(dynamic_engines, reference):
    """Against the float64 dense reference, within the tolerance stock meets
    (test_prompts_match_the_exact_rule); no stock engine here, so that the dynamic tests
    start their engines in a lane of their own (scripts/gpu.sh suite)."""
    ref, _ = reference
    keep_all, _ = dynamic_engines["keep-all"]
    prompts = [_prompt(n, seed) for n, seed in DYNAMIC_PROMPTS]
    for p, o_k in zip(prompts, _gen(keep_all, prompts, max_tokens=1, prompt_logprobs=0)):
        err = (_prompt_logprobs(o_k, p) - ref.prompt_logprobs(p, None)).abs().max().item()
        assert err < TOL, f"L={len(p)} keep-all vs dense reference {err}"


def test_dynamic_dropping_threshold_matches_the_rules(dynamic_engines, reference):
    ref, _ = reference
    llm, layer_map = dynamic_engines["dropping"]
    prompts = [_prompt(n, seed) for n, seed in DYNAMIC_PROMPTS]
    for p, out in zip(prompts, _gen(llm, prompts, max_tokens=1, prompt_logprobs=0)):
        got, dyn_ref = _prompt_logprobs(out, p), _checked(ref, p, layer_map)
        dense = ref.prompt_logprobs(p, None)
        d = {"dyn-dynref": (got - dyn_ref).abs().max().item(),
             "dyn-dense": (got - dense).abs().max().item()}
        assert d["dyn-dynref"] < TOL, f"L={len(p)} {d}"
        assert d["dyn-dense"] > FAR, f"L={len(p)} {d}"
