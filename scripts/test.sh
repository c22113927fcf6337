#!/usr/bin/env bash
# The test command (CI runs it through .ci/run): set up, then every test on this machine.
# Without a GPU the tests under tests/gpu skip; on a machine with a CUDA GPU and vLLM they run
# (`bash scripts/gpu.sh suite` there). On an idle 2-core machine the suite takes about 13 minutes (12 min 28 s measured).
# One line per test as it finishes (-v, unbuffered, so a CI log shows progress live); the
# fifteen slowest tests and set-ups at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -v -p no:cacheprovider --durations=15 tests "$@"
