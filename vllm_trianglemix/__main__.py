import sys

from vllm_trianglemix.cli import main

sys.exit(main())
