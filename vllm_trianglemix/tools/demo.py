"""Build a tiny random model, serve it with TriangleMix on this machine, send two requests.

Builds a tiny random Llama locally (no download), starts vLLM's OpenAI server
on it with ``--attention-backend TRIANGLEMIX`` (the bundled demo map picks
layers 2-3), sends a long-prompt completion (long enough for the triangle
path) and a chat request through the OpenAI endpoint, prints the answers and
the server's TriangleMix start-up line, then stops the server (or keeps it
running with ``--keep-serving``). It prints where the model is and the
``vllm-trianglemix serve`` command that serves it again, as it runs in a new
shell (the script's full path when the shell would not find it, and the
environment's ``source .../bin/activate`` that puts it on ``PATH``). The model
has random weights: its words are random; the point is the path a request takes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import socket
import sys
import urllib.request

from vllm_trianglemix.tools.command import activate_hint, own_command
from vllm_trianglemix.tools.demo_model import build_tiny_llama
from vllm_trianglemix.tools.errors import ToolError
from vllm_trianglemix.tools.server_process import start_server

DEFAULT_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
    "vllm-trianglemix",
    "tiny-llama-trianglemix-demo",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", default=DEFAULT_DIR,
                        help="where to build the tiny model, or reuse it if it is there "
                        "(its folder name selects the bundled map)")
    parser.add_argument("--port", type=int, default=0, help="the server's port on 127.0.0.1; 0: a free one")
    parser.add_argument("--prompt-words", type=int, default=1500,
                        help="words in the completion prompt (one token each; the triangle "
                        "layers need more than the map's min_prompt_len, 128)")
    parser.add_argument("--keep-serving", action="store_true",
                        help="leave the server running after the demo requests")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the server to start")


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


def serve_again_lines(model_dir: str, server_args: list[str]) -> list[str]:
    """The command that serves the model again, as it runs in a new shell."""
    command = own_command()
    lines = [f"serve it yourself: {shlex.join([*command, 'serve', model_dir, *server_args])}"]
    hint = activate_hint()
    if hint:
        short = shlex.join(["vllm-trianglemix", "serve", model_dir, *server_args])
        lines.append(f"  (or, once per new shell, `{hint}`; then: {short})")
    return lines


def _check_inputs(args) -> None:
    if os.path.exists(args.model_dir) and not os.path.isdir(args.model_dir):
        raise ToolError(f"--model-dir: {args.model_dir} is a file, not a folder")
    if args.prompt_words < 1:
        raise ToolError(f"--prompt-words: must be >= 1, got {args.prompt_words}")
    if not 0 <= args.port < 65536:
        raise ToolError(f"--port: not a port: {args.port}")
    if args.port:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", args.port))
            except OSError:
                raise ToolError(f"--port: {args.port} is in use on 127.0.0.1 "
                                "(give another, or 0 for a free one)") from None


def _last_error(log: str) -> str:
    """The line of a failed server's log that says why (the plugin's ERROR line first)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if " ERROR " in f" {line} " or line.startswith("ERROR"):
            return line
    return lines[-1] if lines else "(empty log)"


def run(args) -> int:
    _check_inputs(args)
    import torch

    try:
        model_dir = build_tiny_llama(args.model_dir)
    except OSError as e:
        raise ToolError(f"--model-dir: cannot build the model in {args.model_dir}: "
                        f"{e.strerror or e}") from None
    server_args = _server_args(not torch.cuda.is_available())
    out = sys.stdout
    out.write(f"model: {model_dir} (tiny random Llama, 4 layers; built once, reused)\n")
    out.write("".join(f"{line}\n" for line in serve_again_lines(model_dir, server_args)))
    out.flush()
    try:
        server = start_server(model_dir, args.port or None, server_args, timeout=args.timeout)
    except RuntimeError as e:
        log = str(e).split(":\n", 1)[-1]
        raise ToolError(f"the vLLM server did not start: {_last_error(log)} "
                        f"({str(e).splitlines()[0]})") from None
    try:
        rng = random.Random(0)
        prompt = " ".join(f"w{rng.randrange(1000)}" for _ in range(args.prompt_words))
        done = _post(server.url + "/v1/completions",
                     {"model": model_dir, "prompt": prompt, "max_tokens": 16, "temperature": 0})
        chat = _post(server.url + "/v1/chat/completions",
                     {"model": model_dir, "max_tokens": 12, "temperature": 0,
                      "messages": [{"role": "user", "content": prompt[: 4 * 400]}]})
        started = [line for line in server.log_text().splitlines() if "TriangleMix attention:" in line]
        out.write(f"start-up: {started[0].split('] ', 1)[-1] if started else '(line not found)'}\n")
        out.write(f"/v1/completions: {done['usage']['prompt_tokens']} prompt tokens -> "
                  f"{done['choices'][0]['text']!r}\n")
        out.write(f"/v1/chat/completions: {chat['usage']['prompt_tokens']} prompt tokens -> "
                  f"{chat['choices'][0]['message']['content']!r}\n")
        out.write("(the model has random weights, so its words are random: the demo shows the "
                  "path a request takes, not an answer)\n")
        out.write(f"server log: {server.log_path}\n")
        if args.keep_serving:
            out.write(f"serving at {server.url} (OpenAI API, model {model_dir}); Ctrl-C to stop\n")
            out.flush()
            server.proc.wait()
        else:
            server.stop()
            out.write("server stopped (--keep-serving leaves it running)\n")
        return 0 if started else 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
