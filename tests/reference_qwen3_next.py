"""An independent Qwen3-Next forward with the exact TriangleMix mask on its full-attention layers.

Hugging Face's ``Qwen3NextForCausalLM`` (transformers' own modelling code: Gated
DeltaNet layers, gated attention output, partial RoPE, QK-norm, MoE) in
float32 (on the CPU, or on the GPU for the GPU tests, TF32 off), with one change: its attention function is replaced by
one that applies, in each full-attention layer, the mask from
``vllm_trianglemix.pattern.visible`` with that layer's parameters (the same
definition the plugin uses), so the tests compare vLLM with the rule itself.
Dynamic (XAttention) layers select their blocks with tests/xattention_reference.py
(float64, its own estimate); ``self.margin`` is then the smallest distance of a
selection decision from flipping.
"""

from __future__ import annotations

import contextlib

import torch

from vllm_trianglemix.config import LayerMap
from tests.reference_cache import memoized
from tests.xattention_reference import dynamic_attention
from vllm_trianglemix.pattern import DynamicParams, dense_start, visible

ATTN_IMPLEMENTATION = "trianglemix_reference"


class ReferenceQwen3Next:
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        """``device``: where the forward runs (the GPU tests pass "cuda": the same float32
        arithmetic with TF32 off, and the CPU left to the engines their lanes compile for)."""
        from transformers import AttentionInterface, Qwen3NextForCausalLM

        AttentionInterface.register(ATTN_IMPLEMENTATION, self._attention)
        self.device = torch.device(device)
        self.model = Qwen3NextForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
        ).eval().to(self.device)
        self.dtype = dtype
        self._layer_map: LayerMap | None = None
        self._prompt_len = 0
        self._chunk_starts = ()
        self.margin = float("inf")
        self.full_attention_layers = [
            i for i, t in enumerate(self.model.config.layer_types) if t == "full_attention"
        ]

    def _attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        # query [1, heads, n, d], key/value [1, kv_heads, n, d]
        n = query.shape[2]
        pos = torch.arange(n, device=query.device)
        params = self._layer_map.params_for(module.layer_idx) if self._layer_map else None
        if isinstance(params, DynamicParams):
            ds = int(dense_start(self._prompt_len, params.n_last, self._layer_map.min_prompt_len))
            out, margin = dynamic_attention(
                query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), 0, ds,
                params.block_size, params.stride, params.threshold, params.max_density, scaling,
                self._chunk_starts,
            )
            self.margin = min(self.margin, margin)
            return out.to(query.dtype)[None], None
        if params is None:
            mask = visible(pos[:, None], pos[None, :], 0, 0, 1)
        else:
            ds = int(dense_start(self._prompt_len, params.n_last, self._layer_map.min_prompt_len))
            mask = visible(pos[:, None], pos[None, :], ds, params.n_init, params.n_local)
        group = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(group, dim=1)
        v = value.repeat_interleave(group, dim=1)
        s = (query @ k.transpose(2, 3)) * scaling
        s = s.masked_fill(~mask, float("-inf"))
        out = torch.softmax(s, dim=-1) @ v
        return out.transpose(1, 2).contiguous(), None

    @memoized
    @torch.no_grad()
    def logprobs(self, token_ids: list[int], layer_map: LayerMap | None, prompt_len: int | None = None,
                 chunk_starts=()):
        """log-softmax of the logits at every position, [T, vocab] (float64).

        ``prompt_len`` (default: all tokens) is the L of the rule; positions at
        or past it (generated tokens) are dense rows, as in the plugin.
        ``layer_map=None`` runs every layer dense. ``chunk_starts``: where the
        engine's steps begin (dynamic layers; only matters when one cuts a query block).
        """
        self.margin = float("inf")
        self._chunk_starts = tuple(chunk_starts)
        self._layer_map = layer_map
        self._prompt_len = len(token_ids) if prompt_len is None else prompt_len
        try:
            # No padding; the attention function above ignores the mask
            # transformers builds and makes the mask of each layer itself.
            with _full_float32(self.device):
                out = self.model(input_ids=torch.tensor([token_ids], device=self.device), use_cache=False)
        finally:
            self._layer_map = None
        return torch.log_softmax(out.logits[0].to(torch.float64), dim=-1).cpu()

    def prompt_logprobs(self, token_ids, layer_map, prompt_len=None, chunk_starts=()) -> torch.Tensor:
        """Logprob of each token given the ones before it (positions 1..T-1)."""
        lp = self.logprobs(token_ids, layer_map, prompt_len, chunk_starts)
        ids = torch.tensor(token_ids[1:])
        return lp[:-1].gather(1, ids[:, None])[:, 0]


@contextlib.contextmanager
def _full_float32(device: torch.device):
    """float32 matrix products and convolutions as float32 on a GPU (no TF32), restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
