"""`bash scripts/gpu.sh suite` runs the GPU tests in lanes side by side: every test under
tests/gpu is in exactly one lane (a test missing from every lane would never run; one in two
lanes would run twice and start its engines twice)."""

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _summary_module():
    """scripts/gpu_suite_summary.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("gpu_suite_summary", ROOT / "scripts" / "gpu_suite_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lanes() -> list[tuple[str, list[str]]]:
    """The lanes as scripts/gpu.sh defines them (read by the suite's JSON summary too)."""
    return _summary_module().lanes()


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


def test_the_suite_summary_reads_each_lanes_result_and_slowest_steps(tmp_path):
    module = _summary_module()
    (tmp_path / "gpu_suite_lane0.log").write_text(
        "============================= slowest 10 durations =============================\n"
        "251.68s setup    tests/gpu/test_breadth_gpu.py::test_flashinfer_is_the_stock_delegate\n"
        "0.85s call     tests/gpu/test_breadth_gpu.py::test_flashinfer_long_prompts_match_exact_reference\n"
        "5 passed, 7 deselected in 339.00s (0:05:39)\n")
    out = module.summary(tmp_path, 348.0)
    assert out["total_s"] == 348.0 and len(out["lanes"]) == len(_lanes())
    first = out["lanes"][0]
    assert first["result"] == "5 passed, 7 deselected in 339.00s (0:05:39)"
    assert first["slowest"][0] == {"s": 251.68, "phase": "setup",
                                   "test": "tests/gpu/test_breadth_gpu.py::test_flashinfer_is_the_stock_delegate"}
    assert out["lanes"][1]["result"] is None  # no log: reported as such, not guessed


def test_a_lane_whose_tests_all_skip_reports_that(tmp_path):
    """Ray not installed and one GPU: the lane's whole result is "N skipped", not nothing."""
    module = _summary_module()
    (tmp_path / "gpu_suite_lane0.log").write_text("10 skipped in 51.01s\n")
    (tmp_path / "gpu_suite_lane1.log").write_text("=== 1 failed, 2 passed, 1 error in 9.50s ===\n")
    lanes = module.summary(tmp_path, 60.0)["lanes"]
    assert lanes[0]["result"] == "10 skipped in 51.01s"
    assert lanes[1]["result"] == "1 failed, 2 passed, 1 error in 9.50s"
