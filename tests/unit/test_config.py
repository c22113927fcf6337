"""Layer maps: parsing, bundled maps, and every refusal names the file and the field."""

import pytest

from vllm_trianglemix.config import (
    ADDITIONAL_CONFIG_KEY,
    RESOLVED_KEY,
    TriangleMixConfigError,
    bundled_map_paths,
    find_bundled_map,
    load_layer_map,
    parse_layer_map,
    resolve_layer_map,
    to_additional_config,
)
from vllm_trianglemix.pattern import TriangleParams

GOOD = {"n_init": 8, "n_local": 512, "n_last": 128, "min_prompt_len": 8192, "triangle_layers": "16-31"}


def write(tmp_path, text, name="map.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bundled_maps_load_and_match_their_models():
    names = {p.rsplit("/", 1)[-1] for p in bundled_map_paths()}
    assert {"llama-3.1-8b-instruct.yaml", "llama-3-8b-instruct-262k.yaml", "qwen2.5-7b-instruct.yaml"} <= names
    llama = find_bundled_map("meta-llama/Llama-3.1-8B-Instruct")
    assert sorted(llama.layers) == list(range(16, 32))
    assert set(llama.layers.values()) == {TriangleParams(8, 512, 128)}
    assert find_bundled_map("/models/Meta-Llama-3.1-8B-Instruct/").layers == llama.layers
    assert sorted(find_bundled_map("Qwen/Qwen2.5-7B-Instruct").layers) == list(range(20, 28))
    assert sorted(find_bundled_map("gradientai/Llama-3-8B-Instruct-262k").layers) == list(range(16, 32))
    assert find_bundled_map("mistralai/Mistral-7B-v0.1") is None


def test_layer_ranges_and_overrides(tmp_path):
    m = parse_layer_map({**GOOD, "triangle_layers": [1, "3-4", "6"], "layer_overrides": {3: {"n_local": 64}, "4": {"n_last": 0}}}, "x.yaml")
    assert sorted(m.layers) == [1, 3, 4, 6]
    assert m.params_for(3) == TriangleParams(8, 64, 128)
    assert m.params_for(4) == TriangleParams(8, 512, 0)
    assert m.params_for(2) is None
    assert "layers 1,6 (n_init=8, n_local=512, n_last=128)" in m.describe()
    assert sorted(parse_layer_map({**GOOD, "triangle_layers": "1,3,5-6"}, "x").layers) == [1, 3, 5, 6]


def test_round_trip_through_additional_config(tmp_path):
    path = write(tmp_path, "n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: '2-3'\nlayer_overrides: {3: {n_init: 0}}\n")
    m = load_layer_map(path)
    resolved = resolve_layer_map({RESOLVED_KEY: to_additional_config(m)}, "anything")
    assert resolved.layers == m.layers and resolved.source == path
    assert resolve_layer_map({ADDITIONAL_CONFIG_KEY: path}, "anything").layers == m.layers


def test_no_map_for_the_model_says_how_to_give_one():
    with pytest.raises(TriangleMixConfigError) as e:
        resolve_layer_map({}, "some/unknown-model")
    assert ADDITIONAL_CONFIG_KEY in str(e.value) and "unknown-model" in str(e.value)


@pytest.mark.parametrize(
    "text,field",
    [
        ("n_init: [1, 2\n", None),  # malformed YAML
        ("- 1\n- 2\n", None),  # not a mapping
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\nstarting_layer: 3\n", "starting_layer"),
        ("n_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\n", "n_init"),
        ("n_init: 8\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\n", "n_local"),
        ("n_init: 8\nn_local: 512\nmin_prompt_len: 0\ntriangle_layers: [1]\n", "n_last"),
        ("n_init: 8\nn_local: 512\nn_last: 128\ntriangle_layers: [1]\n", "min_prompt_len"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\n", "triangle_layers"),
        ("n_init: -1\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\n", "n_init"),
        ("n_init: 8\nn_local: 0\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\n", "n_local"),
        ("n_init: 8\nn_local: 512\nn_last: -5\nmin_prompt_len: 0\ntriangle_layers: [1]\n", "n_last"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: -1\ntriangle_layers: [1]\n", "min_prompt_len"),
        ("n_init: true\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\n", "n_init"),
        ("n_init: 8\nn_local: 5.5\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\n", "n_local"),
        ("n_init: 8\nn_local: '512'\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\n", "n_local"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: '16-x'\n", "triangle_layers[0]"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: '20-10'\n", "triangle_layers[0]"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1, -2]\n", "triangle_layers[1]"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1, '0-2']\n", "triangle_layers"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: []\n", "triangle_layers"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\nlayer_overrides: {2: {n_local: 4}}\n", "layer_overrides.2"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\nlayer_overrides: {1: {window: 4}}\n", "layer_overrides.1.window"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\nlayer_overrides: {1: {n_local: 0}}\n", "layer_overrides.1.n_local"),
        ("n_init: 8\nn_local: 512\nn_last: 128\nmin_prompt_len: 0\ntriangle_layers: [1]\nmodel: 3\n", "model"),
    ],
)
def test_bad_maps_name_file_and_field(tmp_path, text, field):
    path = write(tmp_path, text)
    with pytest.raises(TriangleMixConfigError) as e:
        load_layer_map(path)
    assert path in str(e.value)
    if field is None:
        assert e.value.field is None
    else:
        assert e.value.field == field and f"'{field}'" in str(e.value)


def test_missing_file():
    with pytest.raises(TriangleMixConfigError, match="no such file"):
        load_layer_map("/nonexistent/map.yaml")


def test_layers_outside_the_model():
    m = parse_layer_map({**GOOD, "triangle_layers": "16-40"}, "big.yaml")
    with pytest.raises(TriangleMixConfigError, match=r"layer 32 is outside the model \(32 layers: 0-31\)") as e:
        m.check_model(32)
    assert e.value.field == "triangle_layers"
    m = parse_layer_map({**GOOD, "num_hidden_layers": 28, "triangle_layers": "20-27"}, "q.yaml")
    m.check_model(28)
    with pytest.raises(TriangleMixConfigError) as e:
        m.check_model(32)
    assert e.value.field == "num_hidden_layers"


# -- dynamic layers (TriangleMix + XAttention) --

DYN = {**GOOD, "dynamic_layers": "0-15"}


def test_dynamic_layers_take_xattention_defaults():
    m = parse_layer_map(DYN, "d.yaml")
    p = m.params_for(3)
    assert (p.method, p.block_size, p.stride, p.threshold, p.max_density, p.n_last) == (
        "xattention", 128, 8, 0.9, None, 128)
    assert m.params_for(20) == TriangleParams(8, 512, 128)
    assert "dynamic layers 0-15 (xattention: block_size=128, stride=8, threshold=0.9" in m.describe()
    m2 = parse_layer_map({**DYN, "dynamic": {"block_size": 64, "stride": 16, "threshold": 1.0, "max_density": 0.25}}, "d")
    assert m2.params_for(0).max_density == 0.25 and m2.params_for(0).block_size == 64


@pytest.mark.parametrize("change, field, words", [
    ({"dynamic_layers": "10-20"}, "dynamic_layers", "16-20 are also in triangle_layers"),
    ({"dynamic": {"method": "minference"}}, "dynamic.method", "unknown method"),
    ({"dynamic": {"block_size": 100}}, "dynamic.block_size", "multiple of 16"),
    ({"dynamic": {"block_size": 64, "stride": 5}}, "dynamic.stride", "must divide block_size"),
    ({"dynamic": {"threshold": 0}}, "dynamic.threshold", "must be in (0.0, 1.0]"),
    ({"dynamic": {"threshold": "high"}}, "dynamic.threshold", "must be a number"),
    ({"dynamic": {"max_density": 1.5}}, "dynamic.max_density", "must be in (0.0, 1.0]"),
    ({"dynamic": {"tau": 0.9}}, "dynamic.tau", "unknown key"),
    ({"dynamic": [1, 2]}, "dynamic", "must be a mapping"),
    ({"dynamic_layers": "x"}, "dynamic_layers[0]", "not a layer id"),
])
def test_dynamic_refusals_name_the_field(change, field, words):
    with pytest.raises(TriangleMixConfigError) as e:
        parse_layer_map({**DYN, **change}, "d.yaml")
    assert e.value.field == field and words in str(e.value)


def test_dynamic_without_layers_is_refused():
    with pytest.raises(TriangleMixConfigError, match="given without 'dynamic_layers'"):
        parse_layer_map({**GOOD, "dynamic": {"threshold": 0.8}}, "d.yaml")


ONLY_DYN = {k: v for k, v in DYN.items() if k != "triangle_layers"}


@pytest.mark.parametrize("triangle", [None, [], ""], ids=["absent", "empty-list", "empty-string"])
def test_dynamic_only_maps_are_accepted(triangle, tmp_path):
    data = dict(ONLY_DYN) if triangle is None else {**ONLY_DYN, "triangle_layers": triangle}
    m = parse_layer_map(data, "only.yaml")
    assert m.layers == {} and m.param_sets == [] and sorted(m.dynamic_layers) == list(range(16))
    assert m.params_for(20) is None and m.params_for(3).block_size == 128
    assert m.min_n_last == 128
    assert m.describe().startswith("dynamic layers 0-15 (xattention")
    m.check_model(32)
    # what the front end ships to the engine parses to the same map
    shipped = resolve_layer_map({RESOLVED_KEY: to_additional_config(m)}, "any")
    assert shipped == m
    # and the prefix-cache tag counts the dynamic rows only
    from vllm_trianglemix.prefix_cache import BlockTagger

    tagger = BlockTagger(m)
    assert tagger.tag(16384, 0, 128) is None  # the first query block is never sparse
    assert tagger.tag(16384, 128, 256) == ("trianglemix", tagger.digest, (128,))


@pytest.mark.parametrize("data, field", [
    ({**ONLY_DYN, "dynamic_layers": []}, "dynamic_layers"),
    ({**ONLY_DYN, "dynamic_layers": ""}, "dynamic_layers"),
    ({k: v for k, v in GOOD.items() if k != "triangle_layers"}, "triangle_layers"),
    ({**GOOD, "triangle_layers": []}, "triangle_layers"),
    ({**ONLY_DYN, "triangle_layers": "x"}, "triangle_layers[0]"),
    ({**ONLY_DYN, "layer_overrides": {3: {"n_local": 64}}}, "layer_overrides.3"),
])
def test_a_map_must_name_some_layer(data, field):
    with pytest.raises(TriangleMixConfigError) as e:
        parse_layer_map(data, "none.yaml")
    assert e.value.field == field


def test_dynamic_layers_outside_the_model_are_refused():
    with pytest.raises(TriangleMixConfigError, match="field 'dynamic_layers': layer 40 is outside"):
        parse_layer_map({**GOOD, "dynamic_layers": [0, 40]}, "d").check_model(32)


def test_dynamic_variants_are_opt_in_and_selected_by_name():
    assert find_bundled_map("meta-llama/Llama-3.1-8B-Instruct").dynamic_layers == {}
    for name in ("llama-3.1-8b-instruct", "llama-3-8b-instruct-262k", "qwen2.5-7b-instruct"):
        base = resolve_layer_map({ADDITIONAL_CONFIG_KEY: name}, "any")
        dyn = resolve_layer_map({ADDITIONAL_CONFIG_KEY: f"{name}-dynamic"}, "any")
        assert dyn.layers == base.layers  # the existing triangle layers, unchanged
        assert sorted(dyn.dynamic_layers) == list(range(min(base.layers)))
    with pytest.raises(TriangleMixConfigError, match="no bundled map of that name"):
        resolve_layer_map({ADDITIONAL_CONFIG_KEY: "llama-9-dynamic"}, "any")
