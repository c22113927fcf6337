import sys

from vllm_trianglemix.tools.cli import main

sys.exit(main())
