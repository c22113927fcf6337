"""Dynamic (XAttention) rows in Triton, on vLLM's paged KV cache (GPU path).

A :class:`~vllm_trianglemix.pattern.QueryBlockPlan` runs in four stages, one
module each, all on the device without a host synchronisation:

* repack.py: the step's keys (and values) from the paged cache into contiguous buffers;
* estimate.py: the antidiagonal block masses (XAttention's importance estimate);
* select.py: the kept key blocks, by the rule of ``pattern.select_key_blocks``;
* attend.py: block-sparse causal attention over the kept blocks.

op.py plans a step and launches them; config.py holds the tile sizes;
warmup.py compiles every kernel an engine will launch before it serves.
"""

from vllm_trianglemix.ops.xattention_triton.config import CONFIG_ENV, XAttnKernelConfig
from vllm_trianglemix.ops.xattention_triton.op import COMPILE_ERRORS, Packed, TritonXAttentionOp
from vllm_trianglemix.ops.xattention_triton.plan import (
    KeptBlocks,
    TritonDynamicPlan,
    group_query_blocks,
    kept_blocks_from_mask,
)

__all__ = [
    "COMPILE_ERRORS",
    "CONFIG_ENV",
    "KeptBlocks",
    "Packed",
    "TritonDynamicPlan",
    "TritonXAttentionOp",
    "XAttnKernelConfig",
    "group_query_blocks",
    "kept_blocks_from_mask",
]
