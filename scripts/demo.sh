#!/usr/bin/env bash
# The main job on an embedded default: set up, build the tiny demo model, serve it with
# TriangleMix on this machine and answer a completion and a chat request through the
# OpenAI endpoint. Extra arguments go to `vllm-trianglemix demo` (e.g. --keep-serving).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m vllm_trianglemix demo "$@"
