"""The reference forwards are pure functions of their inputs: each result is computed once
per test session and reused (several test files check the same prompts against the same
rule). A small least-recently-used store bounds the memory.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

MAX_ENTRIES = 32
"""Results kept (at most a few MB each: [tokens, vocabulary] float64)."""


def map_key(layer_map) -> tuple | None:
    """What of a layer map a forward depends on (not where it was read from)."""
    if layer_map is None:
        return None
    return (layer_map.min_prompt_len, tuple(sorted(layer_map.layers.items())),
            tuple(sorted(layer_map.dynamic_layers.items())))


def memoized(logprobs):
    """Wrap a reference's ``logprobs(token_ids, layer_map, prompt_len=None, chunk_starts=(),
    **options)``; a hit returns a copy of the stored result and restores ``self.margin``."""

    @functools.wraps(logprobs)
    def wrapped(self, token_ids, layer_map, prompt_len=None, chunk_starts=(), **options):
        store = self.__dict__.setdefault("_memo", OrderedDict())
        key = (tuple(token_ids), map_key(layer_map),
               len(token_ids) if prompt_len is None else prompt_len,
               tuple(chunk_starts), tuple(sorted(options.items())))
        if key in store:
            store.move_to_end(key)
        else:
            result = logprobs(self, token_ids, layer_map, prompt_len, chunk_starts, **options)
            store[key] = (result, self.margin)
            while len(store) > MAX_ENTRIES:
                store.popitem(last=False)
        result, self.margin = store[key]
        return result.clone()

    return wrapped
