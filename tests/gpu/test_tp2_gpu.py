"""TriangleMix at tensor parallel size 2 on two GPUs, mp and Ray executors
(skipped with fewer than two GPUs; Ray part skipped without Ray).

The tiny Llama has 4 query heads and 2 KV heads, so each rank runs the
triangle kernel on 2 query heads and 1 KV head. Per executor, against a stock
engine at TP=2 (mp): short prompts (dense rows) bit for bit, long prompts
against the float64 reference with the exact mask (test_backend_gpu's checks),
and every rank runs TriangleMix on its own heads.
"""


import pytest
import torch

from tests.gpu import test_backend_gpu as backend_gpu
from tests.gpu.conftest import engine
from tests.rank_probe import attention_probe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


@pytest.fixture(scope="module")
def insecure_serialization():  # collective_rpc with a function (the rank probe)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        yield


@pytest.fixture(scope="module")
def stock(model_dir, insecure_serialization):
    """One stock engine at TP=2 (mp) for both executors' checks: an engine start saved."""
    llm = engine(model_dir, None, tensor_parallel_size=2, distributed_executor_backend="mp")
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module", params=["mp", "ray"])
def engines(request, model_dir, stock, insecure_serialization):
    if request.param == "ray":
        pytest.importorskip("ray")
    tri = engine(model_dir, "TRIANGLEMIX", tensor_parallel_size=2,
                 distributed_executor_backend=request.param)
    try:
        yield stock, tri
    finally:
        tri.llm_engine.engine_core.shutdown()


def test_each_rank_runs_trianglemix_on_its_own_heads(engines):
    _, tri = engines
    ranks = tri.collective_rpc(attention_probe(), timeout=120)
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["custom_backend"].startswith("vllm_trianglemix."), rank
        assert all(layer["impl"].startswith("vllm_trianglemix.backends.cuda")
                   and (layer["num_heads"], layer["num_kv_heads"]) == (2, 1)
                   for layer in rank["layers"].values()), rank["layers"]


def test_dense_rows_are_stock_bit_for_bit(engines):
    backend_gpu.test_short_prompts_are_stock_bit_for_bit(engines)


def test_triangle_rows_match_exact_reference(engines, model_dir):  # noqa: F811
    backend_gpu.test_long_prompts_match_exact_reference(engines, model_dir)
