"""Load an OpenAI-compatible server with mixed, cancelled and malformed requests.

Sends ``--requests`` completions, ``--concurrency`` at a time, to a running
server (``--url``) or to one it starts (``--model MODEL [-- vllm serve
arguments]``). Prompts are token ids (the completions API takes a list of
ints), so no tokenizer is needed here. The mix:

* prompt lengths from ``--lengths`` (a list ``64,2000,16000``, drawn
  uniformly, or a range ``64-16000``), clipped to the server's
  ``max_model_len``; ``--prefix-share`` of them start with one shared prefix
  (``--prefix-len`` tokens), to exercise prefix caching;
* ``--stream-fraction`` streamed, the rest not; every one asks for
  ``logprobs`` and each returned logprob must be finite;
* ``--abort-fraction`` streamed and cancelled by closing the connection,
  after a random number of chunks or after a random time (often inside the
  prefill of a long prompt);
* ``--malformed-fraction`` malformed (invalid JSON, wrong types, negative or
  huge ``max_tokens``, a prompt over ``max_model_len``, an empty prompt,
  out-of-range token ids), each of which must be answered 4xx.

Before and after the load, ``--probe-prompts`` fixed prompts are sent alone
(greedy, with prompt logprobs): the answers must be the same after the load.
Afterwards ``/health`` must answer, the server's ``/metrics`` must show
nothing running or waiting, no KV cache in use and none of the plugin's
per-request state (``trianglemix_tracked_requests``; the summary also reports
``trianglemix_tracked_requests_max``, the most it held in one step since the
server started), and its log (the one of
a server it started, or ``--server-log``) no ERROR line. A JSON summary goes
to stdout (and ``--output``); the exit code is 0 only if nothing was lost or
wrong. The run is bounded by ``--timeout`` seconds.

Problems it can know before a server starts end in one line and exit status 2
(``vllm-trianglemix soak: error: ...``): a bad option, a ``--url`` where no
server answers, a missing model folder, a model folder without a tokenizer
(vLLM's server needs one: ``-- --tokenizer ...``), a TriangleMix server whose
layer map does not fit the model (``serve``'s own check, same line).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict

from vllm_trianglemix.tools.errors import (
    ToolError,
    existing_file,
    has_tokenizer,
    http_url,
    model_folder_or_hub_id,
    writable_file,
)

MALFORMED_KINDS = (
    "invalid_json",
    "wrong_type",
    "negative_max_tokens",
    "huge_max_tokens",
    "over_max_model_len",
    "empty_prompt",
    "bad_token_id",
)

LOGPROB_FLOOR = -9999.0
"""vLLM writes a -inf logprob as -9999.0 in OpenAI responses."""

REPORTED_METRICS = (
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_preemptions",
    "trianglemix_tracked_requests",
    "trianglemix_tracked_requests_max",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("server")
    target.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="without --url: start `vllm serve MODEL` (arguments after `--`); "
                                        "with --url: the model name to send (default: the server's first)")
    target.add_argument("vllm_args", nargs="*", metavar="-- VLLM_ARGS",
                        help="arguments of `vllm serve` for the server it starts")
    target.add_argument("--server-start-timeout", type=float, default=900.0,
                        help="seconds to wait for a server this tool starts to answer /health")
    target.add_argument("--max-model-len", type=int, default=None,
                        help="default: the server's (from /v1/models)")
    target.add_argument("--vocab-size", type=int, default=None,
                        help="prompt token ids are drawn below it (default: the model folder's "
                             "config.json, else 1000)")
    load = parser.add_argument_group("load")
    load.add_argument("--requests", type=int, default=200, help="requests to send in all")
    load.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    load.add_argument("--lengths", default="64,512,2000",
                      help="prompt lengths in tokens: a list (A,B,C) or a range (MIN-MAX)")
    load.add_argument("--max-tokens", type=int, default=16,
                      help="each request asks for 1..N new tokens")
    load.add_argument("--prefix-share", type=float, default=0.3,
                      help="fraction of prompts that start with the shared prefix")
    load.add_argument("--prefix-len", type=int, default=None,
                      help="shared prefix length (default: half the longest length)")
    load.add_argument("--stream-fraction", type=float, default=0.5,
                      help="share of the well-formed requests sent with stream=true")
    load.add_argument("--abort-fraction", type=float, default=0.1,
                      help="fraction of (streamed) requests cancelled at a random point")
    load.add_argument("--abort-max-seconds", type=float, default=2.0,
                      help="time-based cancels happen within this many seconds")
    load.add_argument("--malformed-fraction", type=float, default=0.05,
                      help="share of requests that are malformed on purpose (each must get a 4xx)")
    load.add_argument("--logprobs", type=int, default=1, help="top logprobs asked per token")
    load.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the load")
    load.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the request mix")
    check = parser.add_argument_group("checks and output")
    check.add_argument("--probe-prompts", type=int, default=2,
                       help="fixed prompts compared before and after the load (0: none)")
    check.add_argument("--probe-len", type=int, default=12288,
                       help="the longest probe prompt (clipped to the longest load prompt; prompt "
                            "logprobs cost a vocabulary-wide row per token)")
    check.add_argument("--probe-tolerance", type=float, default=1e-3,
                       help="largest prompt-logprob change allowed for the probes")
    check.add_argument("--settle-seconds", type=float, default=30.0,
                       help="after the load, wait up to this long for running/waiting to reach 0")
    check.add_argument("--timeout", type=float, default=600.0,
                       help="the whole load stops after this many seconds")
    check.add_argument("--request-timeout", type=float, default=None,
                       help="one request (default: --timeout)")
    check.add_argument("--server-log", help="with --url: the server's log, checked for ERROR lines "
                                            "(a server it starts: its own log)")
    check.add_argument("--no-release-check", action="store_true",
                       help="do not require running/waiting requests, KV-cache usage and the "
                            "plugin's tracked requests at 0 after the load (a server with other traffic)")
    check.add_argument("--output", help="also write the JSON summary here")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- The plan: what each request is ----------------------------------------


@dataclasses.dataclass
class Job:
    index: int
    kind: str  # "stream", "plain", "abort" or "malformed:<kind>"
    prompt: list[int] = dataclasses.field(default_factory=list)
    max_tokens: int = 1
    abort_after_chunks: int | None = None
    abort_after_s: float | None = None


def parse_lengths(spec: str) -> tuple[str, list[int]]:
    """'64,2000' -> ('choice', [64, 2000]); '64-16000' -> ('range', [64, 16000])."""
    spec = spec.replace(" ", "")
    try:
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-"))
            if not 1 <= lo <= hi:
                raise ValueError
            return "range", [lo, hi]
        values = [int(x) for x in spec.split(",") if x]
        if not values or min(values) < 1:
            raise ValueError
        return "choice", values
    except ValueError:
        raise ValueError(f"--lengths: expected A,B,C or MIN-MAX of positive ints, got {spec!r}") from None


def build_plan(n: int, lengths: str, max_model_len: int, vocab_size: int, *, max_tokens: int = 16,
               prefix_share: float = 0.3, prefix_len: int | None = None, stream_fraction: float = 0.5,
               abort_fraction: float = 0.1, abort_max_seconds: float = 2.0,
               malformed_fraction: float = 0.05, seed: int = 0) -> list[Job]:
    """Every request of a run, deterministic for a seed. Malformed kinds take turns."""
    rng = random.Random(seed)
    mode, values = parse_lengths(lengths)
    lo_id, hi_id = token_id_range(vocab_size)
    cap = max(1, max_model_len - max_tokens)
    longest = min(max(values), cap)
    prefix_len = min(longest // 2 if prefix_len is None else prefix_len, cap)
    prefix = [rng.randrange(lo_id, hi_id) for _ in range(prefix_len)]
    n_malformed = round(n * malformed_fraction)
    n_abort = round(n * abort_fraction)
    kinds = ([f"malformed:{MALFORMED_KINDS[i % len(MALFORMED_KINDS)]}" for i in range(n_malformed)]
             + ["abort"] * n_abort)
    kinds += ["stream" if rng.random() < stream_fraction else "plain" for _ in range(n - len(kinds))]
    rng.shuffle(kinds)
    jobs = []
    for i, kind in enumerate(kinds[:n]):
        length = rng.choice(values) if mode == "choice" else rng.randint(*values)
        length = min(length, cap)
        head = prefix if prefix and length > prefix_len and rng.random() < prefix_share else []
        prompt = head + [rng.randrange(lo_id, hi_id) for _ in range(length - len(head))]
        job = Job(i, kind, prompt, rng.randint(1, max_tokens))
        if kind == "abort":
            if rng.random() < 0.5:
                job.abort_after_chunks = rng.randint(0, job.max_tokens)
            else:
                job.abort_after_s = rng.uniform(0.0, abort_max_seconds)
        jobs.append(job)
    return jobs


def token_id_range(vocab_size: int) -> tuple[int, int]:
    """Ordinary tokens: above the low special ids, below the high ones."""
    return max(3, vocab_size // 10), max(4, vocab_size * 9 // 10)


def malformed_body(kind: str, model: str, max_model_len: int, vocab_size: int) -> bytes:
    base = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 4}
    lo_id, _ = token_id_range(vocab_size)
    if kind == "invalid_json":
        return b'{"model": "' + model.encode() + b'", "prompt": [1, 2,'
    if kind == "wrong_type":
        base.update(max_tokens="four", temperature=[0.0])
    elif kind == "negative_max_tokens":
        base["max_tokens"] = -5
    elif kind == "huge_max_tokens":
        base["max_tokens"] = 10 * max_model_len + 10**9
    elif kind == "over_max_model_len":
        base["prompt"] = [lo_id] * (max_model_len + 1)
    elif kind == "empty_prompt":
        base["prompt"] = []
    elif kind == "bad_token_id":
        base["prompt"] = [lo_id, vocab_size + 10**6, 2**31 - 1]
    else:
        raise ValueError(kind)
    return json.dumps(base).encode()


# -- Sending ---------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    kind: str
    status: str  # "ok", "aborted", "rejected" (malformed, 4xx as expected) or "error"
    error: str | None = None
    http_status: int | None = None
    latency: float | None = None
    ttft: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs_seen: int = 0
    non_finite: int = 0


def count_logprobs(logprobs) -> tuple[int, int]:
    """(seen, non-finite) over an OpenAI completions ``logprobs`` object."""
    if not logprobs:
        return 0, 0
    seen = bad = 0
    values = list(logprobs.get("token_logprobs") or [])
    for top in logprobs.get("top_logprobs") or []:
        values.extend((top or {}).values())
    for v in values:
        seen += 1
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= LOGPROB_FLOOR:
            bad += 1
    return seen, bad


def _body(job: Job, model: str, logprobs: int, temperature: float, stream: bool) -> dict:
    body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens,
            "temperature": temperature, "logprobs": logprobs, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def send(client, url: str, model: str, job: Job, *, logprobs: int, temperature: float,
               max_model_len: int, vocab_size: int, request_timeout: float) -> Outcome:
    import httpx

    start = time.monotonic()
    try:
        if job.kind.startswith("malformed:"):
            kind = job.kind.split(":", 1)[1]
            r = await client.post(url + "/v1/completions", content=malformed_body(
                kind, model, max_model_len, vocab_size), headers={"Content-Type": "application/json"},
                timeout=request_timeout)
            if 400 <= r.status_code < 500:
                return Outcome(job.kind, "rejected", http_status=r.status_code)
            return Outcome(job.kind, "error", f"malformed_{kind}_got_{r.status_code}", r.status_code)
        if job.kind == "plain":
            r = await client.post(url + "/v1/completions", timeout=request_timeout,
                                  json=_body(job, model, logprobs, temperature, False))
            if r.status_code != 200:
                return Outcome(job.kind, "error", f"http_{r.status_code}", r.status_code)
            data = r.json()
            seen, bad = count_logprobs(data["choices"][0].get("logprobs"))
            usage = data.get("usage") or {}
            return Outcome(job.kind, "ok", http_status=200, latency=time.monotonic() - start,
                           prompt_tokens=usage.get("prompt_tokens", 0),
                           completion_tokens=usage.get("completion_tokens", 0),
                           logprobs_seen=seen, non_finite=bad)
        out = Outcome(job.kind, "ok")
        stream = _stream(client, url, model, job, logprobs, temperature, request_timeout, start, out)
        if job.abort_after_s is not None:
            try:
                return await asyncio.wait_for(stream, job.abort_after_s)
            except asyncio.TimeoutError:
                out.status, out.latency = "aborted", time.monotonic() - start
                return out
        return await stream
    except httpx.TimeoutException:
        return Outcome(job.kind, "error", "timeout", latency=time.monotonic() - start)
    except httpx.HTTPError as e:
        return Outcome(job.kind, "error", f"transport_{type(e).__name__}")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return Outcome(job.kind, "error", f"bad_response_{type(e).__name__}")


async def _stream(client, url, model, job: Job, logprobs, temperature, request_timeout, start,
                  out: Outcome) -> Outcome:
    """Read a streamed completion into ``out`` (which the caller keeps if it cancels)."""
    chunks = 0
    async with client.stream("POST", url + "/v1/completions", timeout=request_timeout,
                             json=_body(job, model, logprobs, temperature, True)) as r:
        out.http_status = r.status_code
        if r.status_code != 200:
            await r.aread()
            return Outcome(job.kind, "error", f"http_{r.status_code}", r.status_code)
        if job.abort_after_chunks == 0:
            out.status, out.latency = "aborted", time.monotonic() - start
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            data = json.loads(payload)
            if "error" in data:
                return Outcome(job.kind, "error", "stream_error", r.status_code)
            if data.get("usage"):
                out.prompt_tokens = data["usage"].get("prompt_tokens", 0)
                out.completion_tokens = data["usage"].get("completion_tokens", 0)
            for choice in data.get("choices") or []:
                seen, bad = count_logprobs(choice.get("logprobs"))
                out.logprobs_seen += seen
                out.non_finite += bad
            if data.get("choices"):
                chunks += 1
                if chunks == 1:
                    out.ttft = time.monotonic() - start
            if job.abort_after_chunks is not None and chunks >= job.abort_after_chunks:
                out.status, out.latency = "aborted", time.monotonic() - start
                return out
    out.latency = time.monotonic() - start
    if job.kind == "abort":
        out.error = "finished_before_cancel"
    return out


async def run_load(url: str, model: str, jobs: list[Job], *, concurrency: int, timeout: float,
                   request_timeout: float, logprobs: int = 1, temperature: float = 0.0,
                   max_model_len: int, vocab_size: int, progress: bool = True):
    """Send ``jobs``; returns (outcomes, wall seconds, number not finished in time)."""
    import httpx
    from tqdm import tqdm

    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    outcomes: list[Outcome] = []
    bar = tqdm(total=len(jobs), desc="soak", unit="req", disable=not progress, file=sys.stderr)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(limits=limits, timeout=request_timeout) as client:
        async def worker():
            while True:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                outcomes.append(await send(client, url, model, job, logprobs=logprobs,
                                           temperature=temperature, max_model_len=max_model_len,
                                           vocab_size=vocab_size, request_timeout=request_timeout))
                bar.update(1)
                if outcomes[-1].status == "error":
                    bar.set_postfix(errors=sum(o.status == "error" for o in outcomes))

        start = time.monotonic()
        tasks = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.monotonic() - start
    bar.close()
    return outcomes, wall, len(jobs) - len(outcomes)


# -- Probes, health, metrics -----------------------------------------------


def probe_prompts(n: int, max_len: int, vocab_size: int, seed: int = 1234) -> list[list[int]]:
    rng = random.Random(seed)
    lo_id, hi_id = token_id_range(vocab_size)
    lengths = [max(2, max_len // (2 ** i)) for i in range(n)]
    return [[rng.randrange(lo_id, hi_id) for _ in range(n_tok)] for n_tok in lengths]


def probe(url: str, model: str, prompts: list[list[int]], timeout: float = 600.0) -> list[dict]:
    """Greedy tokens and prompt logprobs of each prompt, sent one at a time."""
    import httpx

    answers = []
    with httpx.Client(timeout=timeout) as client:
        for prompt in prompts:
            r = client.post(url + "/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                "logprobs": 1, "prompt_logprobs": 1})
            r.raise_for_status()
            choice = r.json()["choices"][0]
            lps = choice.get("prompt_logprobs") or []
            prompt_lps = [None if d is None else d[str(t)]["logprob"] for d, t in zip(lps, prompt)]
            answers.append({"text": choice["text"], "tokens": choice["logprobs"]["tokens"],
                            "prompt_logprobs": prompt_lps})
    return answers


def compare_probes(before: list[dict], after: list[dict], tolerance: float) -> dict:
    tokens_equal = all(a["tokens"] == b["tokens"] for a, b in zip(before, after))
    diff = 0.0
    for a, b in zip(before, after):
        for x, y in zip(a["prompt_logprobs"], b["prompt_logprobs"]):
            if x is not None and y is not None:
                diff = max(diff, abs(x - y))
    return {"prompts": len(before), "tokens_equal": tokens_equal, "max_prompt_logprob_diff": diff,
            "ok": tokens_equal and diff <= tolerance}


def health(url: str, timeout: float = 10.0) -> bool:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def read_metrics(url: str, names=REPORTED_METRICS, timeout: float = 10.0) -> dict[str, float]:
    """Sum of each named metric's samples on ``/metrics`` (counters: their ``_total``)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=timeout).text
    except httpx.HTTPError:
        return {}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in names:
            continue
        for s in family.samples:
            if s.name in (family.name, family.name + "_total"):
                found[family.name] = found.get(family.name, 0.0) + s.value
    return found


def settle(url: str, seconds: float) -> dict[str, float]:
    """Wait until nothing runs or waits (vLLM's gauges), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        m = read_metrics(url)
        busy = m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)
        if busy == 0 or time.monotonic() >= deadline:
            return m
        time.sleep(0.5)


# -- Summary ---------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def summarize(outcomes: list[Outcome], wall: float, unfinished: int) -> dict:
    status = Counter(o.status for o in outcomes)
    errors = Counter(o.error for o in outcomes if o.status == "error")
    malformed: dict[str, dict[str, int]] = defaultdict(Counter)
    for o in outcomes:
        if o.kind.startswith("malformed:"):
            malformed[o.kind.split(":", 1)[1]][str(o.http_status)] += 1
    done = [o for o in outcomes if o.status == "ok"]
    lat = [o.latency for o in done if o.latency is not None]
    ttft = [o.ttft for o in done if o.ttft is not None]
    prompt_tokens = sum(o.prompt_tokens for o in done)
    return {
        "requests": len(outcomes) + unfinished,
        "ok": status["ok"],
        "aborted": status["aborted"],
        "aborted_before_first_token": sum(o.status == "aborted" and o.ttft is None for o in outcomes),
        "aborts_finished_first": sum(o.error == "finished_before_cancel" for o in outcomes),
        "malformed_rejected_4xx": status["rejected"],
        "malformed_status_by_kind": {k: dict(v) for k, v in sorted(malformed.items())},
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "unfinished_at_timeout": unfinished,
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sum(o.completion_tokens for o in done),
        "prompt_tokens_per_s": prompt_tokens / wall if wall > 0 else None,
        "logprobs_checked": sum(o.logprobs_seen for o in outcomes),
        "non_finite_logprobs": sum(o.non_finite for o in outcomes),
        "wall_s": wall,
    }


def released(metrics_after: dict[str, float]) -> bool:
    """Nothing running or waiting, no KV cache in use, no plugin state held (where reported)."""
    return all(metrics_after.get(name, 0) == 0 for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "trianglemix_tracked_requests"))


def log_errors(path: str | None) -> list[str] | None:
    """ERROR and Traceback lines of a server log (None: no log given)."""
    if not path:
        return None
    with open(path, errors="replace") as f:
        return [line.rstrip() for line in f if " ERROR " in line or "Traceback" in line]


def passed(summary: dict) -> bool:
    return (summary["errors"] == 0 and summary["unfinished_at_timeout"] == 0
            and summary["non_finite_logprobs"] == 0 and summary["server_alive_after"]
            and summary.get("probe", {}).get("ok", True)
            and summary.get("released_after", True)
            and not summary.get("server_log_errors"))


# -- The command -----------------------------------------------------------


def _server_info(url: str, model: str | None) -> tuple[str, int | None, str | None]:
    """(model id, max_model_len, root) from the server's ``/v1/models``; ToolError if it
    does not answer as an OpenAI server does."""
    import httpx

    try:
        r = httpx.get(url + "/v1/models", timeout=30)
    except httpx.ConnectError:
        raise ToolError(f"--url {url}: no server answers there (connection refused); start one "
                        "(`vllm-trianglemix serve MODEL ...`) and wait until it logs "
                        "'Application startup complete', or give --model MODEL instead of --url "
                        "to let soak start one") from None
    except httpx.TimeoutException:
        raise ToolError(f"--url {url}: no answer from /v1/models within 30 s") from None
    except httpx.HTTPError as e:
        raise ToolError(f"--url {url}: /v1/models failed: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise ToolError(f"--url {url}: /v1/models answered HTTP {r.status_code}: "
                        + " ".join(r.text[:200].split()))
    try:
        cards = r.json()["data"]
        card = next((c for c in cards if c["id"] == model), cards[0]) if model else cards[0]
        return card["id"], card.get("max_model_len"), card.get("root")
    except (ValueError, KeyError, IndexError, TypeError):
        raise ToolError(f"--url {url}: /v1/models did not answer as an OpenAI server does "
                        "(is this vLLM's server?)") from None


def _vocab_from(name_or_path: str | None) -> int | None:
    """The model's vocabulary size from its config (a folder, or the local Hugging Face cache)."""
    if not name_or_path:
        return None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except Exception:  # not a model folder, not cached here: the caller falls back
        return None
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    return getattr(cfg, "vocab_size", None)


def soak(args, url: str, server_log: str | None = None) -> dict:
    model, server_len, root = _server_info(url, args.model if args.url else None)
    max_model_len = args.max_model_len or server_len
    if not max_model_len:
        raise ToolError("the server does not report max_model_len; pass --max-model-len")
    vocab = args.vocab_size or _vocab_from(root) or _vocab_from(args.model) or 1000
    jobs = build_plan(args.requests, args.lengths, max_model_len, vocab, max_tokens=args.max_tokens,
                      prefix_share=args.prefix_share, prefix_len=args.prefix_len,
                      stream_fraction=args.stream_fraction, abort_fraction=args.abort_fraction,
                      abort_max_seconds=args.abort_max_seconds,
                      malformed_fraction=args.malformed_fraction, seed=args.seed)
    longest = max((len(j.prompt) for j in jobs if not j.kind.startswith("malformed")), default=64)
    probes = probe_prompts(args.probe_prompts, min(longest, args.probe_len), vocab)
    request_timeout = args.request_timeout or args.timeout
    before = probe(url, model, probes, request_timeout) if probes else []
    metrics_before = read_metrics(url)
    outcomes, wall, unfinished = asyncio.run(run_load(
        url, model, jobs, concurrency=args.concurrency, timeout=args.timeout,
        request_timeout=request_timeout, logprobs=args.logprobs, temperature=args.temperature,
        max_model_len=max_model_len, vocab_size=vocab, progress=not args.no_progress))
    summary = {"url": url, "model": model, "max_model_len": max_model_len, "vocab_size": vocab,
               "concurrency": args.concurrency, "lengths": args.lengths, **summarize(outcomes, wall, unfinished),
               # the plan's cancels: each one is aborted or finishes first; those at chunk 0 close the
               # stream before its first token (whatever the machine's speed)
               "aborts_planned": sum(j.kind == "abort" for j in jobs),
               "aborts_at_start": sum(j.kind == "abort" and j.abort_after_chunks == 0 for j in jobs)}
    metrics_after = settle(url, args.settle_seconds)
    if probes:
        summary["probe"] = compare_probes(before, probe(url, model, probes, request_timeout),
                                          args.probe_tolerance)
    summary["server_alive_after"] = health(url)
    if not args.no_release_check:
        summary["released_after"] = released(metrics_after)
    summary["metrics_before"] = metrics_before
    summary["metrics_after"] = metrics_after
    errors = log_errors(server_log or args.server_log)
    if errors is not None:
        summary["server_log_errors"] = errors[:20]
    summary["passed"] = passed(summary)
    return summary


def check_arguments(args) -> None:
    """The options alone (no server): ToolError naming the option."""
    if not args.url and not args.model:
        raise ToolError("give --url of a running server, or --model to start one")
    try:
        parse_lengths(args.lengths)
    except ValueError as e:
        raise ToolError(str(e)) from None
    for name in ("prefix_share", "stream_fraction", "abort_fraction", "malformed_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ToolError(f"--{name.replace('_', '-')} must be within [0, 1], "
                            f"got {getattr(args, name)}")
    if args.abort_fraction + args.malformed_fraction > 1.0:
        raise ToolError("--abort-fraction + --malformed-fraction must be at most 1")
    if args.requests < 1 or args.concurrency < 1:
        raise ToolError("--requests and --concurrency must be >= 1")
    if args.url and args.vllm_args:
        raise ToolError(f"server arguments {args.vllm_args} need --model (a server to start), "
                        "not --url")
    if args.server_log:
        existing_file(args.server_log, "--server-log")
    if args.output:
        writable_file(args.output, "--output")


def check_server_to_start(model: str, vllm_args: list[str]) -> str:
    """Before starting ``serve MODEL VLLM_ARGS``: the model folder, its tokenizer, and
    ``serve``'s map check. Returns the model to serve; raises ToolError (or the map's error)."""
    from vllm_trianglemix.tools.serve import check_before_start

    model = model_folder_or_hub_id(model)
    check_before_start([model, *vllm_args])
    if os.path.isdir(model) and not has_tokenizer(model) and not any(
            a == "--tokenizer" or a.startswith("--tokenizer=") for a in vllm_args):
        raise ToolError(f"--model: model folder {model} has no tokenizer (none of tokenizer.json, "
                        "tokenizer_config.json, tokenizer.model) and vLLM's server needs one: add "
                        "the tokenizer's files, or pass one after `--`: -- --tokenizer "
                        "TOKENIZER_FOLDER_OR_NAME")
    return model


def _start(model: str, vllm_args: list[str], timeout: float):
    from vllm_trianglemix.tools.server_process import launch_server

    # vLLM gathers every process's metrics (the plugin's gauge lives in the
    # engine's worker) only with a multiprocess directory set at start.
    env = {} if "PROMETHEUS_MULTIPROC_DIR" in os.environ else {
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="vllm-soak-metrics-")}
    server = launch_server(model, extra_args=vllm_args, env=env)
    try:
        return server.wait_ready(timeout)
    except RuntimeError:
        server.stop()
        lines = [line.strip() for line in server.log_text().splitlines() if line.strip()]
        errors = [line for line in lines if " ERROR " in line or "error:" in line.lower()]
        last = (errors or lines or [None])[-1]
        state = (f"exited with status {server.proc.returncode}" if server.proc.returncode is not None
                 else f"did not answer /health within {timeout:g} s (--server-start-timeout)")
        raise ToolError(f"the server it started {state}" + (f" ({last})" if last else "")
                        + f"; its log: {server.log_path}") from None


def run(args) -> int:
    import httpx

    check_arguments(args)
    server = None
    if args.url:
        url = http_url(args.url, "--url")
        _server_info(url, args.model)  # answers, as an OpenAI server
    else:
        model = check_server_to_start(args.model, args.vllm_args)
        server = _start(model, args.vllm_args, args.server_start_timeout)
        url = server.url
        print(f"soak: started server {url}, log {server.log_path}", file=sys.stderr)
    try:
        try:
            summary = soak(args, url, server.log_path if server is not None else None)
        except httpx.HTTPError as e:
            raise ToolError(f"the server at {url} stopped answering: {type(e).__name__}: {e}") from None
        if server is not None:
            summary["server_log"] = server.log_path
    finally:
        if server is not None:
            server.stop()
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0 if summary["passed"] else 1
