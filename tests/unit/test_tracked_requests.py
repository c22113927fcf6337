"""The plugin's per-request state gauges: the current count, and the maximum since start
(which a reader that comes after the load still sees)."""

import numpy as np
from prometheus_client import REGISTRY

from vllm_trianglemix import prompt_lens


def test_the_maximum_outlives_the_step(monkeypatch):
    monkeypatch.setattr(prompt_lens, "_max_tracked", 0)
    prompt_lens._make_gauges()
    for lengths in (np.array([700, 1900, 32]), None, np.array([64]), None):
        prompt_lens.publish(lengths)
    assert prompt_lens.tracked_requests() == 0 and prompt_lens.max_tracked_requests() == 3
    assert REGISTRY.get_sample_value(prompt_lens.TRACKED_REQUESTS_METRIC) == 0
    assert REGISTRY.get_sample_value(prompt_lens.TRACKED_REQUESTS_MAX_METRIC) == 3
