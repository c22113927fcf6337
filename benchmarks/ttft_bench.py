"""End-to-end TTFT/ITL benchmark: ``vllm-trianglemix bench ttft`` from a checkout."""

import os
import sys

from vllm_trianglemix.tools.cli import main

MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "llama-3.1-8b-instruct")
args = sys.argv[1:] if "--model" in sys.argv else ["--model", MODEL, *sys.argv[1:]]
sys.exit(main(["bench", "ttft", *args]))
