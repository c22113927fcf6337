"""The prefix-cache rule: a block's extra hash key records how its rows were computed."""

from vllm_trianglemix.config import parse_layer_map
from vllm_trianglemix.pattern import dense_start, first_sparse_row, visible
from vllm_trianglemix.prefix_cache import BlockTagger

MAP = parse_layer_map(
    {"n_init": 4, "n_local": 64, "n_last": 16, "min_prompt_len": 128, "triangle_layers": "2-3",
     "layer_overrides": {3: {"n_local": 32}}},
    "t.yaml",
)
BS = 32


def rows_computed_sparse(prompt_len, start, end):
    """Brute force from the rule: per parameter set, rows that see fewer keys than dense."""
    out = []
    for p in sorted(set(MAP.layers.values()), key=lambda p: (p.n_init, p.n_local, p.n_last)):
        ds = int(dense_start(prompt_len, p.n_last, MAP.min_prompt_len))
        out.append(sum(1 for q in range(start, end)
                       if not all(visible(q, k, ds, p.n_init, p.n_local) for k in range(q + 1))))
    return tuple(out)


def test_tag_counts_sparse_rows_exactly():
    tagger = BlockTagger(MAP)
    for L in (50, 127, 128, 200, 333, 1000):
        for start in range(0, L + 64, BS):
            counts = tagger.sparse_rows(L, start, start + BS)
            assert counts == rows_computed_sparse(L, start, start + BS), (L, start)
            assert (tagger.tag(L, start, start + BS) is None) == (not any(counts))


def test_same_prompt_and_resumed_request_share_every_tag():
    tagger = BlockTagger(MAP)
    assert [tagger.tag(400, s, s + BS) for s in range(0, 448, BS)] == [tagger.tag(400, s, s + BS) for s in range(0, 448, BS)]


def test_dense_computed_blocks_hash_like_stock():
    tagger = BlockTagger(MAP)
    p = sorted(set(MAP.layers.values()), key=lambda p: p.n_local)[0]
    assert tagger.tag(100, 64, 96) is None  # short prompt: dense everywhere
    assert tagger.tag(1000, 0, first_sparse_row(p) // BS * BS) is None  # rows before the first sparse row
    assert tagger.tag(1000, 992, 1024) is None  # the last n_last rows and generated tokens


def test_multi_turn_tail_is_recomputed_not_reused():
    """Turn 1 (L=400) computed rows 384.. dense; in turn 2 (L=900) they are sparse: tags differ."""
    tagger = BlockTagger(MAP)
    assert tagger.tag(400, 384, 416) != tagger.tag(900, 384, 416)
    assert tagger.tag(400, 320, 352) == tagger.tag(900, 320, 352)
