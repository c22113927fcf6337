"""``vllm-trianglemix <command>`` / ``python -m vllm_trianglemix <command>``.

Each command is a module with ``add_arguments(parser)`` and ``run(args) -> int``;
the first line of its docstring is its one-line help. Modules are imported
lazily: ``--help`` reads each docstring without importing the module, only the
chosen command's module is imported, and tool modules import vLLM / torch
inside ``run`` only, so ``-h`` answers at once and one missing or broken tool
never breaks the others. Bad input (``ToolError``, a bad layer map, an option
argparse refuses) ends in one line, ``vllm-trianglemix COMMAND: error: ...``
(``bench SUBCOMMAND`` for a benchmark), and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import sys

COMMANDS = {
    "demo": "vllm_trianglemix.tools.demo",
    "serve": "vllm_trianglemix.tools.serve",
    "check-map": "vllm_trianglemix.tools.check_map",
    "bench": "vllm_trianglemix.tools.bench",
    "calibrate": "vllm_trianglemix.tools.calibrate",
    "check-accuracy": "vllm_trianglemix.tools.accuracy",
    "soak": "vllm_trianglemix.tools.soak",
    "smollm2": "vllm_trianglemix.tools.smollm2_model",
    "eval": "vllm_trianglemix.tools.evaluate",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; every option's default shown unless its
    help already says it (or it has none worth showing: None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text.lower()
                or default is None or default is False or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse's errors in one line (no usage block), pointing at ``-h``; the command
    parsers (and bench's subcommands) are made with this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} -h` lists the options)\n")


def command_name(args: argparse.Namespace) -> str:
    """``calibrate``, or ``bench ttft`` for a benchmark: how errors name the command."""
    return " ".join(name for name in (args.command, getattr(args, "bench", None)) if name)


def _summary_without_import(module_name: str) -> str | None:
    """The first docstring line of an installed module, or None if it is not installed."""
    try:
        spec = importlib.util.find_spec(module_name)
        source = spec.loader.get_source(module_name) if spec and spec.loader else None
    except (ImportError, OSError):
        return None
    if source is None:
        return None
    try:
        doc = ast.get_docstring(ast.parse(source)) or ""
    except SyntaxError:
        return None
    return (doc.strip().splitlines() or [""])[0]


def _summary(module) -> str:
    return ((module.__doc__ or "").strip().splitlines() or [""])[0]


def _configure_logging() -> None:
    """vLLM's log format when vLLM is loaded (it configures its loggers only when
    asked since 0.32); else a plain handler on the ``vllm`` loggers, without
    importing vLLM for a tool that does not need it."""
    if "vllm" in sys.modules:
        try:
            from vllm.config.logging import LoggingConfig
            from vllm.logger import configure_logging_if_needed
        except ImportError:
            pass
        else:
            configure_logging_if_needed(LoggingConfig())
            return
    root = logging.getLogger("vllm")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s",
                                               "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    parser = Parser(
        prog="vllm-trianglemix",
        description="Tools for the TriangleMix attention backend of vLLM. "
        "`vllm-trianglemix COMMAND -h` shows a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if chosen is None:
        for name, module_name in COMMANDS.items():
            summary = _summary_without_import(module_name)
            if summary is not None:
                sub.add_parser(name, help=summary)
    else:
        try:
            module = importlib.import_module(COMMANDS[chosen])
        except ImportError as e:
            parser.error(f"command '{chosen}' is not available: {e}")
        command = sub.add_parser(
            chosen,
            help=_summary(module),
            description=module.__doc__,
            formatter_class=HelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    _configure_logging()
    from vllm_trianglemix.config import TriangleMixConfigError
    from vllm_trianglemix.tools.errors import ToolError

    try:
        return int(args._run(args) or 0)
    except (ToolError, TriangleMixConfigError) as e:
        sys.stderr.write(f"vllm-trianglemix {command_name(args)}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"vllm-trianglemix {command_name(args)}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
