"""The GPU suite's lanes as JSON: what each lane ran, its result line and its slowest steps.

    python3 scripts/gpu_suite_summary.py LOG_DIR TOTAL_S > gpu_suite.json

LOG_DIR holds ``gpu_suite_laneN.log`` (pytest ``--durations`` output, written by
``bash scripts/gpu.sh suite``); TOTAL_S is the suite's wall time in seconds. The lanes'
definitions are read from scripts/gpu.sh, the one place they live.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DURATION = re.compile(r"^(\d+\.\d+)s (setup|call|teardown)\s+(\S+)")
RESULT = re.compile(r"^=* ?(\d+ (passed|failed|errors?|skipped).* in [\d.]+s.*?) ?=*$")


def lanes() -> list[tuple[str, list[str]]]:
    """("pytest -k expression", test files) per lane, as scripts/gpu.sh defines them."""
    text = (ROOT / "scripts" / "gpu.sh").read_text()
    block = re.search(r"\n\s*lanes=\(.*?\n(.*?)\n\s*\)\n", text, re.S).group(1)
    out = []
    for line in block.splitlines():
        k, _, files = line.strip().strip('"').partition("|")
        out.append((k, files.split()))
    return out


def lane_summary(log: str) -> dict:
    result, slowest = None, []
    for line in log.splitlines():
        m = DURATION.match(line)
        if m:
            slowest.append({"s": float(m.group(1)), "phase": m.group(2), "test": m.group(3)})
        m = RESULT.match(line.strip())
        if m:
            result = m.group(1)
    return {"result": result, "slowest": slowest}


def summary(log_dir: Path, total_s: float, versions: dict | None = None) -> dict:
    out = {"date": datetime.date.today().isoformat(), "command": "bash scripts/gpu.sh suite",
           "total_s": total_s, **(versions or {}), "lanes": []}
    for i, (k, files) in enumerate(lanes()):
        path = log_dir / f"gpu_suite_lane{i}.log"
        lane = {"lane": i, "k": k, "files": files}
        lane.update(lane_summary(path.read_text(errors="replace")) if path.exists()
                    else {"result": None, "slowest": []})
        out["lanes"].append(lane)
    return out


def _versions() -> dict:
    versions = {}
    try:
        import torch
        import vllm

        versions = {"vllm": vllm.__version__, "torch": torch.__version__}
        if torch.cuda.is_available():
            versions["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # the summary stands without them
        pass
    return versions


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    json.dump(summary(Path(sys.argv[1]), float(sys.argv[2]), _versions()), sys.stdout, indent=1)
    sys.stdout.write("\n")
