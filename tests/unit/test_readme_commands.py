"""The commands the documentation prints run as printed after the documented set-up.

Every ``vllm-trianglemix ...`` command in README.md, docker/README.md and
benchmarks/NOTES.md (code blocks and inline) names a command that exists, its
``-h`` answers in a new shell after the README's one-time
``source .venv/bin/activate`` (here: the activate script of the environment
running the tests), and each command parses with that command's own parser
(every option it names exists, takes what it is given, and the required ones
are there), unless it is a mention: it holds ``...``, or names the command
alone. The demo's printed ``serve it yourself`` command, and the activate line
it reminds of, run in a shell without the environment on ``PATH``.
Every ``bash scripts/...`` the README names exists.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_trianglemix.tools import bench
from vllm_trianglemix.tools.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docker" / "README.md", ROOT / "benchmarks" / "NOTES.md"]
SCRIPT = "vllm-trianglemix"
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _tokens(text: str) -> list[str] | None:
    """The words of a ``vllm-trianglemix`` command (leading VAR=value dropped), else None."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return None
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    if len(words) < 2 or words[0] != SCRIPT or not re.fullmatch(r"[a-z][a-z-]*", words[1]):
        return None
    return words


def _complete(words: list[str]) -> bool:
    return "..." not in words and words[1:] != _prefix(words)


def documented_commands() -> list[tuple[str, bool, list[str]]]:
    """(where, complete, words): complete unless it is a mention (it holds '...', or it is
    the command's name alone)."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        in_block, i = False, 0
        while i < len(lines):
            line, where = lines[i], f"{path.relative_to(ROOT)}:{i + 1}"
            if line.lstrip().startswith("```"):
                in_block = not in_block
            elif in_block:
                parts = [line]
                while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    parts[-1] = parts[-1].rstrip()[:-1]
                    parts.append(lines[i])
                words = _tokens(" ".join(parts))
                if words:
                    found.append((where, _complete(words), words))
            i += 1
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for span in re.findall(r"`(vllm-trianglemix [^`]*)`", text):
            words = _tokens(" ".join(span.split()))
            if words and words[1] != "COMMAND":
                found.append((f"{path.relative_to(ROOT)} (inline)", _complete(words), words))
    return found


def _prefix(words: list[str]) -> list[str]:
    """The command (and bench's subcommand) of a documented command."""
    return words[1:3] if words[1] == "bench" and len(words) > 2 else words[1:2]


def test_the_documentation_prints_commands():
    commands = documented_commands()
    assert len(commands) >= 10, commands
    assert {w[1] for _, _, w in commands} >= {"serve", "check-map", "calibrate", "soak", "bench"}


def test_every_documented_command_exists():
    for where, _, words in documented_commands():
        assert words[1] in COMMANDS, f"{where}: no command {words[1]!r}: {shlex.join(words)}"
        if words[1] == "bench":
            assert len(words) > 2 and words[2] in bench.SUBCOMMANDS, f"{where}: {shlex.join(words)}"


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{SCRIPT} {command}", exit_on_error=False)
    importlib.import_module(COMMANDS[command]).add_arguments(parser)
    return parser


def test_documented_commands_parse_as_printed(capsys):
    for where, complete, words in documented_commands():
        if not complete:
            continue
        try:
            _parser(words[1]).parse_args(words[2:])
        except (SystemExit, argparse.ArgumentError) as e:
            pytest.fail(f"{where}: `{shlex.join(words)}` does not parse: {e} "
                        f"{capsys.readouterr().err.strip()}")


def _activate() -> str:
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix == sys.base_prefix or not activate.is_file():
        pytest.skip("the tests do not run in a virtual environment")
    return str(activate)


def _new_shell(script: str) -> subprocess.CompletedProcess:
    """``bash -c script`` with a new shell's environment: no virtual environment on PATH."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
           "LANG": "C.UTF-8"}
    if os.environ.get("PYTHONPATH"):  # the code under test, where it is not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_every_documented_command_answers_h_after_activation():
    activate = _activate()
    prefixes = sorted({tuple(_prefix(w)) for _, _, w in documented_commands()})
    lines = [f"source {shlex.quote(activate)}"]
    lines += [f"{SCRIPT} {shlex.join(p)} -h >/dev/null || echo FAILED: {shlex.join(p)}" for p in prefixes]
    proc = _new_shell("\n".join(lines))
    assert proc.returncode == 0 and "FAILED" not in proc.stdout, proc.stdout + proc.stderr


def test_the_demo_prints_a_serve_command_that_runs_in_a_new_shell():
    from vllm_trianglemix.tools.demo import serve_again_lines

    activate = _activate()
    lines = serve_again_lines("/models/tiny", ["--dtype", "float32"])
    printed = lines[0].split("serve it yourself: ", 1)[1]
    words = shlex.split(printed)
    assert words[-4:] == ["serve", "/models/tiny", "--dtype", "float32"], printed
    proc = _new_shell(shlex.join([*words[:-3], "-h"]))  # its `serve -h`, as printed
    assert proc.returncode == 0 and "vllm serve" in proc.stdout, proc.stdout + proc.stderr
    # The reminder: the environment's activate, then the short command.
    assert len(lines) == 2 and f"`source {activate}`" in lines[1], lines
    proc = _new_shell(f"source {shlex.quote(activate)} && {SCRIPT} serve -h")
    assert proc.returncode == 0 and "vllm serve" in proc.stdout, proc.stdout + proc.stderr


def test_every_script_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    scripts = set(re.findall(r"bash (scripts/[\w.-]+\.sh)", text))
    assert {"scripts/demo.sh", "scripts/test.sh"} <= scripts
    for script in scripts:
        assert (ROOT / script).is_file(), script
