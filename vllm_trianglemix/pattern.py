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
    """

    req: np.ndarray
    q_tok: np.ndarray
    q_pos: np.ndarray
    n_q: np.ndarray
    sink_end: np.ndarray
    k_start: np.ndarray
    k_end: np.ndarray

    @property
    def num_items(self) -> int:
        return int(self.req.shape[0])


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
    *,
    rows: str = "all",
) -> BlockPlan:
    """Cut the query rows of requests ``reqs`` into work items.

    ``query_start_loc`` (num_reqs + 1), ``seq_lens`` and ``dense_from``
    (num_reqs each) describe the batch; request ``r``'s query rows are the
    last ``query_start_loc[r+1] - query_start_loc[r]`` positions of its
    ``seq_lens[r]`` tokens. Blocks hold at most ``block_q`` rows and are cut
    at each request's dense start; each block is one item. Items come
    heaviest first (most keys), so the longest start first.
    ``rows``: ``"all"``, ``"dense"`` (only the rows at or past each dense
    start) or ``"triangle"`` (only the rows below it; the engine leaves the
    dense rows to the stock backend).
    """
    if rows not in ("all", "dense", "triangle"):
        raise ValueError(f"plan_blocks: rows={rows!r}, expected 'all', 'dense' or 'triangle'")
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
    if rows != "all":
        keep = b_dense if rows == "dense" else ~b_dense
        b_req, b_tok, b_lo, b_hi, b_dense = (a[keep] for a in (b_req, b_tok, b_lo, b_hi, b_dense))
    sink_end, k_start, k_end = block_key_ranges(
        b_lo, b_hi, b_dense, params.n_init, params.n_local
    )

    plan = BlockPlan(
        req=b_req,
        q_tok=b_tok,
        q_pos=b_lo,
        n_q=b_hi - b_lo + 1,
        sink_end=sink_end,
        k_start=k_start,
        k_end=k_end,
    )
    order = np.argsort(-(plan.k_end - plan.k_start + plan.sink_end), kind="stable")
    for name in ITEM_FIELDS:
        setattr(plan, name, getattr(plan, name)[order])
    return plan


ITEM_FIELDS = ("req", "q_tok", "q_pos", "n_q", "sink_end", "k_start", "k_end")


# ---------------------------------------------------------------------------
# Dynamic layers: TriangleMix + XAttention block-sparse prefill
# ---------------------------------------------------------------------------
#
# In a *dynamic* layer (a map's ``dynamic_layers``) the rows past the dense
# start are dense exactly as in a triangle layer, prompts shorter than
# ``min_prompt_len`` run dense (stock), and decode is unchanged. The other
# prompt rows attend block-sparsely, the blocks chosen per prompt by the
# XAttention estimate (Xu et al., 2025, arXiv 2503.16428), defined here on
# absolute positions:
#
# * Blocks are aligned to absolute positions: query block ``b`` holds the
#   dynamic rows ``[b*B, (b+1)*B)`` (``B = block_size``) that are below the
#   dense start; key block ``j`` holds keys ``[j*B, (j+1)*B)``. A row of query
#   block ``b`` sees key ``k`` iff ``k <= q`` and ``j = k // B`` is *kept* for
#   ``(b, kv_head)``.
# * Antidiagonal score (stride ``S``, which divides ``B``). Rows and keys form
#   groups of ``S`` consecutive positions; for query group ``g`` and key group
#   ``h <= g`` and a query head,
#       a(g, h) = scale / S * sum_s q[g*S + S-1-s] . k[h*S + s]
#   over ``s`` in ``0..S-1`` whose row ``g*S + S-1-s`` is *present* (a dynamic
#   row of this query block in the step that computes it) and whose key is
#   causal (``h*S + s <= g*S + S-1-s``, which only removes terms when h == g).
#   ``a(g, h)`` is defined when at least one term is; groups without present
#   rows take no part.
# * ``p(g, .)`` is the softmax of ``a(g, h)`` over the defined ``h``; the mass of
#   key block ``j`` for query block ``b`` and KV head ``t`` is the sum of
#   ``p(g, h)`` over the query heads of ``t`` (GQA: one selection per KV head,
#   shared by its query heads), the groups ``g`` of block ``b`` and the groups
#   ``h`` of block ``j``; masses are normalised to sum to 1 over ``j <= b``.
# * :func:`select_key_blocks` keeps, per (query block, KV head), the first key
#   block and the diagonal block, then the fewest other blocks, by descending
#   mass (ties: lower index first), that bring the kept mass to ``threshold``;
#   ``threshold >= 1`` keeps every block. With ``max_density`` at most
#   ``max(2, ceil(max_density * (b + 1)))`` blocks are kept (a fixed budget when
#   ``threshold`` is 1).
#
# The selection of query block ``b`` is a function of the prompt's queries and
# keys at absolute positions up to ``min((b+1)*B, dense start)``. When every
# chunk boundary is a multiple of ``B`` (chunk sizes that are multiples of
# ``B``, and prefix-cache hits, which the prefix-cache rule aligns to query
# blocks), every query block is present whole in one step, so results do not
# depend on chunk size, batch mix, preemption or prefix-cache hits. When a
# chunk boundary cuts a query block, only that block changes: each step
# selects for its part of the block from the rows the step holds ("present"
# rows above). Nothing else differs.


@dataclass(frozen=True)
class DynamicParams:
    """Per-layer parameters of a dynamic (TriangleMix + XAttention) layer."""

    method: str
    block_size: int
    stride: int
    threshold: float
    max_density: float | None
    n_last: int

    @property
    def keeps_everything(self) -> bool:
        """True when no block can be dropped (the layer then equals dense)."""
        return self.threshold >= 1.0 and self.max_density is None


def dynamic_first_sparse_row(params: DynamicParams) -> int:
    """Rows of query block 0 see every key (its only key block is kept)."""
    return 1 << 62 if params.keeps_everything else params.block_size


def select_key_blocks(mass, q_block, threshold: float, max_density: float | None):
    """The kept key blocks of query blocks, from their (unnormalised) masses.

    ``mass``: float tensor ``[..., n]`` (entries ``j > q_block`` are ignored);
    ``q_block``: int tensor broadcastable to ``mass.shape[:-1]``, the query
    block index ``b``. Returns a bool tensor like ``mass``: kept blocks.
    Torch only (CPU and GPU paths share it).
    """
    import torch

    n = mass.shape[-1]
    j = torch.arange(n, device=mass.device)
    b = torch.as_tensor(q_block, device=mass.device)[..., None]
    causal = j <= b
    forced = causal & ((j == 0) | (j == b))
    if threshold >= 1.0 and max_density is None:
        return causal.expand(mass.shape).clone()
    m = torch.where(causal, mass.to(torch.float64), torch.zeros((), dtype=torch.float64, device=mass.device))
    total = m.sum(-1, keepdim=True)
    m = m / torch.where(total > 0, total, torch.ones_like(total))
    forced_mass = torch.where(forced, m, torch.zeros_like(m)).sum(-1, keepdim=True)
    # Others by descending mass, ties by lower index (stable sort of -mass).
    rank_key = torch.where(causal & ~forced, -m, torch.full_like(m, float("inf")))
    order = torch.sort(rank_key, dim=-1, stable=True).indices
    sorted_m = torch.gather(torch.where(causal & ~forced, m, torch.zeros_like(m)), -1, order)
    before = forced_mass + torch.cumsum(sorted_m, -1) - sorted_m  # kept mass before taking each
    n_others = (causal & ~forced).sum(-1, keepdim=True)
    if threshold >= 1.0:
        take = n_others
    else:
        take = (before < threshold).sum(-1, keepdim=True).clamp(max=n_others)
    if max_density is not None:
        nb = b + 1
        cap = torch.clamp(torch.ceil(max_density * nb.to(torch.float64)).to(torch.int64), min=2)
        take = torch.minimum(take, torch.clamp(cap - forced.sum(-1, keepdim=True), min=0))
    taken_sorted = torch.arange(n, device=mass.device) < take
    taken = torch.zeros_like(causal.expand(mass.shape)).scatter(-1, order, taken_sorted.expand(order.shape))
    return forced | (taken & causal)


DENSE_ROWS = 1 << 30
"""``n_local`` that makes every row dense: :func:`visible` is then plain causal."""


def dense_row_params(n_last: int) -> TriangleParams:
    """Triangle parameters whose rows are all dense (a dynamic layer's dense rows)."""
    return TriangleParams(0, DENSE_ROWS, n_last)


@dataclass
class QueryBlockPlan:
    """The dynamic rows of a batch, one item per (request, query block part).

    Item ``i`` covers rows ``[q_pos, q_pos + n_q)`` (absolute positions) of
    request ``req``, the part of query block ``q_block`` (rows
    ``[q_block*B, (q_block+1)*B)``) that lies below the request's dense start and
    in this step; its first row is at index ``q_tok`` of the batch's queries.
    """

    req: np.ndarray
    q_tok: np.ndarray
    q_pos: np.ndarray
    n_q: np.ndarray
    q_block: np.ndarray
    block_size: int

    @property
    def num_items(self) -> int:
        return int(self.req.shape[0])


QUERY_BLOCK_FIELDS = ("req", "q_tok", "q_pos", "n_q", "q_block")


def plan_query_blocks(query_start_loc, seq_lens, dense_from, reqs, block_size: int) -> QueryBlockPlan:
    """Cut the rows below each dense start into parts of absolute query blocks."""
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    dense_from = np.asarray(dense_from, dtype=np.int64)
    out = {f: [] for f in QUERY_BLOCK_FIELDS}
    for r in np.asarray(reqs, dtype=np.int64).tolist():
        tok0, n = int(qsl[r]), int(qsl[r + 1] - qsl[r])
        p0 = int(seq_lens[r]) - n
        end = min(p0 + n, int(dense_from[r]))
        if end <= p0:
            continue
        lo = np.concatenate([[p0], np.arange((p0 // block_size + 1) * block_size, end, block_size)])
        hi = np.append(lo[1:], end)
        out["req"].append(np.full(lo.shape, r, dtype=np.int64))
        out["q_tok"].append(lo - p0 + tok0)
        out["q_pos"].append(lo)
        out["n_q"].append(hi - lo)
        out["q_block"].append(lo // block_size)
    arrays = {
        f: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64)).astype(np.int64)
        for f, v in out.items()
    }
    # Heaviest (most key blocks) first.
    order = np.argsort(-arrays["q_block"], kind="stable")
    return QueryBlockPlan(**{f: a[order] for f, a in arrays.items()}, block_size=block_size)
