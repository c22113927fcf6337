"""An engine that selects TriangleMix names the plugin's settings to vLLM for its Ray
actors, in vLLM's real config step (settings.py says why: Ray copies only what it is told)."""

import os

import pytest

from vllm_trianglemix import settings

pytestmark = pytest.mark.e2e


def test_config_step_adds_the_settings_to_what_vllm_copies_to_ray(model_dir, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.ray.ray_env import get_env_vars_to_copy

    monkeypatch.setenv(settings.RAY_COPY_ENV, "")  # restored after the test
    monkeypatch.setenv(settings.KERNEL_CONFIG, "block_n=32")
    EngineArgs(model=model_dir, dtype="float32", skip_tokenizer_init=True).create_engine_config()
    assert os.environ[settings.RAY_COPY_ENV] == ""  # TriangleMix not selected: untouched
    EngineArgs(model=model_dir, attention_backend="TRIANGLEMIX", dtype="float32",
               skip_tokenizer_init=True).create_engine_config()
    assert os.environ[settings.RAY_COPY_ENV].split(",") == list(settings.NAMES)
    assert set(settings.NAMES) <= get_env_vars_to_copy(destination="test")
