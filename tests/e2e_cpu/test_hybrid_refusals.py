"""Hybrid models: what is refused at start, in vLLM's own config step.

* A map may name only full-attention layers: any other layer fails at start,
  naming the field and listing the model's full-attention layers.
* Hybrids other than Qwen3-Next / Qwen3.5 are refused with the reason.
* A supported hybrid with a map of full-attention layers (triangle or dynamic)
  is accepted, with prefix caching on (vLLM's default; see test_hybrid_exact.py for why it is exact).
"""

import pytest

from tests.e2e_cpu.test_refusals import _config_only, with_map

pytestmark = pytest.mark.e2e

def engine_config(model, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), attention_backend="TRIANGLEMIX", dtype="bfloat16",
                      skip_tokenizer_init=True, **kw).create_engine_config()


MAP = "n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: {}\n"


def hybrid_config(model_dir, tmp_path, layers, **kw):
    extra, path = with_map(tmp_path, MAP.format(layers))
    return engine_config(model_dir, additional_config=extra, **kw), path


@pytest.mark.parametrize("layers,named", [("[2, 3]", "[2]"), ("'4-7'", "[4, 5, 6]")])
def test_map_naming_a_linear_attention_layer_fails_at_start(hybrid_model_dir, tmp_path,
                                                            layers, named):
    with pytest.raises(Exception) as e:
        hybrid_config(hybrid_model_dir, tmp_path, layers)
    text = str(e.value)
    assert "field 'triangle_layers'" in text
    assert f"layers {named} are not full-attention layers" in text
    assert "(this model's: 3, 7)" in text


def test_override_of_a_linear_attention_layer_fails_at_start(hybrid_model_dir, tmp_path):
    extra, path = with_map(tmp_path, MAP.format("[3]") + "layer_overrides:\n  2: {n_local: 32}\n")
    with pytest.raises(Exception, match="layer_overrides.2.*not in triangle_layers"):
        engine_config(hybrid_model_dir, additional_config=extra)


def test_full_attention_map_is_accepted_with_prefix_caching(hybrid_model_dir, tmp_path):
    config, path = hybrid_config(hybrid_model_dir, tmp_path, "[3, 7]")
    assert config.additional_config["trianglemix_resolved_map"]["source"] == path
    assert config.cache_config.enable_prefix_caching
    assert config.cache_config.mamba_cache_mode == "align"


def test_other_hybrid_models_are_refused(tmp_path):
    d = _config_only(tmp_path, "tiny-jamba", {
        "architectures": ["JambaForCausalLM"], "model_type": "jamba", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 100, "max_position_embeddings": 4096,
        "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
        "expert_layer_offset": 1, "num_experts": 2, "num_experts_per_tok": 1,
        "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 8,
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"})
    extra, _ = with_map(tmp_path, MAP.format("[1]"))
    with pytest.raises(Exception, match="hybrid model type 'jamba' is not supported"):
        engine_config(d, additional_config=extra)


def test_dynamic_layers_on_full_attention_layers_are_accepted(hybrid_model_dir, tmp_path):
    extra, path = with_map(tmp_path, MAP.format("[7]") + "dynamic_layers: [3]\n")
    config = engine_config(hybrid_model_dir, additional_config=extra)
    assert config.additional_config["trianglemix_resolved_map"]["map"]["dynamic_layers"] == [3]
    assert config.cache_config.mamba_cache_mode == "align"


def test_dynamic_layers_must_be_full_attention_layers(hybrid_model_dir, tmp_path):
    extra, path = with_map(tmp_path, MAP.format("[7]") + "dynamic_layers: [2]\n")
    with pytest.raises(Exception, match="field 'dynamic_layers': layers \\[2\\] are not full-attention"):
        engine_config(hybrid_model_dir, additional_config=extra)
