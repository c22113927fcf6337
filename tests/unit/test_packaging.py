"""The wheel holds every subpackage: pyproject's explicit package list names each one.

An editable install (how the tests run) finds modules in the source tree whether listed or
not, so a subpackage missing from the list only shows in a real install: here it fails.
"""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_subpackage_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "vllm_trianglemix").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - listed == set(), f"subpackages missing from pyproject.toml's packages: {sorted(found - listed)}"
    assert "vllm_trianglemix.ops.xattention_triton" in listed
