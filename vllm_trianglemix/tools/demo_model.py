"""A tiny random Llama, built locally: the demo model and the test model.

Nothing is downloaded. The model has the Llama architecture vLLM serves
(``LlamaForCausalLM``), random weights from a fixed seed and a word-level
tokenizer over the words ``w0 .. w{n-1}``, with a chat template so the
OpenAI chat endpoint works. Attention projections are initialised larger than
usual so that attention is peaked: then a wrong mask changes the output far
more than rounding does, which the tests rely on.
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
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == asdict(spec):
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
    with open(stamp, "w") as f:
        json.dump(asdict(spec), f)
    return out_dir


def _write_tokenizer(out_dir: str, spec: TinyLlamaSpec) -> None:
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
