"""`vllm-trianglemix check-accuracy` against two real vLLM servers of the tiny model on CPU.

One server is stock, the other runs ``--attention-backend TRIANGLEMIX`` with a
copy of the bundled tiny map's dynamic variant (triangle layers 2-3, XAttention
in 0-1) and the density report on (every second): conftest's
``user_map_server``, shared with test_server.py. Prompts shorter than the map's
``min_prompt_len`` run dense on both, so the two must agree exactly; longer
prompts exercise the pattern and the tool must report them end to end, with
the densities the server reported on ``/metrics`` (and in its log) for this run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.servers import CPU_ARGS, START_LIMIT_S, launch_server
from vllm_trianglemix.config import bundled_map_paths, load_layer_map

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_map():
    path = next(p for p in bundled_map_paths() if p.endswith("tiny-llama-demo-dynamic.yaml"))
    return path, load_layer_map(path)


@pytest.fixture(scope="module")
def servers(model_dir, user_map_server):
    dense = launch_server(model_dir, extra_args=["--max-model-len", "4096", *CPU_ARGS])
    try:
        tm = user_map_server.handle()
        yield dense.wait_ready(timeout=START_LIMIT_S), tm
    finally:
        dense.stop()


def check_args(servers, report, *extra):
    dense, tm = servers
    return ["check-accuracy", "--dense-url", dense.url, "--trianglemix-url", tm.url,
            "--report", str(report), *extra]


def test_short_prompts_agree_exactly(servers, tiny_map, tmp_path):
    """Below min_prompt_len TriangleMix is dense: same greedy text, same logprobs."""
    prompt_len = tiny_map[1].min_prompt_len - 28
    report = tmp_path / "short.json"
    cmd = [sys.executable, "-m", "vllm_trianglemix",
           *check_args(servers, report, "--prompt-len", str(prompt_len), "--num-prompts", "3",
                       "--max-tokens", "8", "--min-agreement", "1.0")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "agreement 1.000" in proc.stdout
    result = json.loads(report.read_text())
    assert result["summary"]["agreement"] == 1.0
    rows = result["prompts"]
    assert len(rows) == 3
    for row in rows:
        assert row["prompt_tokens"] == prompt_len
        assert row["match"] and row["first_diff_token"] is None
        assert row["dense_text"] == row["trianglemix_text"] != ""
        assert row["top_tokens_shared"] >= 1
        assert row["top_logprob_max_abs_delta"] <= 1e-4
        assert isinstance(row["dense_found"], bool) and row["answer"].startswith("w")


def test_long_prompts_run_end_to_end(servers, tiny_map, tmp_path, capsys):
    """Above min_prompt_len the triangle layers change the logits; the tool reports
    them, and exits 1 when the agreement is under --min-agreement (1.01: always)."""
    from vllm_trianglemix.tools.cli import main

    report = tmp_path / "long.json"
    rc = main(check_args(servers, report, "--prompt-len", "600", "--num-prompts", "2",
                         "--max-tokens", "8", "--min-agreement", "1.01", "--density-wait", "600"))
    assert rc == 1
    out = capsys.readouterr().out
    assert "BELOW MINIMUM" in out
    result = json.loads(report.read_text())
    summary, rows = result["summary"], result["prompts"]
    assert [r["prompt_tokens"] for r in rows] == [600, 600]
    assert 0.0 <= summary["agreement"] <= 1.0
    assert 0.0 <= summary["dense_accuracy"] <= 1.0
    assert all(r["top_tokens_shared"] >= 1 for r in rows)
    # Layers 2-3 are triangle at 600 tokens: the first token's logprobs must move.
    assert summary["top_logprob_max_abs_delta"] > 1e-6, summary
    # The dynamic layers' densities of this run, read from the server's /metrics.
    dens = summary["dynamic_density"]
    assert sorted(dens) == ["0", "1"] and all(0 < d <= 1 for d in dens.values()), dens
    assert "dynamic layers' density (key blocks kept): layer 0 " in out


def test_density_report_on_metrics_and_in_the_log(servers):
    """Through the real server: Prometheus counters next to vLLM's own on /metrics, and the
    periodic INFO line, per dynamic layer; the counters are consistent with each other."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    _, tm = servers
    text = requests.get(tm.url + "/metrics", timeout=30).text
    assert "vllm:num_requests_running" in text  # vLLM's own metrics, same endpoint
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    kept = {s.labels["layer"]: s.value for s in fams["trianglemix:dynamic_kept_blocks"].samples}
    causal = {s.labels["layer"]: s.value for s in fams["trianglemix:dynamic_causal_blocks"].samples}
    assert sorted(causal) == ["0", "1"], causal  # the test above ran long prompts
    assert all(0 < kept[i] <= causal[i] for i in causal)
    dens = {s.labels["layer"]: s.value for s in fams["trianglemix:dynamic_density"].samples}
    assert all(0 < d <= 1 for d in dens.values()) and sorted(dens) == ["0", "1"]
    est = {s.labels["layer"]: s.value for s in fams["trianglemix:dynamic_estimate_seconds"].samples}
    assert all(v > 0 for v in est.values())
    log = tm.log_text()
    assert "TriangleMix dynamic layers, last 1 s: layer 0: kept " in log
    assert "% of " in log and "key blocks (estimate " in log
