"""What the dynamic-layer kernels read besides Q and the cache: the device plan, the groups of
query blocks the estimate takes per program, the repacked keys' layout, the kept-block lists."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SUPER_HEAD = 4  # a group's leading fields: req, key offset in the repacked buffer, key blocks, keys


def round_up(n: int, multiple: int = 16) -> int:
    """Widths and counts the kernels take as integer arguments are kept multiples of 16, so that
    Triton specialises them one way for every step (warmup.py compiles that one variant)."""
    return -(-n // multiple) * multiple


@dataclass
class TritonDynamicPlan:
    items: torch.Tensor  # int32 [num_items, 5], QUERY_BLOCK_FIELDS order
    q_block: torch.Tensor  # int64 [num_items]
    block_table: torch.Tensor
    num_items: int
    num_blocks: int  # max q_block + 1
    host_items: np.ndarray | None = None  # int64 [num_items, 5] (the groups are built from it)
    groups: dict = field(default_factory=dict)  # per (blocks per group, key tile blocks, block size)


@dataclass
class Groups:
    """The estimate's work: groups of consecutive query blocks of one request; the repack table."""

    supers: torch.Tensor  # int32 [n, 4 + blocks per group]: req, key offset, key blocks, keys, items
    reqs: torch.Tensor  # int32 [r, 4]: req, key offset, keys, padded keys
    req_offset: torch.Tensor  # int32 [max req + 1]: each request's first row in the repacked buffers
    num_supers: int
    total_keys: int  # rows of the repacked buffers
    max_pad: int  # largest padded key count of one request
    host_reqs: np.ndarray | None = None  # int64 [r, 4]: reqs on the host


@dataclass
class KeptBlocks:
    """Per (item, KV head): kept blocks before the diagonal (ascending), their count, diagonal kept."""

    kept: torch.Tensor  # int32 [items, kv_heads, >= count] (any strides)
    n_kept: torch.Tensor  # int32 [items, kv_heads], contiguous
    diag_kept: torch.Tensor  # int32 [items, kv_heads], contiguous
    keep: torch.Tensor | None = None  # bool [items, kv_heads, blocks] when asked for


def kept_blocks_from_mask(keep: torch.Tensor, q_block: torch.Tensor) -> KeptBlocks:
    """Compact a kept-block mask ``[items, kv, n]`` into the lists the attention kernel reads.

    Torch on the mask's device, no host synchronisation: each kept block before the
    diagonal is scattered to its rank among them (ascending); the others to a spare column.
    (The path of a caller-supplied ``select``; the rule itself runs fused, select.py.)
    """
    items, kv, n = keep.shape
    j = torch.arange(n, device=keep.device)
    b = q_block.to(keep.device)[:, None, None]
    before = keep & (j < b)
    rank = torch.cumsum(before, -1) - 1
    kept = torch.zeros((items, kv, n + 1), dtype=torch.int32, device=keep.device)
    kept.scatter_(-1, torch.where(before, rank, n), j.to(torch.int32).expand(items, kv, n).contiguous())
    diag = (keep & (j == b)).any(-1)
    return KeptBlocks(kept, before.sum(-1).to(torch.int32), diag.to(torch.int32))


def group_query_blocks(items: np.ndarray, blocks_per_group: int, block_size: int,
                       tile_blocks: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The estimate's groups of an item table ``[n, 5]`` (QUERY_BLOCK_FIELDS order).

    Each group holds up to ``blocks_per_group`` consecutive query blocks of one
    request (items of one step), heaviest group first; each request's keys get
    ``[offset, offset + padded)`` in the repacked buffers, ``padded`` covering
    whole key tiles of ``tile_blocks`` blocks. Returns (groups, requests, total keys).
    """
    supers, reqs, offset = [], [], 0
    req_col, q_pos, n_q, q_block = items[:, 0], items[:, 2], items[:, 3], items[:, 4]
    for r in np.unique(req_col):
        idx = np.nonzero(req_col == r)[0]
        idx = idx[np.argsort(q_block[idx], kind="stable")]
        blocks_needed = int(q_block[idx].max()) + 1
        padded = -(-blocks_needed // tile_blocks) * tile_blocks * block_size
        n_keys = int((q_pos[idx] + n_q[idx]).max())
        reqs.append((int(r), offset, n_keys, padded))
        run_start = 0
        for k in range(1, len(idx) + 1):  # runs of consecutive blocks, cut into groups
            if k == len(idx) or q_block[idx[k]] != q_block[idx[k - 1]] + 1 or k - run_start == blocks_per_group:
                members = idx[run_start:k]
                last = members[-1]
                row = [int(r), offset, int(q_block[last]) + 1, int(q_pos[last] + n_q[last])]
                row += [int(i) for i in members] + [-1] * (blocks_per_group - len(members))
                supers.append(row)
                run_start = k
        offset += padded
    supers_arr = np.array(supers, dtype=np.int64).reshape(-1, SUPER_HEAD + blocks_per_group)
    supers_arr = supers_arr[np.argsort(-supers_arr[:, 2], kind="stable")]
    return supers_arr, np.array(reqs, dtype=np.int64).reshape(-1, 4), offset


def build_groups(host_items: np.ndarray, blocks_per_group: int, block_size: int, tile_blocks: int,
                 device) -> Groups:
    supers, reqs, total = group_query_blocks(host_items, blocks_per_group, block_size, tile_blocks)
    req_offset = np.zeros(int(reqs[:, 0].max()) + 1 if reqs.shape[0] else 1, dtype=np.int32)
    req_offset[reqs[:, 0]] = reqs[:, 1]
    return Groups(
        supers=torch.from_numpy(supers.astype(np.int32)).to(device, non_blocking=True),
        reqs=torch.from_numpy(reqs.astype(np.int32)).to(device, non_blocking=True),
        req_offset=torch.from_numpy(req_offset).to(device, non_blocking=True),
        num_supers=int(supers.shape[0]), total_keys=int(total),
        max_pad=int(reqs[:, 3].max()) if reqs.shape[0] else 0, host_reqs=reqs,
    )
