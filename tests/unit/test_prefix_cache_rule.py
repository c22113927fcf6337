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


# -- dynamic layers: a block's tag also holds the prompt tokens its selections read --

DYN = parse_layer_map(
    {"n_init": 4, "n_local": 64, "n_last": 16, "min_prompt_len": 128, "triangle_layers": "2-3",
     "dynamic_layers": [0, 1], "dynamic": {"block_size": 64, "stride": 8, "threshold": 0.9}},
    "d.yaml",
)


def test_dynamic_tag_counts_sparse_dynamic_rows():
    tagger = BlockTagger(DYN)
    # Query block 0 ([0, 64)) keeps its only key block: no sparse dynamic rows there.
    assert tagger.dynamic_rows(400, 0, 32) == (0,) and tagger.dynamic_rows(400, 32, 64) == (0,)
    assert tagger.dynamic_rows(400, 64, 96) == (32,)
    assert tagger.dynamic_rows(400, 368, 400) == (16,)  # dense start 384
    assert tagger.dynamic_rows(100, 64, 96) == (0,)  # short prompt: dense
    assert tagger.tag(400, 32, 64) is None  # neither triangle (first sparse row 68) nor dynamic


def test_cache_hits_end_on_query_block_boundaries():
    tagger = BlockTagger(DYN)
    assert tagger.aligned_hit(400, 96, 32) == 64  # inside query block 1: back to 64
    assert tagger.aligned_hit(400, 128, 32) == 128
    assert tagger.aligned_hit(400, 32, 32) == 32  # query block 0 sees everything
    assert tagger.aligned_hit(700, 672, 32) == 640
    assert tagger.aligned_hit(400, 384, 32) == 384 and tagger.aligned_hit(420, 416, 32) == 416  # dense rows
    assert tagger.aligned_hit(100, 96, 32) == 96  # short prompt: dense
    odd = BlockTagger(parse_layer_map({**DYN.raw, "dynamic": {"block_size": 48, "stride": 8}}, "o"))
    assert odd.aligned_hit(400, 160, 32) == 96  # a multiple of both 48 and the cache's 32


def test_keep_everything_dynamic_layers_hash_like_triangle_only():
    full = parse_layer_map({**DYN.raw, "dynamic": {"threshold": 1.0, "block_size": 64}}, "f.yaml")
    tri = parse_layer_map({k: v for k, v in DYN.raw.items() if not k.startswith("dynamic")}, "t.yaml")
    for s in range(0, 416, 32):
        assert BlockTagger(full).tag(400, s, s + 32)[2][:1] == BlockTagger(tri).tag(400, s, s + 32)[2] \
            if BlockTagger(tri).tag(400, s, s + 32) else BlockTagger(full).tag(400, s, s + 32) is None
        assert BlockTagger(full).aligned_hit(400, s, 32) == s
