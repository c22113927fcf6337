"""What the GPU tests share: one tiny Llama and one stock engine for the whole session.

Engine starts dominate GPU test time, so every module that compares against the stock
FlashAttention engine of the tiny float16 Llama uses the same one (``stock_engine``),
and every engine starts eagerly (``enforce_eager``: no torch.compile, no CUDA graphs),
small (a fixed 1 GiB KV cache, ``gpu_memory_utilization`` 0.1: several live side by side on one
GPU, also from several pytest processes).
"""

import os

import pytest
import torch

# Several engines in one test process: spawn their workers (fork after CUDA init fails).
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
# Greedy decoding only: vLLM's own top-k/top-p sampler instead of FlashInfer's, whose JIT
# build takes about 90 s on a machine that has not built it before.
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
# Every test model is a local folder: no look-ups on the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

KV_CACHE_BYTES = 1 << 30
"""Every test engine's KV cache, fixed: vLLM then skips its memory profiling, which fails when
another process on the GPU frees memory meanwhile (scripts/gpu.sh runs test files side by side)."""
ENGINE_ARGS = dict(dtype="float16", enforce_eager=True, max_model_len=4096,
                   max_num_batched_tokens=256, block_size=16, gpu_memory_utilization=0.1,
                   kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0)
"""The tiny Llama's engine settings in every GPU test (overrides per test)."""


@pytest.fixture(autouse=True)
def _needs_vllm():
    """Every GPU test runs vLLM's kernels, cache layout or engine: skipped where vLLM is not
    installed (a GPU machine without it), not failed on an import inside the test."""
    pytest.importorskip("vllm")


def engine(model_dir, backend, **overrides):
    """A vLLM engine of ``model_dir`` with ``--attention-backend backend`` (None: stock)."""
    pytest.importorskip("vllm")
    from vllm import LLM

    return LLM(model=model_dir, attention_backend=backend, **{**ENGINE_ARGS, **overrides})


def shutdown(*llms):
    for llm in llms:
        llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny random Llama (head dim 64), built once."""
    from vllm_trianglemix.tools.demo_model import build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("m") / "tiny-llama-trianglemix-demo"))


@pytest.fixture(scope="session")
def stock_engine(model_dir):
    """The stock FlashAttention engine of the tiny Llama, shared by every module."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    llm = engine(model_dir, None)
    yield llm
    shutdown(llm)
