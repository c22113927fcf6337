"""The tiny hybrid (Qwen3-Next) through `vllm serve --attention-backend TRIANGLEMIX`
(``vllm-trianglemix serve``, vLLM's own CLI; bfloat16, which vLLM's CPU Gated
DeltaNet needs): the start-up lines, a completion whose logprobs follow the
exact rule, and a chat answer.
"""

import json

import pytest
import requests

from tests.e2e_cpu.conftest import HYBRID_MAP, random_prompt
from tests.e2e_cpu.test_hybrid_exact import TOL
from tests.servers import START_LIMIT_S, launch_server

pytestmark = pytest.mark.e2e

ARGS = ["--max-model-len", "4096", "--gpu-memory-utilization", "0.3", "--dtype", "bfloat16",
        "--enforce-eager", "--attention-backend", "TRIANGLEMIX"]


@pytest.fixture(scope="module")
def server(hybrid_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("maps") / "hybrid-starting-point.yaml"
    path.write_text(HYBRID_MAP + 'notes: "UNCALIBRATED starting point for the test"\n')
    handle = launch_server(hybrid_model_dir, extra_args=ARGS + [
        "--additional-config", json.dumps({"trianglemix_config": str(path)})])
    try:
        handle.wait_ready(timeout=START_LIMIT_S)
        yield handle, str(path)
    finally:
        handle.stop()


def test_startup_lines(server):
    handle, path = server
    log = handle.log_text()
    assert ("TriangleMix attention: layers 3 (n_init=4, n_local=64, n_last=16); "
            "layers 7 (n_init=32, n_local=32, n_last=16)") in log
    assert f"map {path} is an uncalibrated starting point" in log


def test_completion_follows_the_exact_rule_and_chat_answers(server, hybrid_model_dir,
                                                            hybrid_reference, hybrid_map):
    handle, _ = server
    prompt = random_prompt(700, seed=8)
    r = requests.post(handle.url + "/v1/completions", timeout=300, json={
        "model": hybrid_model_dir, "prompt": prompt, "max_tokens": 1, "temperature": 0,
        "logprobs": 5})
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    ref = hybrid_reference.logprobs(prompt, hybrid_map)[-1]
    got = {int(t.removeprefix("w")) + 3: lp for t, lp in top.items()}
    assert max(abs(lp - ref[t].item()) for t, lp in got.items()) < TOL
    words = " ".join(f"w{i % 1000}" for i in range(0, 3500, 7))
    r = requests.post(handle.url + "/v1/chat/completions", timeout=300, json={
        "model": hybrid_model_dir, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": words}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
