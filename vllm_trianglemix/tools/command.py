"""How a tool writes this package's command so that it runs as printed in a new shell.

The console script ``vllm-trianglemix`` lives in the ``bin`` folder of the
Python environment it was installed in (``.venv/bin`` after ``scripts/setup.sh``),
which a new shell finds only once that environment is activated. A printed
command therefore names the script by its full path unless the shell's
``vllm-trianglemix`` is this very script, and :func:`activate_hint` gives the
one-time ``source .../bin/activate`` that puts it on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import sys

SCRIPT = "vllm-trianglemix"


def own_command() -> list[str]:
    """``vllm-trianglemix`` if that finds this installation, else its full path (else
    ``python -m vllm_trianglemix`` with this Python, where no script is installed)."""
    script = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), SCRIPT)
    if not os.path.isfile(script):
        return [sys.executable, "-m", "vllm_trianglemix"]
    found = shutil.which(SCRIPT)
    if found and os.path.realpath(found) == os.path.realpath(script):
        return [SCRIPT]
    return [script]


def activate_hint() -> str | None:
    """``source ENV/bin/activate`` when this Python is a virtual environment the shell has
    not activated (None otherwise)."""
    if sys.prefix == sys.base_prefix:
        return None
    activate = os.path.join(sys.prefix, "bin", "activate")
    active = os.environ.get("VIRTUAL_ENV")
    if not os.path.isfile(activate) or (active and os.path.realpath(active) == os.path.realpath(sys.prefix)):
        return None
    return f"source {activate}"
