"""What TriangleMix may serve: one rule for the engine and every tool.

The engine's check at start (``selection.check_engine_config``, from vLLM's
config step), ``check-map``, ``serve`` and ``bench ttft`` (before any engine
starts) all judge a model and its layer map here:

* :func:`model_refusals`: the models TriangleMix cannot serve, with the reason;
* :func:`check_layer_map`: the layers a map may name (every layer; on a
  hybrid, its full-attention layers, triangle and dynamic alike).

Both read :class:`ModelFacts`, built from vLLM's ``ModelConfig`` in the engine
(:meth:`ModelFacts.from_model_config`) or from ``config.json`` alone in the
tools (:meth:`ModelFacts.from_hf_config`, no vLLM import). What depends on the
engine's settings rather than on the model and the map (dtype and head size on
GPU, the GPU limits of dynamic layers, ``--kv-cache-dtype``, speculative
decoding, context parallelism) is judged at start only: :data:`CHECKED_AT_START`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_trianglemix.model_info import HYBRID_MODEL_TYPES, has_sliding_layers, hf_attention_layer_ids

CHECKED_AT_START = (
    "dtype and head size on GPU, the GPU limits of dynamic layers (block_size, stride), "
    "--kv-cache-dtype, speculative decoding, context parallelism"
)
"""What the tools leave to the engine's check at start (it needs the engine's settings)."""

ATTENTION_FREE_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba")
"""config.json ``model_type`` of attention-free models (vLLM knows them by class)."""

HYBRID_CONFIG_KEYS = ("attn_layer_period", "hybrid_override_pattern", "layers_block_type",
                      "mamba_d_ssm", "full_attention_interval", "linear_attn_config")
"""config.json keys that only hybrids (attention plus other layers) have, for configs
without ``layer_types`` (vLLM knows hybrids by class)."""


@dataclass(frozen=True)
class ModelFacts:
    """What decides whether TriangleMix serves a model, and which layers a map may name."""

    model_type: str
    num_layers: int
    attention_layers: tuple[int, ...]
    """The layers that run softmax attention (every layer, or a hybrid's full-attention ones)."""
    hybrid: bool = False
    encoder_decoder: bool = False
    mla: bool = False
    attention_free: bool = False
    sliding_window: bool = False
    reference_sliding_window: bool = False
    runner: str = "generate"

    @classmethod
    def from_model_config(cls, mc) -> ModelFacts:
        """From vLLM's ``ModelConfig`` (the engine)."""
        text = mc.hf_text_config
        hybrid = bool(getattr(mc, "is_hybrid", False))
        return cls._build(
            text, hybrid,
            encoder_decoder=bool(getattr(mc, "is_encoder_decoder", False)),
            mla=bool(getattr(mc, "use_mla", False)),
            attention_free=bool(getattr(mc, "is_attention_free", False)),
            sliding_window=mc.get_sliding_window() is not None or has_sliding_layers(text),
            reference_sliding_window=getattr(mc, "rswa_window", None) is not None,
            runner=mc.runner_type,
        )

    @classmethod
    def from_hf_config(cls, cfg) -> ModelFacts:
        """From a model's config.json (its text part; ``model_info.load_text_config``),
        as far as it tells: vLLM's config step at start is the final word."""
        model_type = str(getattr(cfg, "model_type", "") or "")
        sliding = bool(getattr(cfg, "sliding_window", None)
                       and getattr(cfg, "use_sliding_window", True))
        return cls._build(
            cfg, _declares_hybrid(cfg),
            encoder_decoder=bool(getattr(cfg, "is_encoder_decoder", False)),
            mla=bool(getattr(cfg, "kv_lora_rank", None)),
            attention_free=model_type in ATTENTION_FREE_MODEL_TYPES,
            sliding_window=sliding or has_sliding_layers(cfg),
        )

    @classmethod
    def _build(cls, text_config, hybrid: bool, **facts) -> ModelFacts:
        n = int(text_config.num_hidden_layers)
        layers = hf_attention_layer_ids(text_config) if hybrid else list(range(n))
        return cls(model_type=str(getattr(text_config, "model_type", "") or "?"), num_layers=n,
                   attention_layers=tuple(layers), hybrid=hybrid, **facts)


def _declares_hybrid(cfg) -> bool:
    if getattr(cfg, "model_type", None) in HYBRID_MODEL_TYPES:
        return True
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:  # vLLM: a hybrid class whose layers are all attention is not hybrid
        return any(str(t) not in ("attention", "full_attention") and "sliding" not in str(t)
                   for t in layer_types)
    return any(getattr(cfg, key, None) is not None for key in HYBRID_CONFIG_KEYS)


def model_refusals(facts: ModelFacts) -> list[str]:
    """Why TriangleMix cannot serve this model (empty: it can)."""
    reasons = []
    if facts.encoder_decoder:
        reasons.append("encoder-decoder models are not supported")
    if facts.mla:
        reasons.append("MLA attention (DeepSeek-style) is not supported")
    if facts.attention_free:
        reasons.append("attention-free models are not supported")
    elif facts.hybrid:
        if facts.model_type not in HYBRID_MODEL_TYPES:
            reasons.append(
                f"hybrid model type '{facts.model_type}' is not supported "
                f"(supported hybrids: {', '.join(HYBRID_MODEL_TYPES)})"
            )
        elif not facts.attention_layers:
            reasons.append("this hybrid model has no full-attention layer")
    if facts.runner != "generate":
        reasons.append(f"runner '{facts.runner}' is not supported (generation only)")
    if facts.sliding_window:
        reasons.append("sliding-window models are not supported")
    if facts.reference_sliding_window:
        reasons.append("reference sliding-window attention models are not supported")
    if facts.model_type == "gpt_oss":
        reasons.append("attention-sink models are not supported")
    return reasons


def check_layer_map(layer_map, facts: ModelFacts) -> None:
    """Refuse a map the model cannot run (``TriangleMixConfigError``, the field named):
    layer ids outside the model or, on a hybrid, not among its full-attention layers.
    Triangle and dynamic layers follow the same rule on every model."""
    layer_map.check_model(facts.num_layers, list(facts.attention_layers))
