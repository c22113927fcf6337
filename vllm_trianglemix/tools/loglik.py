"""Log-likelihood agreement with dense on long natural text, through vLLM's prompt logprobs.

The text is Python's own reference documentation, which every Python
installation ships (``pydoc_data.topics``, about 100K tokens of English prose
and code): the topics in name order, cut into windows of ``length`` tokens by
the server's own tokenizer (``/tokenize``). Each window is sent once to each
server with ``prompt_logprobs`` (vLLM's extension of ``/v1/completions``):
per position, the log-probability of the text's next token and the ``top_k``
most likely tokens. Against the dense server, per position:

* top-1 agreement: the most likely next token is the same;
* |delta logprob| of the text's next token, and each server's mean negative
  log-likelihood (perplexity = exp of it);
* KL(dense || other) of the next-token distribution, coarse-grained to dense's
  top-k tokens plus one bucket for the rest of the vocabulary. By the data
  processing inequality this is at most the full KL; a dense top-k token
  outside the other server's top-k is given the other's k-th probability
  (capped so its mass stays a distribution), the one estimate in it.

Reported over the last ``tail`` positions of each window (default 64): the
text's end read after its long beginning, the rows TriangleMix keeps dense and
an answer is generated from, whose inputs the sparse rows computed; also over
every position (a triangle layer's sparse rows change their own next-token
distributions directly, most in the deepest layers) and per position bucket.
"""

from __future__ import annotations

import math


def document_text() -> str:
    """Python's reference documentation as shipped with Python (deterministic order)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def document_source() -> str:
    """Which text :func:`document_text` is. Python releases revise their documentation, so two
    machines with other Pythons score other windows: results name the version and a digest."""
    import hashlib
    import platform

    digest = hashlib.sha256(document_text().encode()).hexdigest()[:12]
    return f"pydoc_data.topics of Python {platform.python_version()}, sha256 {digest}"


def windows(server, length: int, count: int) -> list[list[int]]:
    """``count`` consecutive windows of ``length`` tokens of :func:`document_text`."""
    text = document_text()
    ids = server.tokenize(text[: max(1, 8 * length * count)])
    if len(ids) < length * count:
        ids = server.tokenize(text)
    if len(ids) < length * count:
        raise RuntimeError(f"the documentation text has {len(ids)} tokens, fewer than "
                           f"{count} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def _top1(row: dict[int, tuple[float, int]]) -> int:
    return min(row, key=lambda t: (row[t][1] if row[t][1] is not None else 1 << 30, -row[t][0]))


def position_stats(token: int, dense: dict, other: dict, top_k: int) -> dict[str, float]:
    """The per-position numbers of one next-token distribution pair."""
    lp_d, lp_o = dense[token][0], other[token][0]
    ranked_d = sorted(dense, key=lambda t: -dense[t][0])[:top_k]
    ranked_o = sorted(other, key=lambda t: -other[t][0])[:top_k]
    floor_o = other[ranked_o[-1]][0] if ranked_o else -math.inf
    p = [math.exp(dense[t][0]) for t in ranked_d]
    known = {t: math.exp(other[t][0]) for t in ranked_d if t in other}
    missing = [t for t in ranked_d if t not in other]
    room = max(0.0, 1.0 - sum(math.exp(v[0]) for v in other.values()))
    fill = min(math.exp(floor_o), room / len(missing)) if missing else 0.0
    q = [known.get(t, fill) for t in ranked_d]
    p_rest, q_rest = max(0.0, 1.0 - sum(p)), max(0.0, 1.0 - sum(q))
    kl = 0.0
    for pi, qi in zip(p + [p_rest], q + [q_rest]):
        if pi > 0:
            kl += pi * (math.log(pi) - math.log(max(qi, 1e-30)))
    return {"top1": float(_top1(dense) == _top1(other)), "dlp": abs(lp_d - lp_o),
            "kl": max(kl, 0.0), "nll_dense": -lp_d, "nll_other": -lp_o}


def _summary(stats: list[dict]) -> dict:
    n = len(stats)
    if not n:
        return {"positions": 0}
    mean = {k: sum(s[k] for s in stats) / n for k in stats[0]}
    return {
        "positions": n,
        "top1_agreement": mean["top1"],
        "mean_abs_delta_logprob": mean["dlp"],
        "kl": mean["kl"],
        "max_kl": max(s["kl"] for s in stats),
        "ppl_dense": math.exp(mean["nll_dense"]),
        "ppl": math.exp(mean["nll_other"]),
    }


def compare(docs: list[list[int]], dense_rows: list[list[dict]], other_rows: list[list[dict]],
            top_k: int, tail: int = 64, bucket: int = 512) -> dict:
    """Means over the last ``tail`` positions of each window (the text's end given its long
    beginning: what TriangleMix keeps dense and an answer is read from), over every
    position, and per position bucket."""
    every, end = [], []
    buckets: dict[int, list[dict]] = {}
    for ids, d_rows, o_rows in zip(docs, dense_rows, other_rows):
        for pos, (token, d, o) in enumerate(zip(ids[1:], d_rows, o_rows), start=1):
            stats = position_stats(token, d, o, top_k)
            every.append(stats)
            if pos >= len(ids) - tail:
                end.append(stats)
            buckets.setdefault(pos // bucket * bucket, []).append(stats)
    out = _summary(end) | {"tail": tail, "all_positions": _summary(every)}
    out["by_position"] = [{"from": start, "positions": len(b),
                           "top1_agreement": sum(s["top1"] for s in b) / len(b),
                           "kl": sum(s["kl"] for s in b) / len(b)}
                          for start, b in sorted(buckets.items())]
    return out


def collect(server, docs: list[list[int]], top_k: int) -> list[list[dict]]:
    return [server.prompt_logprobs(ids, top_k) for ids in docs]
