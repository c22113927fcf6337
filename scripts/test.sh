#!/usr/bin/env bash
# The test command (CI runs it through .ci/run): set up, then every test on this machine.
# Without a GPU the tests under tests/gpu skip; on the device they run (see tests/gpu/run_on_device.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
