#!/usr/bin/env bash
# The test command (CI runs it through .ci/run): set up, then every test on this machine.
# Without a GPU the tests under tests/gpu skip; on a machine with a CUDA GPU and vLLM they run
# (`bash scripts/gpu.sh suite` there). On a 2-core machine the suite takes about 22 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 tests "$@"
