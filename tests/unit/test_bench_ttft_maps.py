"""`bench ttft`'s dynamic engines: the maps it serves them (TM + dynamic vs dynamic-only
at the same density, the TriangleMix paper's comparison); and its engines' log."""

import pytest

from vllm_trianglemix.config import parse_layer_map
from vllm_trianglemix.tools.bench_ttft import dynamic_map_data
from vllm_trianglemix.tools.errors import ToolError

REF = "llama-3.1-8b-instruct-dynamic"


def test_dynamic_at_density_keeps_the_triangle_layers():
    m = parse_layer_map(dynamic_map_data(REF, "any", "dynamic@0.1"), "d")
    assert sorted(m.layers) == list(range(16, 32)) and sorted(m.dynamic_layers) == list(range(16))
    p = m.dynamic_param_sets[0]
    assert (p.threshold, p.max_density) == (1.0, 0.1)


@pytest.mark.parametrize("name, density", [("dynamic-only", None), ("dynamic-only@0.1", 0.1)])
def test_dynamic_only_makes_every_covered_layer_dynamic(name, density):
    m = parse_layer_map(dynamic_map_data(REF, "any", name), "d")
    assert m.layers == {} and sorted(m.dynamic_layers) == list(range(32))
    assert m.dynamic_param_sets[0].max_density == density


def test_unknown_backend_is_refused():
    with pytest.raises(ToolError, match="unknown backend .dynamic-all."):
        dynamic_map_data(REF, "any", "dynamic-all")


def test_only_vllms_tokenizerless_warmup_warning_is_dropped():
    """The engines skip the tokenizer; vLLM's chat-template warmup warning about it (logged by
    the module named here) is dropped, every other record kept."""
    import importlib
    import logging

    from vllm_trianglemix.tools import bench_ttft

    assert importlib.import_module(bench_ttft.WARMUP_LOGGER).logger.name == bench_ttft.WARMUP_LOGGER
    keep = bench_ttft.DropTokenizerlessWarmupWarning().filter

    def record(msg, level=logging.WARNING):
        return logging.LogRecord(bench_ttft.WARMUP_LOGGER, level, __file__, 1, msg, None, None)

    assert not keep(record(bench_ttft.WARMUP_WARNING))
    assert keep(record("Chat template warmup completed in %.3fs", logging.DEBUG))
    assert keep(record("something else failed"))
