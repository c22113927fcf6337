"""Session set-up shared by every test.

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET
must be set before anything (vLLM included) imports Triton, so it is set here.
"""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
