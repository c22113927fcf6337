"""The plugin's environment settings, and the one place that reads them.

* ``TRIANGLEMIX_KERNEL_CONFIG``: the triangle kernel's launch configuration
  (``"block_n=64,num_warps=8"``; ``bench kernel --best-env`` writes it);
* ``TRIANGLEMIX_XATTN_CONFIG``: the dynamic layers' kernels (``bench dynamic
  --best-env`` writes it);
* ``TRIANGLEMIX_METRICS_DIR``: set by the front end, read by the engine
  processes (metrics.py);
* ``TRIANGLEMIX_WARMUP``: ``0`` skips compiling the GPU kernels while the
  engine starts (warmup.py; they then compile on the first long prompt).

They have no ``VLLM_`` prefix: vLLM warns about every ``VLLM_*`` variable it
does not own. The former names (``VLLM_TRIANGLEMIX_*``) are read for one more
release when the new one is unset, with one deprecation warning per name and
process; when both are set, the new name wins.

vLLM's engine-core and worker processes inherit the environment (forked or
spawned). Ray actors get only the variables vLLM copies to them (``VLLM_*``
among them, not these), so the plugin names them to vLLM twice: in every
process, in the platform's ``additional_env_vars`` (what the Ray executor adds
for its workers: :func:`name_for_ray_workers`), and, from the front end when an
engine selects TriangleMix, in ``VLLM_RAY_EXTRA_ENV_VARS_TO_COPY`` (what vLLM
copies to any Ray actor, data-parallel engine cores included: :func:`carry_to_ray`).
"""

from __future__ import annotations

import os

KERNEL_CONFIG = "TRIANGLEMIX_KERNEL_CONFIG"
XATTN_CONFIG = "TRIANGLEMIX_XATTN_CONFIG"
METRICS_DIR = "TRIANGLEMIX_METRICS_DIR"
WARMUP = "TRIANGLEMIX_WARMUP"
NAMES = (KERNEL_CONFIG, XATTN_CONFIG, METRICS_DIR, WARMUP)

RAY_COPY_ENV = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"
"""vLLM's list of extra variables it copies from the driver to Ray actors (comma-separated)."""

_warned: set[str] = set()


def deprecated_name(name: str) -> str:
    """``TRIANGLEMIX_KERNEL_CONFIG`` -> ``VLLM_TRIANGLEMIX_KERNEL_CONFIG`` (read for one release)."""
    return "VLLM_" + name


def env_setting(name: str, default: str | None = None) -> str | None:
    """The value of setting ``name`` (one of :data:`NAMES`), else of its deprecated
    ``VLLM_`` name (warning once per process), else ``default``."""
    if name not in NAMES:
        raise ValueError(f"unknown TriangleMix setting {name!r} (known: {', '.join(NAMES)})")
    value = os.environ.get(name)
    if value is not None:
        return value
    old = deprecated_name(name)
    value = os.environ.get(old)
    if value is None:
        return default
    if old not in _warned:
        _warned.add(old)
        from vllm.logger import init_logger

        init_logger("vllm.trianglemix").warning(
            "TriangleMix: %s is deprecated and will not be read after the next release; "
            "set %s instead", old, name)
    return value


def name_for_ray_workers(platform_cls) -> None:
    """Add :data:`NAMES` to the platform's ``additional_env_vars`` (idempotent)."""
    listed = list(getattr(platform_cls, "additional_env_vars", None) or [])
    missing = [n for n in NAMES if n not in listed]
    if missing:
        platform_cls.additional_env_vars = listed + missing


def carry_to_ray() -> None:
    """Add :data:`NAMES` to ``VLLM_RAY_EXTRA_ENV_VARS_TO_COPY`` (idempotent), before
    vLLM starts the engine processes, which inherit it."""
    listed = [n.strip() for n in os.environ.get(RAY_COPY_ENV, "").split(",") if n.strip()]
    missing = [n for n in NAMES if n not in listed]
    if missing:
        os.environ[RAY_COPY_ENV] = ",".join(listed + missing)
