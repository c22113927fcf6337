"""Attention over the exact TriangleMix mask, in float32 (or float64) torch.

``masked_attention`` is the one softmax-attention routine of the CPU path and
of the tests: the CPU path calls it on the keys a work item needs, the tests
call :func:`reference_attention` on every key of a request (brute force) and
compare.
"""

from __future__ import annotations

import torch

from vllm_trianglemix.pattern import visible


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    dense_from: int,
    n_init: int,
    n_local: int,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Softmax attention of ``q`` over ``k``/``v`` under :func:`visible`.

    q: [Tq, Hq, D] at absolute positions ``q_pos`` (Tq); k, v: [Tk, Hkv, D]
    at absolute positions ``k_pos`` (Tk), Hq a multiple of Hkv (GQA: query
    head ``h`` reads KV head ``h // (Hq // Hkv)``). Returns [Tq, Hq, D] in
    ``compute_dtype``. Every row must see at least one key.
    """
    mask = visible(q_pos[:, None], k_pos[None, :], dense_from, n_init, n_local)
    return attention_with_mask(q, k, v, mask, scale, compute_dtype)


def attention_with_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Softmax attention under a boolean ``mask``: ``[Tq, Tk]`` for every head,
    or ``[Hkv, Tq, Tk]`` per KV head (shared by that head's query heads)."""
    group = q.shape[1] // k.shape[1]
    qf = q.to(compute_dtype).transpose(0, 1)  # [Hq, Tq, D]
    kf = k.to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Tq, Tk]
    if mask.dim() == 3:
        mask = mask.repeat_interleave(group, dim=0)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).transpose(0, 1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    dense_from: int,
    n_init: int,
    n_local: int,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Brute force for one request: queries at ``q_start ..``, keys at ``0 ..``.

    ``dense_from = 0`` gives plain causal attention.
    """
    q_pos = torch.arange(q_start, q_start + q.shape[0], device=q.device)
    k_pos = torch.arange(k.shape[0], device=q.device)
    return masked_attention(
        q, k, v, q_pos, k_pos, dense_from, n_init, n_local, scale, compute_dtype
    )
