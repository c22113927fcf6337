"""Real vLLM OpenAI servers for the tests (the package's launcher, plus CPU settings)."""

from vllm_trianglemix.tools.server_process import (  # noqa: F401
    ServerHandle,
    free_port,
    launch_server,
    start_server,
)

CPU_ARGS = ["--gpu-memory-utilization", "0.3", "--dtype", "float32", "--enforce-eager"]

START_LIMIT_S = 900
"""A safety limit, not a verdict on speed: a server that is not ready (or not gone, for one
that must exit at start) after this long fails its test with its log. A server takes 30 s to
start on idle cores and has taken 270 s with other vLLM engines on the same two cores; the
wait ends as soon as it answers (or exits)."""
