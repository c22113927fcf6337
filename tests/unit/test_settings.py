"""The plugin's environment settings (settings.py): TRIANGLEMIX_* names, the former
VLLM_TRIANGLEMIX_* names read for one release with one warning, and the names given to
vLLM for its Ray actors (checked with vLLM's own list of what it copies)."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_trianglemix import settings
from vllm_trianglemix.settings import KERNEL_CONFIG, METRICS_DIR, NAMES, XATTN_CONFIG, env_setting

ROOT = Path(__file__).resolve().parents[2]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings(monkeypatch):
    """Fresh once-per-process state; the warnings of logger vllm.trianglemix."""
    monkeypatch.setattr(settings, "_warned", set())
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(settings.deprecated_name(name), raising=False)
    handler = _Records()
    logger = logging.getLogger("vllm.trianglemix")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_new_name_is_read(monkeypatch, warnings):
    monkeypatch.setenv(KERNEL_CONFIG, "block_n=64")
    assert env_setting(KERNEL_CONFIG) == "block_n=64"
    assert env_setting(XATTN_CONFIG) is None and env_setting(XATTN_CONFIG, "") == ""
    assert warnings == []


@pytest.mark.parametrize("name", NAMES)
def test_old_name_is_read_with_exactly_one_warning(monkeypatch, warnings, name):
    old = "VLLM_" + name
    monkeypatch.setenv(old, "x=1")
    assert env_setting(name) == "x=1" and env_setting(name) == "x=1"
    assert len(warnings) == 1, warnings
    assert old in warnings[0] and f"set {name} instead" in warnings[0]


def test_new_name_wins_over_old(monkeypatch, warnings):
    monkeypatch.setenv(XATTN_CONFIG, "est_kernel=2")
    monkeypatch.setenv("VLLM_" + XATTN_CONFIG, "est_kernel=1")
    assert env_setting(XATTN_CONFIG) == "est_kernel=2"
    assert warnings == []


def test_unknown_setting_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown TriangleMix setting"):
        env_setting("TRIANGLEMIX_OTHER")


def test_readers_use_the_new_names(monkeypatch, warnings):
    from vllm_trianglemix import metrics
    from vllm_trianglemix.ops.triangle_triton import KernelConfig

    monkeypatch.setenv(KERNEL_CONFIG, "block_n=16,num_warps=2")
    config = KernelConfig.from_env(128)
    assert (config.block_n, config.num_warps) == (16, 2)
    monkeypatch.setenv("VLLM_" + METRICS_DIR, "/old/dir")
    assert metrics.engine_dir() == "/old/dir" and len(warnings) == 1
    path = metrics.make_dir()  # the front end sets the new name; engine processes read it
    try:
        assert metrics.engine_dir() == path and len(warnings) == 1
    finally:
        Path(path).rmdir()


@pytest.mark.parametrize("name", [KERNEL_CONFIG, "VLLM_" + KERNEL_CONFIG])
def test_retired_kernel_field_is_ignored_with_one_warning(monkeypatch, warnings, name):
    """``split_kv`` (long dense rows split over programs; the stock backend computes them now)
    in an earlier release's kernel config, under either name: ignored, with one warning; an
    unknown field is still refused."""
    from vllm_trianglemix.ops.triangle_triton import KernelConfig

    monkeypatch.setenv(name, "block_n=16,split_kv=8192")
    assert KernelConfig.from_env(128) == dataclasses.replace(KernelConfig.default_for(128), block_n=16)
    assert sum("split_kv=8192 no longer choose anything" in m for m in warnings) == 1
    monkeypatch.setenv(name, "split_kv=2048")
    assert KernelConfig.from_env(256) == KernelConfig.default_for(256)
    monkeypatch.setenv(name, "split_kvv=2048")
    with pytest.raises(ValueError, match=f"{KERNEL_CONFIG}: unknown field 'split_kvv'"):
        KernelConfig.from_env(128)


def test_one_warning_line_per_process_in_vllms_format(tmp_path):
    code = ("from vllm.config.logging import LoggingConfig\n"  # as vLLM's processes do
            "from vllm.logger import configure_logging_if_needed\n"
            "configure_logging_if_needed(LoggingConfig())\n"
            "from vllm_trianglemix.settings import env_setting\n"
            "for _ in range(3):\n"
            "    assert env_setting('TRIANGLEMIX_KERNEL_CONFIG') == 'block_n=32'\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
           "VLLM_TRIANGLEMIX_KERNEL_CONFIG": "block_n=32"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if "TRIANGLEMIX" in line]
    assert len(lines) == 1, output
    assert " WARNING " in lines[0] and "[settings.py:" in lines[0], lines[0]
    assert "VLLM_TRIANGLEMIX_KERNEL_CONFIG is deprecated" in lines[0]


# --- Ray actors get the settings ---------------------------------------------------------


def test_names_are_added_to_vllms_ray_copy_list_once(monkeypatch):
    from vllm.ray.ray_env import get_env_vars_to_copy

    monkeypatch.setenv(settings.RAY_COPY_ENV, "MY_VAR")
    monkeypatch.setenv(KERNEL_CONFIG, "block_n=64")
    settings.carry_to_ray()
    settings.carry_to_ray()
    assert os.environ[settings.RAY_COPY_ENV] == "MY_VAR," + ",".join(NAMES)
    assert {"MY_VAR", *NAMES} <= get_env_vars_to_copy(destination="test")


def test_names_are_added_to_the_platforms_list_once():
    class Platform:
        additional_env_vars = ["OTHER"]

    settings.name_for_ray_workers(Platform)
    settings.name_for_ray_workers(Platform)
    assert Platform.additional_env_vars == ["OTHER", *NAMES]


def test_registration_names_them_for_the_ray_executor():
    import vllm_trianglemix
    from vllm.platforms import current_platform
    from vllm.ray.ray_env import get_env_vars_to_copy

    vllm_trianglemix.register()
    assert set(NAMES) <= get_env_vars_to_copy(
        additional_vars=set(current_platform.additional_env_vars), destination="test")
