"""Start a vLLM OpenAI server in a child process and wait until it answers.

Used by the demo command and the tests: ``start_server(model, extra_args)``
runs ``vllm-trianglemix serve`` (vLLM's own CLI) in its own process group,
logs to a file, raises with the log's tail if the server exits or is not
ready in time, and ``stop()`` ends the group (API server and engine core).
``launch_server`` returns at once, so several servers can start in parallel.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerHandle:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: str):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return "(no log)"

    def log_tail(self, n_chars: int = 4000) -> str:
        return self.log_text()[-n_chars:]

    def wait_ready(self, timeout: float = 300.0) -> "ServerHandle":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM server on port {self.port} exited with {self.proc.returncode} "
                    f"before it was ready; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(
            f"vLLM server on port {self.port} not ready after {timeout:.0f} s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 30.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=grace)
        except ProcessLookupError:
            pass


def serve_command(model: str, port: int, extra_args=()) -> list[str]:
    return [sys.executable, "-m", "vllm_trianglemix", "serve", str(model),
            "--host", "127.0.0.1", "--port", str(port), *extra_args]


def launch_server(model: str, port: int | None = None, extra_args=(), env=None,
                  command: list[str] | None = None) -> ServerHandle:
    """Start the server in its own process group; ``command`` overrides how."""
    port = port or free_port()
    fd, log_path = tempfile.mkstemp(prefix=f"vllm-server-{port}-", suffix=".log")
    cmd = command or serve_command(model, port, extra_args)
    with os.fdopen(fd, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    return ServerHandle(proc, port, log_path)


def start_server(model: str, port: int | None = None, extra_args=(), timeout: float = 300.0,
                 env=None, command: list[str] | None = None) -> ServerHandle:
    """Start a server and wait until ``/health`` answers; stop it on failure."""
    handle = launch_server(model, port, extra_args, env, command)
    try:
        return handle.wait_ready(timeout)
    except BaseException:
        handle.stop()
        raise
