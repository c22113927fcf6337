"""The bundled hybrid maps: uncalibrated starting points, valid for their models.

Each names only full-attention layers (the deeper half of them) of the layer
count it declares, with the paper's parameters, and says it is uncalibrated.
The Qwen3.5-4B shape (benchmarks/models/qwen3.5-4b/config.json, the published
config; Qwen3_5ForConditionalGeneration) goes through vLLM's real config step
with TriangleMix and no map given: the bundled map is found and accepted
(skipped where vLLM cannot import its Qwen3.5 module: it needs torchvision,
which this CPU image lacks). The same text shapes on the Qwen3-Next class
(benchmarks/models/qwen3.5-4b-text) take the same map.
"""

import os

import pytest

from vllm_trianglemix.config import bundled_map_paths, find_bundled_map, load_layer_map
from vllm_trianglemix.selection import hf_attention_layer_ids

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HYBRID_MAPS = {
    "qwen3-next-80b-a3b.yaml": "qwen3_next",
    "qwen3.5-2b.yaml": "qwen3_5_text",
    "qwen3.5-4b-9b.yaml": "qwen3_5_text",
    "qwen3.5-27b.yaml": "qwen3_5_text",
    "qwen3.5-35b-a3b.yaml": "qwen3_5_moe_text",
}


def _text_config(model_type, num_layers):
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig, Qwen3NextConfig

    cls = {"qwen3_next": Qwen3NextConfig, "qwen3_5_text": Qwen3_5TextConfig,
           "qwen3_5_moe_text": Qwen3_5MoeTextConfig}[model_type]
    return cls(num_hidden_layers=num_layers)  # the published pattern: full attention every 4th layer


@pytest.mark.parametrize("name", sorted(HYBRID_MAPS))
def test_bundled_hybrid_map_is_a_marked_starting_point(name):
    path = os.path.join(ROOT, "configs", name)
    assert path in bundled_map_paths()
    layer_map = load_layer_map(path)
    assert "UNCALIBRATED" in layer_map.notes and "calibrate" in layer_map.notes
    full = hf_attention_layer_ids(_text_config(HYBRID_MAPS[name], layer_map.num_hidden_layers))
    layer_map.check_model(layer_map.num_hidden_layers, full)
    assert sorted(layer_map.layers) == full[len(full) - len(full) // 2:]
    assert {(p.n_init, p.n_local, p.n_last) for p in layer_map.layers.values()} == {(8, 512, 128)}


@pytest.mark.parametrize("name", sorted(HYBRID_MAPS))
def test_bundled_hybrid_dynamic_map_covers_the_other_full_attention_layers(name):
    """``<map>-dynamic``: opt-in (no ``match``), the same triangle layers, XAttention on
    every other full-attention layer."""
    from vllm_trianglemix.config import resolve_layer_map

    base = load_layer_map(os.path.join(ROOT, "configs", name))
    dyn = resolve_layer_map({"trianglemix_config": name[: -len(".yaml")] + "-dynamic"}, "any")
    assert dyn.match == () and "UNCALIBRATED" in dyn.notes
    full = hf_attention_layer_ids(_text_config(HYBRID_MAPS[name], base.num_hidden_layers))
    dyn.check_model(base.num_hidden_layers, full)
    assert dyn.layers == base.layers
    assert sorted(dyn.dynamic_layers) == [i for i in full if i not in base.layers]
    p = dyn.dynamic_param_sets[0]
    assert (p.block_size, p.stride, p.threshold, p.max_density) == (128, 8, 0.9, None)


def _config_step(folder, **kw):
    from vllm.engine.arg_utils import EngineArgs

    model = os.path.join(ROOT, "benchmarks", "models", folder)
    return EngineArgs(model=model, attention_backend="TRIANGLEMIX", dtype="bfloat16",
                      skip_tokenizer_init=True, load_format="dummy", **kw).create_engine_config()


def test_published_qwen3_5_shape_finds_its_map_in_vllms_config_step():
    try:
        import vllm.model_executor.models.qwen3_5  # noqa: F401
    except ImportError as e:
        pytest.skip(f"vLLM's Qwen3.5 module does not import here: {e}")
    config = _config_step("qwen3.5-4b", language_model_only=True)
    assert config.model_config.is_hybrid
    resolved = config.additional_config["trianglemix_resolved_map"]
    assert resolved["source"].endswith("qwen3.5-4b-9b.yaml")
    assert find_bundled_map("Qwen/Qwen3.5-9B").source == resolved["source"]


def test_qwen3_5_text_shape_on_the_qwen3_next_class_takes_the_same_map():
    path = os.path.join(ROOT, "configs", "qwen3.5-4b-9b.yaml")
    config = _config_step("qwen3.5-4b-text", additional_config={"trianglemix_config": path})
    assert config.model_config.is_hybrid
    assert config.additional_config["trianglemix_resolved_map"]["source"] == path
