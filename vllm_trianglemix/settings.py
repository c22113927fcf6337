"""The plugin's environment settings, and the names earlier releases read.

vLLM flags every ``VLLM_*`` variable it does not own, so the plugin's settings
are ``TRIANGLEMIX_*``; the former ``VLLM_TRIANGLEMIX_*`` names are still read
for one release, with one deprecation line each.
"""

from __future__ import annotations

import os

from vllm.logger import init_logger

logger = init_logger("vllm.trianglemix")
_warned: set[str] = set()


def env_setting(name: str) -> str | None:
    """``os.environ[name]``, else the value of its former ``VLLM_`` name (with a warning once)."""
    value = os.environ.get(name)
    if value is not None:
        return value
    old = "VLLM_" + name
    value = os.environ.get(old)
    if value is not None and old not in _warned:
        _warned.add(old)
        logger.warning("%s is deprecated and will stop being read in the next release; "
                       "set %s instead", old, name)
    return value
