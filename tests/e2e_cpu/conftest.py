"""Real vLLM engines on the CPU, shared by the end-to-end tests.

One TriangleMix engine and one stock engine serve the tiny random Llama for
the whole session (an engine starts in about 40 s here). The TriangleMix
engine uses the bundled demo map (layers 2-3 triangle, n_init 4, n_local 64,
n_last 16, min_prompt_len 128), a token budget of 96 per step (so prompts span
several chunks, with boundaries inside the window and the last rows) and
32-token blocks with prefix caching on.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

CHUNK = 96
BLOCK = 32
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=4096, block_size=BLOCK,
                   max_num_batched_tokens=CHUNK, kv_cache_memory_bytes=256 << 20, seed=0,
                   enable_prefix_caching=True)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from vllm_trianglemix.tools.demo_model import build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("model") / "tiny-llama-trianglemix-demo"))


@pytest.fixture(scope="session")
def layer_map():
    from vllm_trianglemix.config import find_bundled_map

    return find_bundled_map("tiny-llama-trianglemix-demo")


@pytest.fixture(scope="session")
def reference(model_dir):
    from tests.reference_llama import ReferenceLlama

    return ReferenceLlama(model_dir)


def make_llm(model_dir, backend, **overrides):
    from vllm import LLM

    return LLM(model=model_dir, attention_backend=backend, **{**ENGINE_ARGS, **overrides})


@pytest.fixture(scope="session")
def tri_llm(model_dir):
    llm = make_llm(model_dir, "TRIANGLEMIX")
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def stock_llm(model_dir):
    llm = make_llm(model_dir, None)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def random_prompt(n: int, seed: int) -> list[int]:
    """<s> and n-1 random word tokens (ids 3..1002)."""
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 1003) for _ in range(n - 1)]


def prompt_logprobs(output, token_ids) -> torch.Tensor:
    """vLLM's logprob of each prompt token given the ones before it."""
    return torch.tensor([d[t].logprob for d, t in zip(output.prompt_logprobs[1:], token_ids[1:])],
                        dtype=torch.float64)


def first_token_logprobs(output) -> dict[int, float]:
    return {t: lp.logprob for t, lp in output.outputs[0].logprobs[0].items()}
