"""The rule, stated once in pattern.py, against the paper's wording; the tile plan against the rule."""

import itertools

import numpy as np
import pytest

from vllm_trianglemix.pattern import (
    TriangleParams,
    block_key_ranges,
    dense_start,
    first_sparse_row,
    plan_blocks,
    tile_fully_visible,
    unmasked_key_span,
    visible,
)


def paper_rule(q, k, L, n_init, n_local, n_last):
    """arXiv 2507.21526, as the brief states it, written independently."""
    if k > q:
        return False
    if q >= L - n_last:
        return True
    return k < n_init or k > q - n_local


@pytest.mark.parametrize("L,n_init,n_local,n_last", [(40, 3, 7, 5), (33, 0, 1, 0), (25, 30, 2, 4), (50, 4, 60, 50)])
def test_visible_is_the_paper_rule(L, n_init, n_local, n_last):
    ds = int(dense_start(L, n_last, min_prompt_len=0))
    for q, k in itertools.product(range(L + 5), repeat=2):  # + generated tokens
        assert bool(visible(q, k, ds, n_init, n_local)) == paper_rule(q, k, L, n_init, n_local, n_last), (q, k)


def test_short_prompts_are_dense():
    assert int(dense_start(100, 16, min_prompt_len=128)) == 0
    assert int(dense_start(128, 16, min_prompt_len=128)) == 112
    assert all(visible(q, k, 0, 4, 8) for q in range(30) for k in range(q + 1))


def test_first_sparse_row():
    p = TriangleParams(4, 8, 2)
    for q in range(40):
        sparse = not all(visible(q, k, 10**9, p.n_init, p.n_local) for k in range(q + 1))
        assert sparse == (q >= first_sparse_row(p))


def test_tile_shortcuts_never_hide_a_key():
    for q_lo, n_q, k_lo, n_k, ds in itertools.product(range(0, 40, 3), (1, 4, 7), range(0, 40, 3), (1, 5, 8), (0, 20, 10**9)):
        q_hi, k_hi = q_lo + n_q - 1, k_lo + n_k - 1
        every = all(visible(q, k, ds, 3, 9) for q in range(q_lo, q_hi + 1) for k in range(k_lo, k_hi + 1))
        if tile_fully_visible(q_lo, q_hi, k_lo, k_hi, ds, 3, 9):
            assert every
        lo, hi = unmasked_key_span(q_lo, q_hi, ds, 3, 9)
        for k in range(max(lo, 0), hi):
            assert all(visible(q, k, ds, 3, 9) for q in range(q_lo, q_hi + 1))


def _check_plan_covers_rule(qsl, seq, dense_from, params, block_q):
    plan = plan_blocks(qsl, seq, dense_from, np.arange(len(seq)), params, block_q)
    covered = {}  # (req, q) -> key sets of the items that hold the row
    for i in range(plan.num_items):
        r, q0, n = int(plan.req[i]), int(plan.q_pos[i]), int(plan.n_q[i])
        assert 1 <= n <= block_q
        keys = set(range(int(plan.sink_end[i]))) | set(range(int(plan.k_start[i]), int(plan.k_end[i])))
        rows = range(q0, q0 + n)
        dense_rows = {q >= dense_from[r] for q in rows}
        assert len(dense_rows) == 1, "a block mixes dense and triangle rows"
        for q in rows:
            covered.setdefault((r, q), []).append(keys)
        assert plan.q_tok[i] == qsl[r] + q0 - (seq[r] - (qsl[r + 1] - qsl[r]))
    for r in range(len(seq)):
        first = seq[r] - (qsl[r + 1] - qsl[r])
        for q in range(first, seq[r]):
            sets = covered.pop((r, q))
            assert len(sets) == 1, "a row in several items"
            needed = {k for k in range(q + 1) if visible(q, k, dense_from[r], params.n_init, params.n_local)}
            assert needed <= sets[0]
    assert not covered
    return plan


def test_plan_covers_every_visible_key_once():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = rng.integers(1, 4)
        q_lens = rng.integers(1, 60, size=n)
        first = rng.integers(0, 80, size=n)
        seq = first + q_lens
        qsl = np.concatenate([[0], np.cumsum(q_lens)])
        prompt = seq + rng.integers(-30, 10, size=n)
        params = TriangleParams(int(rng.integers(0, 6)), int(rng.integers(1, 30)), int(rng.integers(0, 20)))
        ds = dense_start(prompt, params.n_last, min_prompt_len=int(rng.integers(0, 60)))
        plan = _check_plan_covers_rule(qsl, seq, ds, params, block_q=int(rng.choice([4, 8, 16])))
        weights = plan.k_end - plan.k_start + plan.sink_end
        assert np.all(np.diff(weights) <= 0), "heaviest items first"


def test_key_ranges_are_tight_for_triangle_rows():
    sink_end, k_start, k_end = block_key_ranges(np.array([100]), np.array([115]), np.array([False]), 8, 32)
    assert (int(sink_end[0]), int(k_start[0]), int(k_end[0])) == (8, 69, 116)


def _rows(plan):
    """The (request, position) pairs a plan's items cover."""
    return {(int(r), int(p)) for r, p0, n in zip(plan.req, plan.q_pos, plan.n_q) for p in range(p0, p0 + n)}


def test_plan_rows_split_at_the_dense_start():
    """``rows="triangle"`` plans the rows below each dense start (the engine's kernel rows),
    ``rows="dense"`` the others; together they are ``rows="all"``'s, with no row twice."""
    rng = np.random.default_rng(1)
    params = TriangleParams(4, 16, 12)
    for _ in range(30):
        n = rng.integers(1, 4)
        q_lens = rng.integers(1, 60, size=n)
        seq = rng.integers(0, 80, size=n) + q_lens
        qsl = np.concatenate([[0], np.cumsum(q_lens)])
        ds = dense_start(seq + rng.integers(0, 20, size=n), params.n_last, 0)
        plans = {rows: plan_blocks(qsl, seq, ds, np.arange(n), params, 8, rows=rows)
                 for rows in ("all", "dense", "triangle")}
        tri, dense = _rows(plans["triangle"]), _rows(plans["dense"])
        assert all(p < ds[r] for r, p in tri) and all(p >= ds[r] for r, p in dense)
        assert tri | dense == _rows(plans["all"]) and not tri & dense


def test_plan_refuses_unknown_rows():
    qsl, seq, ds = np.array([0, 10]), np.array([10]), np.array([5])
    with pytest.raises(ValueError, match="rows='bogus'"):
        plan_blocks(qsl, seq, ds, np.arange(1), TriangleParams(4, 16, 5), 8, rows="bogus")


def test_rows_left_to_the_stock_backend():
    """Every row of the requests the triangle path does not take, and each taken request's rows
    at or past its dense start: the last rows of its query."""
    from vllm_trianglemix.backends.common import BatchRoute, stock_row_ranges

    # r0: decode; r1: chunk below the dense start (100); r2: chunk across it (dense from 40);
    # r3: a short prompt; r4: a chunk whose last row is the dense start.
    q_lens = np.array([1, 30, 20, 5, 10])
    seq = np.array([50, 60, 50, 5, 91])
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    dense_from = np.array([0, 100, 40, 0, 90])
    route = BatchRoute(triangle_reqs=np.array([1, 2, 4]), stock_reqs=np.array([0, 3]),
                       prompt_len=np.zeros(5, dtype=np.int64), query_start_loc=qsl, seq_lens=seq)
    reqs, starts, ends = stock_row_ranges(route, dense_from)
    assert reqs.tolist() == [0, 2, 3, 4]
    # r2's rows are positions 30..49 at tokens 31..50: positions 40..49 are dense (tokens 41..50)
    assert list(zip(starts.tolist(), ends.tolist())) == [(0, 1), (41, 51), (51, 56), (65, 66)]
