"""Density report of the dynamic (XAttention) layers: what a threshold keeps.

Opt-in, with ``--additional-config '{"trianglemix_density_log_interval": 10}'``
(seconds; absent or 0: off, nothing is counted). Then, per dynamic layer, over
the prefills of the last interval:

* an INFO line every interval in which dynamic layers ran, e.g.
  ``TriangleMix dynamic layers, last 10 s: layer 0: kept 41.7% of 1536 key
  blocks (estimate 0.021 s); layer 1: ...``;
* Prometheus metrics on the server's ``/metrics`` (see metrics.py), labelled
  by ``layer``: ``trianglemix:dynamic_kept_blocks_total`` and
  ``trianglemix:dynamic_causal_blocks_total`` (counters: the density over any
  range is the ratio of their increases), ``trianglemix:dynamic_density``
  (gauge: the last interval's), ``trianglemix:dynamic_estimate_seconds_total``
  where the estimate is timed (the CPU path), and
  ``trianglemix:dynamic_report_time_seconds`` (when the counters were last read).

Counting: the dynamic op adds, per query block and KV head, the kept and the
causal key blocks into a small per-layer tensor on the layer's device (GPU:
asynchronous adds, no host sync on the hot path); a daemon thread reads the
tensors once per interval. When the report is off the op gets no tensor and
counts nothing.
"""

from __future__ import annotations

import os
import threading
import time

import torch
from vllm.logger import init_logger

from vllm_trianglemix import metrics

logger = init_logger("vllm.trianglemix")

INTERVAL_KEY = "trianglemix_density_log_interval"
FILE_PREFIX = "density-"
KEPT, CAUSAL, ESTIMATE_S = 0, 1, 2
"""Slots of a layer's counter tensor."""


def interval_from(additional_config: dict | None) -> float:
    """The report interval in seconds (0: off), validated; raises ValueError naming the key."""
    value = (additional_config or {}).get(INTERVAL_KEY, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(
            f"--additional-config {INTERVAL_KEY}: must be a number of seconds >= 0 "
            f"(0: off), got {value!r}"
        )
    return float(value)


class DensityMeter:
    """Per-process counters of the dynamic layers, read by a daemon thread."""

    def __init__(self, interval_s: float, directory: str | None, rank: int):
        self.interval_s = interval_s
        self.directory = directory
        self.rank = rank
        self._counts: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._last: dict[int, list[float]] = {}
        self._totals: dict[int, list[float]] = {}
        self._density: dict[int, float] = {}
        self._thread = threading.Thread(target=self._loop, name="trianglemix-density", daemon=True)
        self._thread.start()

    def counts(self, layer: int, device) -> torch.Tensor:
        """The counter tensor of ``layer`` (float64 [3]) on ``device``, made on first use."""
        t = self._counts.get(layer)
        if t is None:
            with self._lock:
                t = self._counts.setdefault(layer, torch.zeros(3, dtype=torch.float64, device=device))
        return t

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            try:
                self.flush()
            except Exception:  # a report must never take the engine down
                logger.exception("TriangleMix: density report failed")

    def flush(self) -> dict[int, list[float]]:
        """Read the counters, log the last interval, publish the totals; returns the window."""
        with self._lock:
            layers = sorted(self._counts)
            now = {i: self._counts[i].tolist() for i in layers}  # one read per layer
        window = {}
        for i in layers:
            prev = self._last.get(i, [0.0, 0.0, 0.0])
            delta = [a - b for a, b in zip(now[i], prev)]
            self._last[i] = now[i]
            if delta[CAUSAL] > 0:
                window[i] = delta
                self._density[i] = delta[KEPT] / delta[CAUSAL]
        if window:
            logger.info("TriangleMix dynamic layers, last %g s: %s", self.interval_s, "; ".join(
                f"layer {i}: kept {100 * d[KEPT] / d[CAUSAL]:.1f}% of {int(d[CAUSAL])} key blocks"
                + (f" (estimate {d[ESTIMATE_S]:.3f} s)" if d[ESTIMATE_S] > 0 else "")
                for i, d in window.items()))
        if self.directory is not None:  # every interval: readers see when the last report was
            metrics.publish(self.directory, f"{FILE_PREFIX}rank{self.rank}-pid{os.getpid()}", {
                "time": time.time(),
                "layers": {str(i): {"kept": now[i][KEPT], "causal": now[i][CAUSAL],
                                    "estimate_s": now[i][ESTIMATE_S],
                                    "density": self._density.get(i)} for i in layers},
            })
        return window


_meter: DensityMeter | None = None
_meter_lock = threading.Lock()


def meter_for(vllm_config) -> DensityMeter | None:
    """This process's meter when the engine turned the report on (else None)."""
    global _meter
    additional = vllm_config.additional_config or {}
    interval = interval_from(additional)
    if interval <= 0:
        return None
    with _meter_lock:
        if _meter is None:
            _meter = DensityMeter(interval, metrics.engine_dir(), _rank())
    return _meter


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def metric_families(files: list[dict]):
    """Prometheus families from every rank's published totals (summed per layer)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    kept = CounterMetricFamily("trianglemix:dynamic_kept_blocks", "Key blocks XAttention kept in "
                               "dynamic layers (per query block and KV head)", labels=["layer"])
    causal = CounterMetricFamily("trianglemix:dynamic_causal_blocks", "Causal key blocks XAttention "
                                 "chose from in dynamic layers", labels=["layer"])
    est = CounterMetricFamily("trianglemix:dynamic_estimate_seconds", "Time spent in the XAttention "
                              "estimate (where timed: the CPU path)", labels=["layer"])
    density = GaugeMetricFamily("trianglemix:dynamic_density", "Fraction of causal key blocks kept "
                                "in the last report interval", labels=["layer"])
    when = GaugeMetricFamily("trianglemix:dynamic_report_time_seconds",
                             "When the engine last published the dynamic layers' counters (Unix time)")
    totals: dict[str, list[float]] = {}
    dens: dict[str, list[float]] = {}
    times: list[float] = []
    for f in files:
        times.append(f.get("time", 0.0))
        for layer, v in f.get("layers", {}).items():
            t = totals.setdefault(layer, [0.0, 0.0, 0.0])
            t[0] += v["kept"]
            t[1] += v["causal"]
            t[2] += v["estimate_s"]
            if v.get("density") is not None:
                dens.setdefault(layer, []).append(v["density"])
    for layer in sorted(totals, key=int):
        kept.add_metric([layer], totals[layer][0])
        causal.add_metric([layer], totals[layer][1])
        if totals[layer][2] > 0:
            est.add_metric([layer], totals[layer][2])
        if layer in dens:
            density.add_metric([layer], sum(dens[layer]) / len(dens[layer]))
    if times:
        when.add_metric([], max(times))
    yield from (kept, causal, est, density, when)


def install_collector(vllm_config) -> None:
    """Front end: when the report is on, make the metrics folder and serve its metrics."""
    if not isinstance(vllm_config.additional_config, dict):
        return
    if interval_from(vllm_config.additional_config) <= 0:
        return
    directory = metrics.make_dir()
    metrics.register_collector(
        f"density:{directory}", metrics.FileCollector(directory, FILE_PREFIX, metric_families))
