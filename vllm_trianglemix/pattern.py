"""THE TriangleMix rule, and the tile plan derived from it.

Every path (the Triton kernel, the CPU path, the float32 reference and the
tests) takes the mask from :func:`visible` and the key ranges from
:func:`block_key_ranges`; nothing else restates the rule.

The rule (He et al., 2025, arXiv 2507.21526). In a triangle layer, a prompt
token at absolute position ``q`` of a prompt of length ``L`` attends to keys
``k <= q`` with

* any ``k`` if ``q >= L - n_last`` (the last ``n_last`` rows are dense), else
* ``k < n_init`` (sink tokens) or ``k > q - n_local`` (a causal window of
  ``n_local`` keys, the query itself included).

A prompt shorter than ``min_prompt_len`` runs dense everywhere. Both cases are
expressed through one number per request, the *dense start*: the first
absolute position whose row is dense (``L - n_last``, or 0 for a short
prompt). Positions at or past ``L`` (tokens generated before a preemption and
recomputed with the prompt) are therefore dense rows, exactly as they were
computed while decoding.

``visible`` uses only ``<=``, ``<``, ``>``, ``-``, ``&`` and ``|`` so that the
same function body evaluates on Python ints, NumPy arrays, torch tensors and,
wrapped with ``triton.jit``, inside the Triton kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TriangleParams:
    """Per-layer TriangleMix parameters."""

    n_init: int
    n_local: int
    n_last: int


def dense_start(prompt_len, n_last: int, min_prompt_len: int):
    """First absolute position whose row attends to every earlier key.

    Works elementwise on NumPy arrays of prompt lengths.
    """
    return np.where(np.asarray(prompt_len) >= min_prompt_len, np.asarray(prompt_len) - n_last, 0)


def first_sparse_row(params: TriangleParams) -> int:
    """First position whose triangle row sees fewer keys than a dense row.

    For ``q < n_init + n_local`` the sinks and the window together cover every
    key ``0..q``, so such rows equal dense rows.
    """
    return params.n_init + params.n_local


def visible(q_pos, k_pos, dense_from, n_init, n_local):
    """Whether the query at absolute position ``q_pos`` sees the key at ``k_pos``.

    ``dense_from`` is the request's dense start (see :func:`dense_start`).
    """
    return (k_pos <= q_pos) & (
        (q_pos >= dense_from) | (k_pos < n_init) | (k_pos > q_pos - n_local)
    )


def tile_fully_visible(q_lo, q_hi, k_lo, k_hi, dense_from, n_init, n_local):
    """True only if every query in ``[q_lo, q_hi]`` sees every key in ``[k_lo, k_hi]``.

    Conservative (may say False for a fully visible tile, never True for a
    tile with a hidden key); kernels skip the per-key mask where it is True.
    Derived from :func:`visible`: causal at the tile's worst corner, and then
    every row dense, or every key in every row's window, or every key a sink.
    """
    return (k_hi <= q_lo) & ((q_lo >= dense_from) | (k_lo > q_hi - n_local) | (k_hi < n_init))


def unmasked_key_span(q_lo, q_hi, dense_from, n_init, n_local):
    """Keys ``[lo, hi)`` that every query in ``[q_lo, q_hi]`` sees (may be empty).

    Dense rows see everything up to ``q_lo``; triangle rows share the part of
    the window common to all of them. Kernels visit tiles inside the span
    without a per-key mask. Plain arithmetic (a bool times an int), so the
    body also compiles in Triton.
    """
    lo = (q_lo < dense_from) * (q_hi - n_local + 1)
    return lo, q_lo + 1


@dataclass
class BlockPlan:
    """Work items for the query rows of a batch, one row per item.

    All arrays have one entry per item. An item covers query rows
    ``[q_pos, q_pos + n_q)`` (absolute positions) of request ``req``, whose
    first row is at index ``q_tok`` of the batch's query tensor. Its keys are
    the union of ``[0, sink_end)`` and ``[k_start, k_end)``; within those
    ranges :func:`visible` decides key by key. Rows of one item are either all
    triangle rows or all dense rows (blocks are cut at the dense start).

    A dense item over a long key range is split into several items that share
    ``q_tok`` and differ in ``[k_start, k_end)``; ``split_id`` numbers the
    partial results to merge (``-1``: the item writes its rows directly) and
    ``merge_*`` describe, per split block, which partials form its rows.
    """

    req: np.ndarray
    q_tok: np.ndarray
    q_pos: np.ndarray
    n_q: np.ndarray
    sink_end: np.ndarray
    k_start: np.ndarray
    k_end: np.ndarray
    split_id: np.ndarray
    # one entry per split block
    merge_q_tok: np.ndarray
    merge_n_q: np.ndarray
    merge_first_split: np.ndarray
    merge_num_splits: np.ndarray

    @property
    def num_items(self) -> int:
        return int(self.req.shape[0])

    @property
    def num_partials(self) -> int:
        return int(self.merge_num_splits.sum()) if self.merge_num_splits.size else 0


def block_key_ranges(q_lo, q_hi, is_dense, n_init: int, n_local: int):
    """Key ranges a block of rows ``[q_lo, q_hi]`` (inclusive) needs.

    Returns ``(sink_end, k_start, k_end)``: the keys ``[0, sink_end)`` and
    ``[k_start, k_end)``. Every key visible to some row of the block lies in
    them, and they are as small as the rule allows for a rectangle of rows:
    dense rows need ``[0, q_hi]``; triangle rows need the sinks and the window
    ``[q_lo - n_local + 1, q_hi]``, merged into one range where they touch.
    Elementwise on NumPy arrays.
    """
    q_lo = np.asarray(q_lo, dtype=np.int64)
    q_hi = np.asarray(q_hi, dtype=np.int64)
    k_end = q_hi + 1
    win_start = np.maximum(q_lo - n_local + 1, 0)
    merged = np.asarray(is_dense) | (win_start <= n_init)
    k_start = np.where(merged, 0, win_start)
    sink_end = np.where(merged, 0, n_init)
    return sink_end, k_start, k_end


def plan_blocks(
    query_start_loc: np.ndarray,
    seq_lens: np.ndarray,
    dense_from: np.ndarray,
    reqs,
    params: TriangleParams,
    block_q: int,
    split_kv: int = 0,
) -> BlockPlan:
    """Cut the query rows of requests ``reqs`` into work items.

    ``query_start_loc`` (num_reqs + 1), ``seq_lens`` and ``dense_from``
    (num_reqs each) describe the batch; request ``r``'s query rows are the
    last ``query_start_loc[r+1] - query_start_loc[r]`` positions of its
    ``seq_lens[r]`` tokens. Blocks hold at most ``block_q`` rows and are cut
    at each request's dense start. With ``split_kv > 0`` a dense block whose
    key range is longer than ``split_kv`` becomes one item per ``split_kv``
    keys. Items come heaviest first (most keys), so the longest start first.
    """
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    dense_from = np.asarray(dense_from, dtype=np.int64)
    b_req, b_tok, b_lo, b_hi = [], [], [], []
    for r in np.asarray(reqs, dtype=np.int64).tolist():
        tok0, n = int(qsl[r]), int(qsl[r + 1] - qsl[r])
        if n <= 0:
            continue
        p0 = int(seq_lens[r]) - n
        cuts = np.arange(p0, p0 + n, block_q, dtype=np.int64)
        ds = int(dense_from[r])
        if p0 < ds < p0 + n and (ds - p0) % block_q:
            cuts = np.insert(cuts, np.searchsorted(cuts, ds), ds)
        b_req.append(np.full(cuts.shape, r, dtype=np.int64))
        b_tok.append(cuts + (tok0 - p0))
        b_lo.append(cuts)
        b_hi.append(np.append(cuts[1:], p0 + n) - 1)
    empty = np.zeros(0, dtype=np.int64)
    b_req = np.concatenate(b_req) if b_req else empty
    b_tok = np.concatenate(b_tok) if b_tok else empty
    b_lo = np.concatenate(b_lo) if b_lo else empty
    b_hi = np.concatenate(b_hi) if b_hi else empty
    b_dense = b_lo >= dense_from[b_req] if b_req.size else np.zeros(0, dtype=bool)
    sink_end, k_start, k_end = block_key_ranges(
        b_lo, b_hi, b_dense, params.n_init, params.n_local
    )

    # Split long dense blocks into items of split_kv keys.
    n_splits = np.ones_like(b_lo)
    if split_kv > 0:
        n_splits = np.where(
            b_dense & (k_end - k_start > split_kv), -(-(k_end - k_start) // split_kv), 1
        )
    rep = np.repeat(np.arange(b_lo.shape[0]), n_splits)
    within = np.arange(rep.shape[0]) - np.repeat(np.cumsum(n_splits) - n_splits, n_splits)
    is_split = (n_splits > 1)[rep]
    it_k_start = np.where(is_split, k_start[rep] + within * max(split_kv, 1), k_start[rep])
    it_k_end = np.where(is_split, np.minimum(it_k_start + split_kv, k_end[rep]), k_end[rep])
    split_blocks = np.nonzero(n_splits > 1)[0]
    first_split = np.cumsum(n_splits[split_blocks]) - n_splits[split_blocks]
    block_first = np.full(b_lo.shape, -1, dtype=np.int64)
    block_first[split_blocks] = first_split
    split_id = np.where(is_split, block_first[rep] + within, -1)

    plan = BlockPlan(
        req=b_req[rep],
        q_tok=b_tok[rep],
        q_pos=b_lo[rep],
        n_q=(b_hi - b_lo + 1)[rep],
        sink_end=sink_end[rep],
        k_start=it_k_start,
        k_end=it_k_end,
        split_id=split_id,
        merge_q_tok=b_tok[split_blocks],
        merge_n_q=(b_hi - b_lo + 1)[split_blocks],
        merge_first_split=first_split,
        merge_num_splits=n_splits[split_blocks],
    )
    order = np.argsort(-(plan.k_end - plan.k_start + plan.sink_end), kind="stable")
    for name in ITEM_FIELDS:
        setattr(plan, name, getattr(plan, name)[order])
    return plan


ITEM_FIELDS = ("req", "q_tok", "q_pos", "n_q", "sink_end", "k_start", "k_end", "split_id")
