"""Kernel benchmark (GPU): ``vllm-trianglemix bench kernel`` from a checkout."""

import sys

from vllm_trianglemix.tools.cli import main

sys.exit(main(["bench", "kernel", *sys.argv[1:]]))
