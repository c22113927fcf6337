"""What TriangleMix reads from a model's Hugging Face config, without vLLM.

A supported hybrid's full-attention layers are read here, from the text
config alone, for the rule of what may be served (``rules.py``: the engine's
check at start, ``check-map``, ``serve``, ``bench``) and for ``calibrate``.
Nothing heavy is imported.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

HYBRID_MODEL_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
"""Hybrids TriangleMix serves (the text config's ``model_type``): Gated DeltaNet
layers plus standard causal softmax-attention layers (Qwen3-Next, Qwen3.5 dense
and MoE, text and multimodal classes)."""


def hf_attention_layer_ids(hf_text_config) -> list[int]:
    """The layers that run softmax attention, from a Hugging Face text config.

    A supported hybrid's full-attention layers are those its ``layer_types``
    names ``full_attention`` (else every ``full_attention_interval``-th layer);
    any other model's are all its layers.
    """
    n = int(hf_text_config.num_hidden_layers)
    if getattr(hf_text_config, "model_type", None) not in HYBRID_MODEL_TYPES:
        return list(range(n))
    types = getattr(hf_text_config, "layer_types", None)
    if types:
        return [i for i, t in enumerate(types[:n]) if t == "full_attention"]
    interval = getattr(hf_text_config, "full_attention_interval", None)
    if interval:
        return [i for i in range(n) if (i + 1) % int(interval) == 0]
    return []


def has_sliding_layers(hf_config) -> bool:
    layer_types = getattr(hf_config, "layer_types", None) or []
    return any("sliding" in str(t) for t in layer_types)


class ModelConfigError(ValueError):
    """A model folder or config.json that cannot be read."""


def config_json_path(model: str) -> str:
    """``model`` (a model folder or its config.json) -> the config.json path."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ModelConfigError(f"model folder {model} has no config.json")
        return path
    if os.path.isfile(path):
        return path
    raise ModelConfigError(f"no such model folder or config.json: {model}")


def load_text_config(model: str) -> SimpleNamespace:
    """The text part of a model's config.json (``text_config`` of a multimodal model)."""
    path = config_json_path(model)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} is not a JSON object")
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    if not isinstance(text.get("num_hidden_layers"), int):
        raise ModelConfigError(f"{path} has no num_hidden_layers: not a decoder model TriangleMix serves")
    cfg = SimpleNamespace(**text)
    cfg.architectures = data.get("architectures") or text.get("architectures") or []
    return cfg
