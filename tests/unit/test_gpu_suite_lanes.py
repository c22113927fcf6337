"""`bash scripts/gpu.sh suite` runs the GPU tests in lanes side by side: every test under
tests/gpu is in exactly one lane (a test missing from every lane would never run; one in two
lanes would run twice and start its engines twice)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lanes() -> list[tuple[str, list[str]]]:
    text = (ROOT / "scripts" / "gpu.sh").read_text()
    block = re.search(r"\n\s*lanes=\(.*?\n(.*?)\n\s*\)\n", text, re.S).group(1)
    lanes = []
    for line in block.splitlines():
        k, _, files = line.strip().strip('"').partition("|")
        lanes.append((k, files.split()))
    return lanes


def _selected(k: str, name: str) -> bool:
    """pytest ``-k`` for the expressions the lanes use: empty, WORD or ``not WORD``."""
    if not k:
        return True
    negate = k.startswith("not ")
    word = k[4:] if negate else k
    assert re.fullmatch(r"\w+", word), f"lane expression {k!r}: this test reads only WORD / not WORD"
    return (word.lower() in name.lower()) != negate


def _tests(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [node.name for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test")]


def test_every_gpu_test_is_in_exactly_one_lane():
    lanes = _lanes()
    assert len(lanes) >= 2
    for path in sorted((ROOT / "tests" / "gpu").glob("test_*.py")):
        rel = str(path.relative_to(ROOT))
        for name in _tests(path):
            hits = [i for i, (k, files) in enumerate(lanes) if rel in files and _selected(k, name)]
            assert len(hits) == 1, f"{rel}::{name} is in lanes {hits}"


def test_lanes_name_existing_files():
    for _, files in _lanes():
        for f in files:
            assert (ROOT / f).is_file(), f
