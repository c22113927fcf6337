"""Measure speed: TriangleMix and the stock backend side by side (kernel, dynamic, ttft, report).

    vllm-trianglemix bench kernel   one triangle layer vs dense FA3 (GPU)
    vllm-trianglemix bench dynamic  one dynamic (XAttention) layer vs dense FA3 (GPU)
    vllm-trianglemix bench ttft     TTFT and decode ITL, dense vs TriangleMix engines
    vllm-trianglemix bench report   BENCHMARKS.md from their JSON results
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "kernel": "vllm_trianglemix.tools.bench_kernel",
    "dynamic": "vllm_trianglemix.tools.bench_dynamic",
    "ttft": "vllm_trianglemix.tools.bench_ttft",
    "report": "vllm_trianglemix.tools.bench_report",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_trianglemix.tools.cli import HelpFormatter

    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)  # light: torch is imported in run()
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                           description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_bench_run=module.run)


def run(args) -> int:
    return int(args._bench_run(args) or 0)


def require_cuda(what: str) -> None:
    import torch

    from vllm_trianglemix.tools.errors import ToolError

    if not torch.cuda.is_available():
        raise ToolError(f"{what} times GPU kernels and needs a CUDA GPU; torch sees none")


def command_line() -> str:
    """How this benchmark was started, for the report."""
    argv = sys.argv[1:]
    start = next((i for i, a in enumerate(argv) if a in SUBCOMMANDS), 0)
    return "vllm-trianglemix bench " + " ".join(argv[start:])
