"""fp8 KV cache and FlashInfer as the stock backend, inside vLLM on the GPU (skipped without one).

The tiny random Llama (head dim 64), engines side by side:

* fp8 (``kv_cache_dtype="fp8"``, FA3): a stock FA3 fp8 engine and a TriangleMix
  fp8 engine, both with per-layer K/V scales of 0.5 set on every attention
  layer (so the scales matter: ignoring them is far off). Prompt logprobs of
  long prompts against the float64 reference (unquantized): TriangleMix
  against the exact mask, stock fp8 against the dense mask; TriangleMix must
  stay within stock fp8's own error (the numbers are printed, ``BREADTH:``);
  short prompts are bit for bit stock fp8.
* FlashInfer forced (``trianglemix_stock_backend: FLASHINFER``) against a
  stock FlashInfer engine: short prompts (every row dense) bit for bit, long
  prompts against the float64 reference of the exact mask, far from the dense
  one, decode rows after a triangle prefill; the engine really runs the
  FlashInfer impl.

Run with ``-s`` to see the ``BREADTH:`` lines (scripts/gpu.sh suite does).
"""

import os
import random

import pytest
import torch

from tests.gpu.conftest import engine, shutdown

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

KV_SCALE = 0.5
FLASHINFER = {"trianglemix_stock_backend": "FLASHINFER"}


@pytest.fixture(scope="module")
def reference(model_dir):
    from tests.reference_llama import ReferenceLlama

    return ReferenceLlama(model_dir, device="cuda")


@pytest.fixture(scope="module")
def layer_map():
    from vllm_trianglemix.config import find_bundled_map

    return find_bundled_map("tiny-llama-trianglemix-demo")


_engine = engine
_shutdown = shutdown


def _set_kv_scales(worker, value):
    """On each worker: per-layer K/V scales of every attention layer (as a checkpoint would)."""
    names = []
    for name, module in worker.model_runner.model.named_modules():
        if hasattr(module, "_k_scale") and hasattr(module, "impl"):
            for attr in ("_k_scale", "_v_scale"):
                getattr(module, attr).fill_(value)
                setattr(module, attr + "_float", value)
            module._k_scale_cpu.fill_(value)
            module._v_scale_cpu.fill_(value)
            names.append(type(module.impl).__name__)
    return names


def _impl_names(worker):
    return sorted({type(m.impl).__name__ for _, m in worker.model_runner.model.named_modules()
                   if hasattr(m, "impl") and hasattr(m, "_k_scale")})


def _prompt(n, seed):
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 1003) for _ in range(n - 1)]


def _prompt_logprobs(llm, ids):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                        SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0, logprobs=1),
                        use_tqdm=False)
    got = [torch.tensor([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])],
                        dtype=torch.float64) for o, p in zip(outs, ids)]
    return got, outs


def _same_short_outputs(a, b):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=_prompt(n, n)) for n in (40, 100, 127)]
    sp = SamplingParams(max_tokens=16, temperature=0, logprobs=5)
    for x, y in zip(a.generate(prompts, sp, use_tqdm=False), b.generate(prompts, sp, use_tqdm=False)):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert {t: l.logprob for t, l in lx.items()} == {t: l.logprob for t, l in ly.items()}


# -- fp8 KV cache (stock FA3 fp8 underneath) ----------------------------------

@pytest.fixture(scope="module")
def fp8_engines(model_dir):
    stock = _engine(model_dir, None, kv_cache_dtype="fp8", dtype="bfloat16")
    tri = _engine(model_dir, "TRIANGLEMIX", kv_cache_dtype="fp8", dtype="bfloat16")
    for llm in (stock, tri):
        assert llm.collective_rpc(_set_kv_scales, args=(KV_SCALE,))[0], "no attention layers found"
    yield stock, tri
    _shutdown(stock, tri)


def test_fp8_short_prompts_are_stock_fp8_bit_for_bit(fp8_engines):
    _same_short_outputs(*fp8_engines)


def test_fp8_long_prompts_within_stock_fp8_error(fp8_engines, reference, layer_map):
    stock, tri = fp8_engines
    assert tri.collective_rpc(_impl_names)[0] == ["TriangleMixFlashAttentionImpl"]
    ids = [_prompt(n, n) for n in (700, 1501)]
    got_tri, _ = _prompt_logprobs(tri, ids)
    got_stock, _ = _prompt_logprobs(stock, ids)
    for p, t, s in zip(ids, got_tri, got_stock):
        ref_tri = reference.prompt_logprobs(p, layer_map)
        ref_dense = reference.prompt_logprobs(p, None)
        err_tri = (t - ref_tri).abs().mean().item()
        err_stock = (s - ref_dense).abs().mean().item()  # stock fp8's own error
        off_mask = (t - ref_dense).abs().mean().item()
        print(f"BREADTH: fp8 prompt {len(p)}: mean |logprob - float64 ref|: TriangleMix fp8 "
              f"{err_tri:.2e} (exact mask), stock FA3 fp8 {err_stock:.2e} (dense); "
              f"TriangleMix fp8 vs dense ref {off_mask:.2e}")
        assert err_tri < 1.5 * err_stock + 2e-3, (err_tri, err_stock)
        assert off_mask > err_tri, (off_mask, err_tri)


def test_fp8_dynamic_layers_within_stock_fp8_error(fp8_engines, model_dir, reference):
    """Dynamic layers (XAttention) on an fp8 cache written by vLLM: long prompts' logprobs against
    the float64 reference of the dynamic map (it derives every selection itself) stay within stock
    FA3 fp8's own error against the dense reference, and far from the triangle-only map's."""
    from vllm_trianglemix.config import resolve_layer_map

    stock = fp8_engines[0]
    dyn_map = resolve_layer_map({"trianglemix_config": "tiny-llama-demo-dynamic"}, "any")
    tri_map = resolve_layer_map({"trianglemix_config": "tiny-llama-demo"}, "any")
    dyn = _engine(model_dir, "TRIANGLEMIX", kv_cache_dtype="fp8", dtype="bfloat16",
                  additional_config={"trianglemix_config": "tiny-llama-demo-dynamic"})
    try:
        assert dyn.collective_rpc(_set_kv_scales, args=(KV_SCALE,))[0], "no attention layers found"
        ids = [_prompt(n, n) for n in (704, 1536)]
        got_dyn, _ = _prompt_logprobs(dyn, ids)
        got_stock, _ = _prompt_logprobs(stock, ids)
    finally:
        _shutdown(dyn)
    for p, d, s in zip(ids, got_dyn, got_stock):
        err_dyn = (d - reference.prompt_logprobs(p, dyn_map)).abs().mean().item()
        err_stock = (s - reference.prompt_logprobs(p, None)).abs().mean().item()
        off_map = (d - reference.prompt_logprobs(p, tri_map)).abs().mean().item()
        print(f"BREADTH: fp8 dynamic prompt {len(p)}: mean |logprob - float64 ref|: TriangleMix + "
              f"XAttention fp8 {err_dyn:.2e}, stock FA3 fp8 {err_stock:.2e} (dense); vs the "
              f"triangle-only map {off_map:.2e}")
        assert err_dyn < 1.5 * err_stock + 2e-3, (err_dyn, err_stock)
        assert off_map > err_dyn, (off_map, err_dyn)


# -- FlashInfer as the stock backend -------------------------------------------

@pytest.fixture(scope="module")
def flashinfer_engines(model_dir):
    stock = _engine(model_dir, "FLASHINFER")
    tri = _engine(model_dir, "TRIANGLEMIX", additional_config=dict(FLASHINFER))
    yield stock, tri
    _shutdown(stock, tri)


def test_flashinfer_is_the_stock_delegate(flashinfer_engines):
    _, tri = flashinfer_engines
    assert tri.collective_rpc(_impl_names)[0] == ["TriangleMixFlashInferImpl"]


def test_flashinfer_short_prompts_are_stock_bit_for_bit(flashinfer_engines):
    _same_short_outputs(*flashinfer_engines)


def test_flashinfer_long_prompts_match_exact_reference(flashinfer_engines, reference, layer_map):
    _, tri = flashinfer_engines
    ids = [_prompt(n, n) for n in (700, 1501)]
    got, outs = _prompt_logprobs(tri, ids)
    for p, g, out in zip(ids, got, outs):
        err_tri = (g - reference.prompt_logprobs(p, layer_map)).abs().mean().item()
        err_dense = (g - reference.prompt_logprobs(p, None)).abs().mean().item()
        print(f"BREADTH: FlashInfer prompt {len(p)}: mean |logprob - float64 ref|: exact mask "
              f"{err_tri:.2e}, dense mask {err_dense:.2e}")
        assert err_tri < 5e-3, err_tri
        assert err_dense > 4 * err_tri, (err_tri, err_dense)
        # decode rows after the triangle prefill, on FlashInfer's decode path
        gen = list(out.outputs[0].token_ids)
        lp = reference.logprobs(p + gen[:-1], layer_map, prompt_len=len(p))[len(p) - 1 :]
        chosen = lp.gather(1, torch.tensor(gen)[:, None])[:, 0]
        vllm_lp = torch.tensor([list(d.values())[0].logprob for d in out.outputs[0].logprobs],
                               dtype=torch.float64)
        assert (vllm_lp - chosen).abs().max().item() < 2e-2
