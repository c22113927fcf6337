"""Every bundled map: `check-map` and the engine's check at start give the same answer.

Each map in configs/ (and its ``-dynamic`` variant) goes with its model's shape:
benchmarks/models/*/config.json, the tiny Llama the CPU tests build, and, for the
hybrids without a folder there, the published configuration class written by
transformers (``Qwen3_5Config``, ``Qwen3_5MoeConfig``, ``Qwen3NextConfig``) plus the
same text shape on vLLM's Qwen3-Next class (as benchmarks/models/qwen3.5-4b-text).
`check-map` (config.json only) must accept it, and so must vLLM's real config step
(``EngineArgs.create_engine_config``, which runs ``selection.check_engine_config``
on this platform) and that check with the GPU's rules (``on_cuda=True``: bf16, head
size, the dynamic layers' GPU limits). vLLM's Qwen3.5 classes import torchvision;
where they cannot be imported, their published shapes go through `check-map` only
(the engine is skipped, said so) and the engine takes the Qwen3-Next-class shape.

Refusals agree too: the same one-line error from `check-map` as the engine raises.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest

from vllm_trianglemix import selection
from vllm_trianglemix.config import ADDITIONAL_CONFIG_KEY, RESOLVED_KEY, bundled_map_names
from vllm_trianglemix.tools.check_map import check_map
from vllm_trianglemix.tools.cli import main

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = os.path.join(ROOT, "benchmarks", "models")

# Each bundled map (without "-dynamic") -> the shapes it is for (see _shape).
SHAPES = {
    "llama-3-8b-instruct-262k": ["bench:llama-3-8b-instruct-262k"],
    "llama-3.1-8b-instruct": ["bench:llama-3.1-8b-instruct"],
    "qwen2.5-7b-instruct": ["bench:qwen2.5-7b-instruct"],
    "tiny-llama-demo": ["tiny-llama"],
    "qwen3-next-80b-a3b": ["qwen3_next:48"],
    "qwen3.5-2b": ["qwen3_5:24", "next-class:24"],
    "qwen3.5-4b-9b": ["bench:qwen3.5-4b", "bench:qwen3.5-4b-text"],
    "qwen3.5-27b": ["qwen3_5:64", "next-class:64"],
    "qwen3.5-35b-a3b": ["qwen3_5_moe:40", "next-class:40"],
    "smollm2-135m-instruct": ["smollm2"],
}
CASES = [(f"{base}{suffix}", shape) for base, shapes in SHAPES.items()
         for suffix in ("", "-dynamic") for shape in shapes]


def test_every_bundled_map_has_its_shapes():
    assert {name for name, _ in CASES} == set(bundled_map_names())


def _pattern(n: int) -> list[str]:
    """The published hybrid pattern: full attention every 4th layer."""
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, model_dir):
    """shape id -> (model folder, whether vLLM can build a config for its class here)."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig, Qwen3NextConfig

    try:
        import vllm.model_executor.models.qwen3_5  # noqa: F401
        qwen3_5_builds = True
    except ImportError:
        qwen3_5_builds = False
    out = {"tiny-llama": (model_dir, True)}
    root = tmp_path_factory.mktemp("shapes")
    for base, ids in SHAPES.items():
        for shape in ids:
            kind, _, arg = shape.partition(":")
            if kind == "bench":
                out[shape] = (os.path.join(MODELS, arg), arg != "qwen3.5-4b" or qwen3_5_builds)
                continue
            if kind == "smollm2":  # SmolLM2-135M-Instruct's shape (a Llama; its config, no weights)
                from transformers import LlamaConfig

                folder = root / base
                config = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                     hidden_size=576, intermediate_size=1536, vocab_size=49152,
                                     max_position_embeddings=8192, tie_word_embeddings=True)
                config.architectures = ["LlamaForCausalLM"]
                config.save_pretrained(folder)
                out[shape] = (str(folder), True)
                continue
            if kind not in ("qwen3_next", "qwen3_5", "qwen3_5_moe", "next-class"):
                continue
            folder = root / f"{base}-{kind}"
            n = int(arg)
            if kind == "next-class":  # benchmarks/models/qwen3.5-4b-text with n layers
                with open(os.path.join(MODELS, "qwen3.5-4b-text", "config.json")) as f:
                    data = json.load(f)
                data.update(num_hidden_layers=n, layer_types=_pattern(n), mlp_only_layers=list(range(n)))
                folder.mkdir()
                (folder / "config.json").write_text(json.dumps(data))
                out[shape] = (str(folder), True)
                continue
            if kind == "qwen3_next":
                config, arch, builds = Qwen3NextConfig(num_hidden_layers=n), "Qwen3NextForCausalLM", True
            elif kind == "qwen3_5":
                config = Qwen3_5Config(text_config={"num_hidden_layers": n})
                arch, builds = "Qwen3_5ForConditionalGeneration", qwen3_5_builds
            else:
                config = Qwen3_5MoeConfig(text_config={"num_hidden_layers": n})
                arch, builds = "Qwen3_5MoeForConditionalGeneration", qwen3_5_builds
            config.architectures = [arch]
            config.save_pretrained(folder)
            out[shape] = (str(folder), builds)
    return out


def engine_config(model, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), attention_backend="TRIANGLEMIX", dtype="bfloat16",
                      skip_tokenizer_init=True, load_format="dummy", language_model_only=True,
                      **kw).create_engine_config()


def check_on_gpu_rules(config, map_ref):
    """The engine's check, as on CUDA, on a config vLLM built (a fresh map reference)."""
    config = copy.copy(config)
    config.additional_config = {ADDITIONAL_CONFIG_KEY: map_ref}
    return selection.check_engine_config(config, on_cuda=True)


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}@{s}" for n, s in CASES])
def test_check_map_and_the_engine_accept_the_bundled_map(shapes, capsys, name, shape):
    folder, engine_builds = shapes[shape]
    assert main(["check-map", name, "--model", folder]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.rstrip().endswith("OK") and f"{name}.yaml" in out
    if not engine_builds:
        pytest.skip("check-map accepts it; vLLM cannot build this class here (no torchvision): "
                    "the engine takes the same text shape on the Qwen3-Next class")
    config = engine_config(folder, additional_config={ADDITIONAL_CONFIG_KEY: name})
    assert config.additional_config[RESOLVED_KEY]["source"].endswith(f"/{name}.yaml")
    layer_map = check_on_gpu_rules(config, name)
    assert layer_map == check_map(name, folder).layer_map  # the same map, as check-map showed it
    assert bool(layer_map.dynamic_layers) == name.endswith("-dynamic")


# --- refusals: the same line from check-map as the engine raises -----------------------------

MAP = "n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\n"


@pytest.mark.parametrize("model,text,words", [
    ("hybrid", MAP + "triangle_layers: [7]\ndynamic_layers: [2, 3]\n",
     "field 'dynamic_layers': layers [2] are not full-attention layers"),
    ("hybrid", MAP + "triangle_layers: [6, 7]\n",
     "field 'triangle_layers': layers [6] are not full-attention layers"),
    ("llama", MAP + "triangle_layers: [3]\ndynamic_layers: '4-5'\n",
     "field 'dynamic_layers': layer 4 is outside the model"),
])
def test_a_bad_map_is_the_same_error_in_check_map_and_the_engine(
        tmp_path, capsys, model_dir, hybrid_model_dir, model, text, words):
    folder = hybrid_model_dir if model == "hybrid" else model_dir
    path = tmp_path / "map.yaml"
    path.write_text(text)
    assert main(["check-map", str(path), "--model", folder]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vllm-trianglemix check-map: error: "), err
    with pytest.raises(Exception) as e:
        engine_config(folder, additional_config={ADDITIONAL_CONFIG_KEY: str(path)})
    engine_error = str(e.value)
    line = err.rstrip("\n").removeprefix("vllm-trianglemix check-map: error: ")
    assert words in line and line in engine_error


def _config_only(tmp_path, name, config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("config,reason", [
    ({"architectures": ["JambaForCausalLM"], "model_type": "jamba", "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2,
      "num_key_value_heads": 1, "vocab_size": 100, "max_position_embeddings": 4096,
      "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
      "expert_layer_offset": 1, "num_experts": 2, "num_experts_per_tok": 1, "mamba_d_state": 8,
      "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 8, "rms_norm_eps": 1e-6,
      "torch_dtype": "bfloat16"},
     "hybrid model type 'jamba' is not supported (supported hybrids: qwen3_next, qwen3_5_text, "
     "qwen3_5_moe_text)"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
      "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 100,
      "max_position_embeddings": 4096, "sliding_window": 1024, "rms_norm_eps": 1e-5,
      "torch_dtype": "bfloat16"},
     "sliding-window models are not supported"),
])
def test_a_refused_model_is_refused_by_both_for_the_same_reason(tmp_path, capsys, config, reason):
    folder = _config_only(tmp_path, config["model_type"], config)
    path = tmp_path / "map.yaml"
    path.write_text(MAP + "triangle_layers: [1]\n")
    assert main(["check-map", str(path), "--model", folder]) == 2
    err = capsys.readouterr().err
    assert err == f"vllm-trianglemix check-map: error: TriangleMix attention cannot serve {folder}: {reason}\n"
    with pytest.raises(Exception, match=re.escape("cannot serve this engine: " + reason)):
        engine_config(folder, additional_config={ADDITIONAL_CONFIG_KEY: str(path)})
