"""An independent float64 reference of the dynamic-layer (XAttention) selection.

It follows the definition written in ``vllm_trianglemix/pattern.py`` term by
term, without sharing code with the plugin: the full score matrix of the
present rows, the antidiagonal terms picked pair by pair
(``row % S + key % S == S - 1``), a softmax per query group, block sums, then
the keep rule as a plain loop. It also reports how close each decision came to
flipping (``margin``), so tests can choose inputs without near ties instead of
loosening tolerances.
"""

from __future__ import annotations

import math

import torch


def block_masses(q, k, q_pos0: int, block_size: int, stride: int, scale: float):
    """Float64 block masses ``[Hkv, b + 1]`` of the present rows ``q`` (positions
    ``q_pos0 ..``, all in one query block ``b``) over keys ``k`` (positions ``0 ..``)."""
    n, hq, _ = q.shape
    hkv = k.shape[1]
    S, B = stride, block_size
    b = q_pos0 // B
    assert (q_pos0 + n - 1) // B == b
    dev = q.device
    rows = torch.arange(q_pos0, q_pos0 + n, device=dev)
    keys = torch.arange(k.shape[0], device=dev)
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("rhd,khd->hrk", q.double(), kk) * scale  # [Hq, n, N]
    pair = ((rows[:, None] % S + keys[None, :] % S) == S - 1) & (keys[None, :] <= rows[:, None])
    n_groups = (b + 1) * B // S
    a = torch.zeros(n_groups, n_groups, hq, dtype=torch.float64, device=dev)
    defined = torch.zeros(n_groups, n_groups, dtype=torch.bool, device=dev)
    r_idx, k_idx = pair.nonzero(as_tuple=True)
    g, h = rows[r_idx] // S, keys[k_idx] // S
    a.index_put_((g, h), scores[:, r_idx, k_idx].T / S, accumulate=True)
    a = a.permute(2, 0, 1)  # [Hq, G, H]
    defined[g, h] = True
    present = defined.any(1)  # query groups with at least one defined score
    # a softmax per present query group over its defined key groups, summed over the query
    # groups, then over each key block's B // S groups
    p = torch.softmax(a[:, present].masked_fill(~defined[present], float("-inf")), dim=-1)
    mass = p.sum(1).view(hq, b + 1, B // S).sum(-1)
    return mass.view(hkv, hq // hkv, b + 1).sum(1)


def keep_rule(mass, b: int, threshold: float, max_density):
    """(kept blocks [Hkv, b+1] bool, margin): the rule, as a loop per KV head."""
    keep = torch.zeros(mass.shape, dtype=torch.bool, device=mass.device)
    margin = math.inf
    for t in range(mass.shape[0]):
        m = (mass[t] / mass[t].sum()).tolist()
        forced = sorted({0, b})
        kept = list(forced)
        others = sorted((j for j in range(b + 1) if j not in forced), key=lambda j: (-m[j], j))
        cap = b + 1 if max_density is None else max(2, math.ceil(max_density * (b + 1)))
        total = sum(m[j] for j in forced)
        for i, j in enumerate(others):
            if threshold < 1.0:
                margin = min(margin, abs(total - threshold))  # each comparison with tau
            if len(kept) >= cap or (threshold < 1.0 and total >= threshold):
                if i > 0:  # the ranking cut: last block taken vs first left out
                    margin = min(margin, m[others[i - 1]] - m[j])
                break
            kept.append(j)
            total += m[j]
        keep[t, kept] = True
    return keep, margin


def dynamic_attention(q, k, v, q_pos0: int, dense_from: int, block_size: int, stride: int,
                      threshold: float, max_density, scale: float, chunk_starts=()):
    """Float64 attention of rows ``q`` (positions ``q_pos0 ..``) of a dynamic layer.

    Rows at or past ``dense_from`` are dense; the others are grouped by query
    block (cut also at ``chunk_starts``, positions where a step begins) and
    attend to their kept key blocks. Returns (output [n, Hq, D], min margin).
    """
    n, hq, _ = q.shape
    hkv = k.shape[1]
    dev = q.device
    out = torch.empty(n, hq, q.shape[2], dtype=torch.float64, device=dev)
    margin = math.inf
    cuts = sorted({q_pos0, q_pos0 + n, dense_from, *chunk_starts,
                   *range((q_pos0 // block_size + 1) * block_size, q_pos0 + n, block_size)})
    cuts = [c for c in cuts if q_pos0 <= c <= q_pos0 + n]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    vv = v.double().repeat_interleave(hq // hkv, dim=1)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        rows = torch.arange(lo, hi, device=dev)
        keys = torch.arange(hi, device=dev)
        allowed = (keys[None, :] <= rows[:, None]).expand(hq, -1, -1).clone()
        if lo < dense_from:
            b = lo // block_size
            mass = block_masses(q[lo - q_pos0 : hi - q_pos0], k[:hi], lo, block_size, stride, scale)
            keep, m = keep_rule(mass, b, threshold, max_density)
            margin = min(margin, m)
            kept_keys = keep[:, keys // block_size].repeat_interleave(hq // hkv, dim=0)  # [Hq, K]
            allowed &= kept_keys[:, None, :]
        s = torch.einsum("rhd,khd->hrk", q[lo - q_pos0 : hi - q_pos0].double(), kk[:hi]) * scale
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        out[lo - q_pos0 : hi - q_pos0] = torch.einsum("hrk,khd->rhd", p, vv[:hi])
    return out, margin
