"""Plugin metrics next to vLLM's own on the server's ``/metrics``.

The plugin's numbers are produced where attention runs (the engine core or
its workers), but ``/metrics`` is served by the API server process. vLLM's
own engine numbers reach the front end through its engine-core channel; the
plugin has none, so it uses a folder:

* the front end makes the folder when it validates the engine config and
  puts its path in the environment (:data:`DIR_ENV`) before vLLM starts the
  engine processes, which inherit it (not in the engine config: its hash keys
  vLLM's compile cache);
* an engine process :func:`publish` es a small JSON file there now and then
  (atomically: write, then rename);
* the front end registers a ``prometheus_client`` collector
  (:func:`register_collector`) in the registry vLLM serves, which reads the
  files on each scrape and yields metric families. No extra server, nothing
  hand-formatted.

With several API servers (``--api-server-count`` > 1) vLLM serves a
multiprocess registry; the collector is registered only in the process that
built the config, so these metrics then do not appear.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any, Callable, Iterable

from vllm_trianglemix import settings

DIR_ENV = settings.METRICS_DIR
"""Set by the front end: the folder engine processes publish to."""

_registered: set[str] = set()
_lock = threading.Lock()


def make_dir() -> str:
    """A new metrics folder for the engine being configured, in :data:`DIR_ENV`."""
    path = tempfile.mkdtemp(prefix="trianglemix-metrics-")
    os.environ[DIR_ENV] = path
    return path


def engine_dir() -> str | None:
    """Engine processes: the folder to publish to (None: no front end asked for one)."""
    return settings.env_setting(DIR_ENV)


def publish(directory: str, name: str, data: dict) -> None:
    """Write ``name.json`` in ``directory`` atomically (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(directory, f"{name}.json"))


def read_all(directory: str, prefix: str) -> list[dict]:
    """Every published ``prefix*.json`` of ``directory`` (unreadable ones skipped)."""
    out = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        if name.startswith(prefix) and name.endswith(".json"):
            try:
                with open(os.path.join(directory, name)) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue
    return out


class FileCollector:
    """A ``prometheus_client`` collector: ``families(files)`` turns the published
    files into metric families at scrape time."""

    def __init__(self, directory: str, prefix: str, families: Callable[[list[dict]], Iterable[Any]]):
        self.directory, self.prefix, self.families = directory, prefix, families

    def collect(self):
        yield from self.families(read_all(self.directory, self.prefix))


def register_collector(name: str, collector) -> bool:
    """Register ``collector`` once per process in the registry vLLM's ``/metrics`` serves."""
    from prometheus_client import REGISTRY

    with _lock:
        if name in _registered:
            return False
        REGISTRY.register(collector)
        _registered.add(name)
        return True
