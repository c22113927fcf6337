"""Real vLLM OpenAI servers for the tests (the package's launcher, plus CPU settings)."""

from vllm_trianglemix.tools.server_process import (  # noqa: F401
    ServerHandle,
    free_port,
    launch_server,
    start_server,
)

CPU_ARGS = ["--gpu-memory-utilization", "0.3", "--dtype", "float32", "--enforce-eager"]
