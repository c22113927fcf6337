"""Prefix caching under TriangleMix: which cached K/V may be reused.

vLLM reuses a cached block when the hash chain of its token ids (plus "extra
keys") matches. Under TriangleMix the K/V of a position also depend on how the
rows up to it were computed: in layers after the first triangle layer, the K/V
at position ``p`` differ depending on whether row ``p`` (and earlier rows) were
triangle rows or dense rows, and that depends on the request's prompt length.

The rule (exact in every case): each full block gets an extra hash key that
records, per distinct parameter set of the map, how many of its rows are
*sparse* rows, i.e. triangle rows that see fewer keys than dense attention
(``first_sparse_row <= p < dense start``). Blocks without sparse rows get no
extra key, so they hash exactly as under the stock backend. A cached block is
reused only by a request that computes every row of it, and of every block
before it (the hash is a chain), the same way; so a cache hit always gives
what a fresh prefill gives.

What that means in practice:

* the same prompt again, a shared system prompt or document prefix, a
  request resumed after preemption: hits, exactly as without TriangleMix;
* short prompts (below ``min_prompt_len``) only share blocks computed dense;
* multi-turn chat: the next turn's prompt contains the previous prompt's last
  ``n_last`` rows and the previous answer, which were computed dense but are
  sparse rows now. The cache hit stops at the first such block and the rest
  (about ``n_last`` + answer + new message tokens) is recomputed as triangle
  rows; everything before it is reused.

Dynamic layers (TriangleMix + XAttention) extend the rule in two ways. The
tag also counts each block's *sparse dynamic* rows (``block_size <= p <
dense start``, unless the layer keeps every block). And a dynamic row's output
depends on the selection of its query block (``block_size`` rows at absolute
positions), which reads every row of that block below the dense start,
including rows *after* the row itself: so a cache hit is cut back to the last
query-block boundary when it would end inside a query block with sparse
dynamic rows (hooked at ``KVCacheManager.get_computed_blocks``). Every block
of a hit then depends only on tokens inside the hit, and the request's next
step starts on a query-block boundary, as a fresh prefill's does. (Blocks are
cached as the request that computed them chunked them: a chunk boundary that
cut a query block there changed that block's selection, see pattern.py.)

On a hybrid the hit also needs the linear layers' state at its end, which
vLLM keeps only at some block boundaries ("align" mode): the first blocks of
a longer hit may end where no state is kept, so a hit to be cut is looked up
again through vLLM's coordinator, no longer than the cut, until it ends on a
query-block boundary (or is empty).

The tag is added in the engine-core process (where vLLM hashes blocks); the
hook is installed there only, and is a no-op unless the engine selected
TriangleMix.
"""

from __future__ import annotations

import functools
import dataclasses
import hashlib
import math
import sys

from vllm_trianglemix.config import LayerMap
from vllm_trianglemix.pattern import dense_start, dynamic_first_sparse_row, first_sparse_row

ENGINE_CORE_MODULE = "vllm.v1.engine.core"

_tagger: "BlockTagger | None" = None


class BlockTagger:
    """Extra hash key of a block, from the request's prompt length and the map."""

    def __init__(self, layer_map: LayerMap):
        self.param_sets = layer_map.param_sets
        self.dynamic_sets = layer_map.dynamic_param_sets
        self.min_prompt_len = layer_map.min_prompt_len
        # Which layers run which parameters: blocks computed under another map never match.
        what = (sorted(layer_map.layers.items()), layer_map.min_prompt_len)
        if layer_map.dynamic_layers:
            what += (sorted(layer_map.dynamic_layers.items()),)
        self.digest = hashlib.sha256(repr(what).encode()).hexdigest()[:16]

    def sparse_rows(self, prompt_len: int, start: int, end: int) -> tuple[int, ...]:
        """Per parameter set: how many rows of block [start, end) are sparse."""
        counts = []
        for p in self.param_sets:
            lo = max(start, first_sparse_row(p))
            hi = min(end, int(dense_start(prompt_len, p.n_last, self.min_prompt_len)))
            counts.append(max(0, hi - lo))
        return tuple(counts)

    def dynamic_rows(self, prompt_len: int, start: int, end: int) -> tuple[int, ...]:
        """Per dynamic parameter set: how many rows of block [start, end) are sparse."""
        counts = []
        for p in self.dynamic_sets:
            ds = int(dense_start(prompt_len, p.n_last, self.min_prompt_len))
            counts.append(max(0, min(end, ds) - max(start, dynamic_first_sparse_row(p))))
        return tuple(counts)

    def tag(self, prompt_len: int, start: int, end: int):
        counts = self.sparse_rows(prompt_len, start, end) + self.dynamic_rows(prompt_len, start, end)
        if not any(counts):
            return None
        return ("trianglemix", self.digest, counts)

    def aligned_hit(self, prompt_len: int, hit: int, kv_block_size: int) -> int:
        """A cache hit of ``hit`` tokens, cut back so that it does not end inside
        a query block with sparse dynamic rows (a multiple of ``kv_block_size``)."""
        for p in self.dynamic_sets:
            ds = int(dense_start(prompt_len, p.n_last, self.min_prompt_len))
            if dynamic_first_sparse_row(p) <= hit < ds and hit % p.block_size:
                unit = math.lcm(p.block_size, kv_block_size)
                hit = hit // unit * unit
        return hit


def active_tagger() -> BlockTagger | None:
    return _tagger


def install() -> bool:
    """In the engine-core process, hook block hashing and scheduler start-up."""
    if ENGINE_CORE_MODULE not in sys.modules:
        return False
    import vllm.v1.core.kv_cache_utils as kv_cache_utils
    import vllm.v1.core.sched.scheduler as scheduler

    if getattr(kv_cache_utils, "_trianglemix_wrapped", False):
        return True
    extra_keys = kv_cache_utils.generate_block_hash_extra_keys

    @functools.wraps(extra_keys)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm_idx = extra_keys(request, start_token_idx, end_token_idx, start_mm_idx)
        tagger = _tagger
        if tagger is None:
            return keys, next_mm_idx
        tag = tagger.tag(request.num_prompt_tokens, start_token_idx, end_token_idx)
        if tag is None:
            return keys, next_mm_idx
        return (keys or ()) + (tag,), next_mm_idx

    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys
    kv_cache_utils._trianglemix_wrapped = True

    init = scheduler.Scheduler.__init__

    @functools.wraps(init)
    def scheduler_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _configure(self.vllm_config)

    scheduler.Scheduler.__init__ = scheduler_init
    _wrap_cache_hits()
    return True


def _wrap_cache_hits() -> None:
    """Cut cache hits back to query-block boundaries (dynamic layers only)."""
    import vllm.v1.core.kv_cache_manager as kv_cache_manager

    manager = kv_cache_manager.KVCacheManager
    get_computed_blocks = manager.get_computed_blocks

    @functools.wraps(get_computed_blocks)
    def wrapped(self, request, *args, **kwargs):  # 0.33: optional max_cache_hit_length
        result = get_computed_blocks(self, request, *args, **kwargs)
        tagger = _tagger
        if tagger is None or not tagger.dynamic_sets or not result[1]:
            return result
        blocks, hit = result[0], result[1]
        sizes = [g.kv_cache_spec.block_size for g in self.kv_cache_config.kv_cache_groups]
        kept = tagger.aligned_hit(request.num_prompt_tokens, hit, math.lcm(*sizes))
        if kept == hit:
            return result
        if len(sizes) == 1:  # one group of attention blocks: the hit's first blocks
            trimmed = tuple(list(group[: kept // size]) for group, size in zip(blocks.blocks, sizes))
            return (dataclasses.replace(blocks, blocks=trimmed), kept, *result[2:])
        return _shorter_hit(self, request, tagger, kept, result)

    manager.get_computed_blocks = wrapped


def _shorter_hit(manager, request, tagger: BlockTagger, kept: int, result):
    """A hybrid's hit, looked up again no longer than ``kept``.

    A hybrid's hit also needs the linear layers' state at its end, which vLLM
    keeps only at some block boundaries (its "align" mode): the first blocks of
    a longer hit may end where no state is cached. So the coordinator looks the
    hit up again with ``kept`` as its longest length (attention blocks and a
    cached state agreeing, as vLLM finds them) until it ends on a query-block
    boundary (or is empty).
    """
    lookup = manager.coordinator.find_longest_cache_hit
    sizes = [g.kv_cache_spec.block_size for g in manager.kv_cache_config.kv_cache_groups]
    unit = math.lcm(*sizes)
    while True:
        found = lookup(request.block_hashes, kept)
        computed, hit = found[0], found[1]
        uncached = found[2] if len(found) > 2 else 0
        aligned = tagger.aligned_hit(request.num_prompt_tokens, hit, unit)
        if aligned == hit:
            break
        kept = aligned
    blocks = manager.create_kv_cache_blocks(computed)
    if len(result) == 2:
        return blocks, hit
    # vLLM's shared-prefix boundary, as get_computed_blocks computes it
    return (blocks, hit, hit + uncached if uncached else 0, *result[3:])


def _configure(vllm_config) -> None:
    global _tagger
    from vllm_trianglemix import selection

    _tagger = None
    if selection.is_selected(vllm_config) and vllm_config.cache_config.enable_prefix_caching:
        _tagger = BlockTagger(selection.engine_layer_map(vllm_config))
