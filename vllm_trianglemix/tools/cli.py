"""``vllm-trianglemix <command>`` / ``python -m vllm_trianglemix <command>``.

Each command is a module with ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported lazily: only the chosen command's module is imported, and
the command list in ``--help`` shows the commands whose module is installed, so
one missing or broken tool never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = {
    "demo": "vllm_trianglemix.tools.demo",
    "serve": "vllm_trianglemix.tools.serve",
    "bench": "vllm_trianglemix.tools.bench",
    "calibrate": "vllm_trianglemix.tools.calibrate",
    "check-accuracy": "vllm_trianglemix.tools.accuracy",
    "soak": "vllm_trianglemix.tools.soak",
}


def _available(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ImportError:
        return False


def _summary(module) -> str:
    return ((module.__doc__ or "").strip().splitlines() or [""])[0]


def _configure_logging() -> None:
    """vLLM configures its loggers (``vllm.*``) only when asked since 0.32."""
    try:
        from vllm.config.logging import LoggingConfig
        from vllm.logger import configure_logging_if_needed
    except ImportError:
        return
    configure_logging_if_needed(LoggingConfig())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    parser = argparse.ArgumentParser(
        prog="vllm-trianglemix",
        description="Tools for the TriangleMix attention backend of vLLM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        if chosen is None and _available(module_name):
            sub.add_parser(name, help=f"see `vllm-trianglemix {name} -h`")
    if chosen is not None:
        try:
            module = importlib.import_module(COMMANDS[chosen])
        except ImportError as e:
            parser.error(f"command '{chosen}' is not available: {e}")
        command = sub.add_parser(
            chosen,
            help=_summary(module),
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    _configure_logging()
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
