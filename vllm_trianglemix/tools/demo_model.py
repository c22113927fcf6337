"""Tiny random models, built locally: the demo model and the test models.

Nothing is downloaded. Each model has an architecture vLLM serves, random
weights from a fixed seed and a word-level tokenizer over the words
``w0 .. w{n-1}``, with a chat template so the OpenAI chat endpoint works.
Attention is initialised more peaked than usual: then a wrong mask changes
the output far more than rounding does, which the tests rely on.

* :func:`build_tiny_llama`: ``LlamaForCausalLM`` (the demo model);
* :func:`build_tiny_qwen3_next`: ``Qwen3NextForCausalLM``, a hybrid of Gated
  DeltaNet (linear attention) and full-attention layers with MoE, gated
  attention output, partial RoPE and QK-norm.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class TinyLlamaSpec:
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 512
    vocab_words: int = 1000
    max_position_embeddings: int = 16384
    rope_theta: float = 10000.0
    qk_init_std: float = 0.1
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return self.vocab_words + 3  # <unk>, <s>, </s>


def build_tiny_llama(out_dir: str, spec: TinyLlamaSpec | None = None) -> str:
    """Write config, safetensors weights and tokenizer to ``out_dir``.

    Idempotent: a directory already holding a model built from the same spec
    is left as it is. Returns ``out_dir``.
    """
    spec = spec or TinyLlamaSpec()
    stamp = os.path.join(out_dir, "tiny_llama_spec.json")
    if _built_from(stamp, spec):
        return out_dir

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0.0, spec.qk_init_std)
            layer.self_attn.k_proj.weight.normal_(0.0, spec.qk_init_std)
    model.save_pretrained(out_dir, safe_serialization=True)
    _write_tokenizer(out_dir, spec)
    _stamp(stamp, spec)
    return out_dir


def _built_from(stamp: str, spec) -> bool:
    """True when ``stamp`` records a model built from exactly ``spec``."""
    if not os.path.exists(stamp):
        return False
    with open(stamp) as f:
        return json.load(f) == asdict(spec)


def _stamp(stamp: str, spec) -> None:
    with open(stamp, "w") as f:
        json.dump(asdict(spec), f)


@dataclass(frozen=True)
class TinyQwen3NextSpec:
    """A Qwen3-Next in miniature: every ``full_attention_interval``-th layer is
    full attention (as in Qwen3-Next and Qwen3.5: 3 linear, then 1 full), the
    others Gated DeltaNet. vLLM's CPU Gated DeltaNet needs bfloat16 and a
    linear head dim it supports (128). The shapes keep vLLM's hybrid block
    size small: vLLM makes an attention block hold at least one linear
    layer's state (here 64 tokens on CPU)."""

    num_layers: int = 8
    full_attention_interval: int = 4
    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    partial_rotary_factor: float = 0.25
    linear_num_key_heads: int = 1
    linear_num_value_heads: int = 2
    linear_head_dim: int = 128
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    shared_expert_intermediate_size: int = 128
    vocab_words: int = 1000
    max_position_embeddings: int = 16384
    rope_theta: float = 10000.0
    qk_norm_gain: float = 1.0
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return self.vocab_words + 3  # <unk>, <s>, </s>


def build_tiny_qwen3_next(out_dir: str, spec: TinyQwen3NextSpec | None = None) -> str:
    """Write a tiny random ``Qwen3NextForCausalLM`` (bfloat16 weights) to ``out_dir``.

    The QK-norm weights are set to ``qk_norm_gain`` (the norm scales by
    ``1 + weight``), which makes attention peaked. Idempotent, like
    :func:`build_tiny_llama`.
    """
    spec = spec or TinyQwen3NextSpec()
    stamp = os.path.join(out_dir, "tiny_qwen3_next_spec.json")
    if _built_from(stamp, spec):
        return out_dir

    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    config = Qwen3NextConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.moe_intermediate_size,
        num_hidden_layers=spec.num_layers,
        full_attention_interval=spec.full_attention_interval,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        linear_num_key_heads=spec.linear_num_key_heads,
        linear_num_value_heads=spec.linear_num_value_heads,
        linear_key_head_dim=spec.linear_head_dim,
        linear_value_head_dim=spec.linear_head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        moe_intermediate_size=spec.moe_intermediate_size,
        shared_expert_intermediate_size=spec.shared_expert_intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                         "partial_rotary_factor": spec.partial_rotary_factor},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(spec.seed)
    model = Qwen3NextForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        for layer in model.model.layers:
            attn = getattr(layer, "self_attn", None)
            if attn is not None:
                attn.q_norm.weight.fill_(spec.qk_norm_gain)
                attn.k_norm.weight.fill_(spec.qk_norm_gain)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    _write_tokenizer(out_dir, spec)
    _stamp(stamp, spec)
    return out_dir


def _write_tokenizer(out_dir: str, spec) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(spec.vocab_words):
        vocab[f"w{i}"] = i + 3
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<unk>",
                "add_bos_token": True,
                "model_max_length": spec.max_position_embeddings,
                "chat_template": CHAT_TEMPLATE,
            },
            f,
            indent=1,
        )
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)


def words(token_ids) -> str:
    """The prompt text whose tokens (after <s>) are ``token_ids`` (ids >= 3)."""
    return " ".join(f"w{t - 3}" for t in token_ids)
