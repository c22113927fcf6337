"""fp8 (e4m3) KV cache through real vLLM on the CPU: TriangleMix next to stock CPU attention.

Two engines of the tiny Llama with ``kv_cache_dtype="fp8"`` (vLLM's CPU
attention supports it on AVX-512/AMX), per-layer K/V scales of 0.5 set on
every attention layer as a checkpoint would (so ignoring them is far off):

* prompt logprobs of long prompts (several chunks of 96 tokens, each prompt
  alone), against a float64 forward that reads K/V from an fp8 cache with the
  same scale: TriangleMix with the demo map's dynamic variant (XAttention in
  layers 0-1, which read the fp8 cache with its scales for the estimate and the
  attention; triangle layers 2-3) within stock fp8's own error (dense mask),
  and far from the dense mask. The reference derives every selection itself on
  the fp8 cache, told where the steps begin. The stock fp8 kernel's own
  rounding (dense rows and short prompts) sets that error, not the TriangleMix
  paths, which are float32 on the dequantized cache. (vLLM's CPU attention
  refuses an fp8 cache without AVX-512/AMX: there these tests skip, and
  tests/unit/test_xattention_ops.py checks the CPU dynamic op on fp8 caches.)
* the same side by side against the unquantized float64 reference;
* short prompts are bit for bit the stock fp8 engine.
"""

import os

import pytest
import torch

from tests.e2e_cpu.conftest import CHUNK, make_llm, prompt_logprobs, random_prompt, shutdown

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function

pytestmark = pytest.mark.e2e

KV_SCALE = 0.5


def _needs_fp8_cpu():
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        pytest.skip("vLLM's CPU attention needs AVX-512 or AMX for an fp8 KV cache")


def set_kv_scales(worker, value):
    """On the worker: the K/V scales of every attention layer."""
    count = 0
    for module in worker.model_runner.model.modules():
        if hasattr(module, "_k_scale") and hasattr(module, "impl"):
            for attr in ("_k_scale", "_v_scale"):
                getattr(module, attr).fill_(value)
                setattr(module, attr + "_float", value)
            module._k_scale_cpu.fill_(value)
            module._v_scale_cpu.fill_(value)
            count += 1
    return count


@pytest.fixture(scope="module")
def fp8_engines(model_dir):
    _needs_fp8_cpu()
    engines = []
    try:
        for backend in (None, "TRIANGLEMIX"):
            extra = {} if backend is None else {
                "additional_config": {"trianglemix_config": "tiny-llama-demo-dynamic"}}
            llm = make_llm(model_dir, backend, kv_cache_dtype="fp8", enable_prefix_caching=False,
                           **extra)
            engines.append(llm)
            assert llm.collective_rpc(set_kv_scales, args=(KV_SCALE,))[0] == 4
        yield engines
    finally:
        for llm in engines:
            shutdown(llm)


def _run(llm, ids, **sp):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                        SamplingParams(temperature=0, **sp), use_tqdm=False)


def test_fp8_prompt_logprobs_exact_on_the_quantized_cache(fp8_engines, reference):
    from vllm_trianglemix.config import resolve_layer_map

    layer_map = resolve_layer_map({"trianglemix_config": "tiny-llama-demo-dynamic"}, "any")
    stock, tri = fp8_engines
    ids = [random_prompt(n, seed=n) for n in (700, 333)]
    outs_tri = [_run(tri, [p], max_tokens=1, prompt_logprobs=0)[0] for p in ids]  # alone: known chunks
    outs_stock = _run(stock, ids, max_tokens=1, prompt_logprobs=0)
    for p, ot, os_ in zip(ids, outs_tri, outs_stock):
        got, got_stock = prompt_logprobs(ot, p), prompt_logprobs(os_, p)
        # float64 forwards reading K/V from an fp8 cache with the same scale
        steps = range(CHUNK, len(p), CHUNK)
        fp8_exact = reference.prompt_logprobs(p, layer_map, chunk_starts=steps, kv_scale=KV_SCALE)
        fp8_dense = reference.prompt_logprobs(p, None, kv_scale=KV_SCALE)
        err = (got - fp8_exact).abs().mean().item()
        err_stock = (got_stock - fp8_dense).abs().mean().item()  # stock fp8's own error
        off_mask = (got - fp8_dense).abs().mean().item()
        # the same, side by side against the unquantized float64 reference
        err_unq = (got - reference.prompt_logprobs(p, layer_map, chunk_starts=steps)).abs().mean().item()
        err_stock_unq = (got_stock - reference.prompt_logprobs(p, None)).abs().mean().item()
        print(f"fp8 CPU prompt {len(p)}: mean |logprob diff| TriangleMix {err:.2e} "
              f"(unquantized ref {err_unq:.2e}), stock {err_stock:.2e} ({err_stock_unq:.2e}); "
              f"TriangleMix vs the dense mask {off_mask:.2e}")
        assert err < 1.5 * err_stock + 1e-4, (err, err_stock)
        assert err_unq < 1.5 * err_stock_unq + 1e-4, (err_unq, err_stock_unq)
        assert off_mask > 2 * err, (err, off_mask)


def test_fp8_short_prompts_are_stock_bit_for_bit(fp8_engines):
    stock, tri = fp8_engines
    ids = [random_prompt(n, seed=n) for n in (40, 100, 127)]
    a = _run(stock, ids, max_tokens=8, logprobs=3)
    b = _run(tri, ids, max_tokens=8, logprobs=3)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert [{t: v.logprob for t, v in d.items()} for d in x.outputs[0].logprobs] == \
            [{t: v.logprob for t, v in d.items()} for d in y.outputs[0].logprobs]
