"""Bad input stops the engine at start, in vLLM's own config step, with the reason.

Uses vLLM's real ``EngineArgs.create_engine_config`` (what ``vllm serve`` and
``LLM(...)`` run before any engine process starts); no engine is needed to
see a refusal. Models that TriangleMix cannot serve are only config.json files.
"""

import json

import pytest

from vllm_trianglemix.config import ADDITIONAL_CONFIG_KEY

pytestmark = pytest.mark.e2e


def engine_config(model, backend="TRIANGLEMIX", **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), attention_backend=backend, dtype="float32",
                      skip_tokenizer_init=True, **kw).create_engine_config()


def with_map(tmp_path, text):
    path = tmp_path / "map.yaml"
    path.write_text(text)
    return {ADDITIONAL_CONFIG_KEY: str(path)}, str(path)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("n_init: 4\nn_local: 0\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: '2-3'\n",
         "field 'n_local': must be >= 1, got 0"),
        ("n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: '2-7'\n",
         "field 'triangle_layers': layer 4 is outside the model (4 layers: 0-3)"),
        ("n_init: 4\nn_local: 64\nn_last: 16\ntriangle_layers: [3]\n",
         "field 'min_prompt_len': required key is missing"),
        ("n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: [3]\nwindow: 9\n",
         "field 'window': unknown key"),
        ("n_init: 4\nn_local: 64\n  n_last: 16\n", "malformed YAML"),
    ],
)
def test_bad_map_fails_at_start_naming_file_and_field(model_dir, tmp_path, text, expected):
    extra, path = with_map(tmp_path, text)
    with pytest.raises(Exception) as e:
        engine_config(model_dir, additional_config=extra)
    assert path in str(e.value) and expected in str(e.value)


def test_good_map_is_resolved_once_for_all_processes(model_dir, tmp_path):
    extra, path = with_map(tmp_path, "n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: [3]\n")
    config = engine_config(model_dir, additional_config=extra)
    assert config.attention_config.backend.name == "CUSTOM"  # carried to the engine as CUSTOM
    assert config.additional_config["trianglemix_resolved_map"]["source"] == path


def test_unknown_model_without_map_says_how_to_give_one(tmp_path, model_dir):
    import shutil

    other = tmp_path / "my-own-llama"
    shutil.copytree(model_dir, other)
    with pytest.raises(Exception) as e:
        engine_config(other)
    assert "no bundled layer map matches model" in str(e.value)
    assert ADDITIONAL_CONFIG_KEY in str(e.value)


def test_not_selected_means_untouched(tmp_path, model_dir):
    import shutil

    other = tmp_path / "my-own-llama"
    shutil.copytree(model_dir, other)
    config = engine_config(other, backend=None)
    assert config.attention_config.backend is None
    assert "trianglemix_resolved_map" not in (config.additional_config or {})


def _config_only(tmp_path, name, config):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_sliding_window_model_refused(tmp_path):
    d = _config_only(tmp_path, "tiny-mistral", {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 100, "max_position_embeddings": 4096,
        "sliding_window": 1024, "rms_norm_eps": 1e-5, "torch_dtype": "float32"})
    extra, _ = with_map(tmp_path, "n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: [1]\n")
    with pytest.raises(Exception, match="sliding-window models are not supported"):
        engine_config(d, additional_config=extra)


def test_mla_model_refused(tmp_path):
    d = _config_only(tmp_path, "tiny-deepseek", {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 64,
        "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 100,
        "max_position_embeddings": 4096, "kv_lora_rank": 32, "q_lora_rank": None,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "rms_norm_eps": 1e-6, "torch_dtype": "float32"})
    extra, _ = with_map(tmp_path, "n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: [1]\n")
    with pytest.raises(Exception, match="MLA attention"):
        engine_config(d, additional_config=extra)


def test_encoder_decoder_model_refused(tmp_path):
    from transformers import WhisperConfig

    d = tmp_path / "tiny-whisper"
    WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=200,
                  num_mel_bins=80, max_source_positions=1500, max_target_positions=448).save_pretrained(d)
    extra, _ = with_map(tmp_path, "n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: [1]\n")
    with pytest.raises(Exception, match="encoder-decoder models are not supported"):
        engine_config(d, additional_config=extra)


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(kv_cache_dtype="fp8_e5m2"), "KV cache dtype fp8_e5m2 is not supported"),
        (dict(additional_config={"trianglemix_stock_backend": "XFORMERS"}),
         "trianglemix_stock_backend: must be one of auto, FLASH_ATTN, FLASHINFER, got 'XFORMERS'"),
        (dict(additional_config={"trianglemix_stock_backend": "FLASHINFER"}),
         "trianglemix_stock_backend applies to CUDA only"),
    ],
)
def test_kv_cache_dtype_and_stock_backend_refusals(model_dir, kw, expected):
    with pytest.raises(Exception, match=expected):
        engine_config(model_dir, **kw)


def test_dynamic_layers_with_an_fp8_cache_are_accepted(model_dir):
    """Dynamic layers read an fp8 cache (ops tested in tests/unit/test_xattention_ops.py and
    tests/gpu/test_xattention_gpu.py); the map is no longer refused for it."""
    config = engine_config(model_dir, kv_cache_dtype="fp8",
                           additional_config={"trianglemix_config": "tiny-llama-demo-dynamic"})
    assert config.cache_config.cache_dtype == "fp8"
