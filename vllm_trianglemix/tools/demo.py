"""demo: build the tiny demo model, serve it with TriangleMix, answer real requests.

Builds a tiny random Llama locally (no download), starts vLLM's OpenAI server
on it with ``--attention-backend TRIANGLEMIX`` (the bundled demo map picks
layers 2-3), sends a long-prompt completion (long enough for the triangle
path) and a chat request through the OpenAI endpoint, prints the answers and
the server's TriangleMix start-up line, then stops the server (or keeps it
running with ``--keep-serving``). The model has random weights: its words are
noise; the point is the path a request takes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import urllib.request

from vllm_trianglemix.tools.demo_model import build_tiny_llama
from vllm_trianglemix.tools.server_process import start_server

DEFAULT_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
    "vllm-trianglemix",
    "tiny-llama-trianglemix-demo",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", default=DEFAULT_DIR,
                        help="where to build the tiny model (its folder name selects the bundled map)")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--prompt-words", type=int, default=1500)
    parser.add_argument("--keep-serving", action="store_true",
                        help="leave the server running after the demo requests")
    parser.add_argument("--timeout", type=float, default=600.0)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _server_args(on_cpu: bool) -> list[str]:
    args = ["--attention-backend", "TRIANGLEMIX", "--max-model-len", "4096"]
    if on_cpu:
        args += ["--dtype", "float32", "--gpu-memory-utilization", "0.3", "--enforce-eager"]
    return args


def run(args) -> int:
    import torch

    model_dir = build_tiny_llama(args.model_dir)
    server = start_server(model_dir, args.port or None, _server_args(not torch.cuda.is_available()),
                          timeout=args.timeout)
    out = sys.stdout
    try:
        rng = random.Random(0)
        prompt = " ".join(f"w{rng.randrange(1000)}" for _ in range(args.prompt_words))
        done = _post(server.url + "/v1/completions",
                     {"model": model_dir, "prompt": prompt, "max_tokens": 16, "temperature": 0})
        chat = _post(server.url + "/v1/chat/completions",
                     {"model": model_dir, "max_tokens": 12, "temperature": 0,
                      "messages": [{"role": "user", "content": prompt[: 4 * 400]}]})
        started = [line for line in server.log_text().splitlines() if "TriangleMix attention:" in line]
        out.write(f"server: {server.url} (log {server.log_path})\n")
        out.write(f"start-up: {started[0].split('] ', 1)[-1] if started else '(line not found)'}\n")
        out.write(f"/v1/completions: {done['usage']['prompt_tokens']} prompt tokens -> "
                  f"{done['choices'][0]['text']!r}\n")
        out.write(f"/v1/chat/completions: {chat['usage']['prompt_tokens']} prompt tokens -> "
                  f"{chat['choices'][0]['message']['content']!r}\n")
        if args.keep_serving:
            out.write("serving; Ctrl-C to stop\n")
            out.flush()
            server.proc.wait()
        return 0 if started else 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
