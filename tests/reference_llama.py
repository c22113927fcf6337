"""An independent float64 Llama forward with the exact TriangleMix mask per layer.

It reads the tiny model's safetensors and config directly (no vLLM, no
transformers modelling code) and applies, in each layer, the mask from
``vllm_trianglemix.pattern.visible`` with the layer's parameters: the same
definition the plugin uses, so the tests compare vLLM with the rule itself.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from tests.reference_cache import memoized
from tests.xattention_reference import dynamic_attention
from vllm_trianglemix.config import LayerMap
from vllm_trianglemix.pattern import DynamicParams, dense_start, visible


class ReferenceLlama:
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float64, device: str = "cpu"):
        """``device``: where the forward runs (GPU tests pass "cuda": the same float64 arithmetic,
        minutes less of a suite); results come back on the CPU."""
        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = json.load(f)
        self.dtype, self.device = dtype, torch.device(device)
        self.w = {k: v.to(self.device, dtype)
                  for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
        c = self.cfg
        self.num_layers = c["num_hidden_layers"]
        self.num_heads = c["num_attention_heads"]
        self.num_kv_heads = c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.num_heads
        self.eps = c["rms_norm_eps"]
        theta = c.get("rope_theta") or c.get("rope_parameters", {}).get("rope_theta", 10000.0)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=dtype, device=self.device)
                                         / self.head_dim))

    def _norm(self, x, weight):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * weight

    def _rope(self, x, pos):
        freqs = pos[:, None].to(self.dtype) * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @memoized
    @torch.no_grad()
    def logprobs(self, token_ids: list[int], layer_map: LayerMap | None, prompt_len: int | None = None,
                 chunk_starts=(), kv_scale: float | None = None, q_scale: float | None = None):
        """log-softmax of the logits at every position, [T, vocab].

        ``prompt_len`` (default: all tokens) is the L of the rule; positions at
        or past it (generated tokens) are dense rows, as in the plugin.
        ``layer_map=None`` runs every layer dense. Dynamic layers select their
        blocks with tests/xattention_reference.py (float64, its own estimate);
        ``chunk_starts`` are the positions where the engine's steps begin
        (only matters when one cuts a query block). ``self.margin`` is then the
        smallest distance of a selection decision from flipping.
        ``kv_scale``: attention
        reads K (after RoPE) and V from an fp8 e4m3 cache with that scale,
        ``fp8(x / scale) * scale``, as vLLM's fp8 KV cache stores them;
        ``q_scale``: the query is quantized the same way (vLLM does it for FA3).
        """
        self.margin = float("inf")
        n = len(token_ids)
        prompt_len = n if prompt_len is None else prompt_len
        pos = torch.arange(n, device=self.device)
        x = self.w["model.embed_tokens.weight"][torch.tensor(token_ids, device=self.device)]
        group = self.num_heads // self.num_kv_heads
        scale = self.head_dim ** -0.5
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            h = self._norm(x, self.w[p + "input_layernorm.weight"])
            q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(n, self.num_heads, self.head_dim)
            k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(n, self.num_kv_heads, self.head_dim)
            v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(n, self.num_kv_heads, self.head_dim)
            q, k = self._rope(q, pos), self._rope(k, pos)
            if kv_scale is not None:
                k, v = _fp8(k, kv_scale), _fp8(v, kv_scale)
            if q_scale is not None:
                q = _fp8(q, q_scale)
            params = layer_map.params_for(i) if layer_map is not None else None
            if isinstance(params, DynamicParams):
                ds = int(dense_start(prompt_len, params.n_last, layer_map.min_prompt_len))
                a, margin = dynamic_attention(
                    q, k, v, 0, ds, params.block_size, params.stride, params.threshold,
                    params.max_density, scale, chunk_starts,
                )
                self.margin = min(self.margin, margin)
                x = x + a.reshape(n, -1) @ self.w[p + "self_attn.o_proj.weight"].T
                x = self._mlp(x, p)
                continue
            if params is None:
                mask = visible(pos[:, None], pos[None, :], 0, 0, 1)
            else:
                ds = int(dense_start(prompt_len, params.n_last, layer_map.min_prompt_len))
                mask = visible(pos[:, None], pos[None, :], ds, params.n_init, params.n_local)
            kk = k.repeat_interleave(group, dim=1).transpose(0, 1)
            vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
            s = (q.transpose(0, 1) @ kk.transpose(1, 2)) * scale
            s = s.masked_fill(~mask, float("-inf"))
            a = (torch.softmax(s, dim=-1) @ vv).transpose(0, 1).reshape(n, -1)
            x = x + a @ self.w[p + "self_attn.o_proj.weight"].T
            x = self._mlp(x, p)
        x = self._norm(x, self.w["model.norm.weight"])
        logits = x @ self.w["lm_head.weight"].T
        return torch.log_softmax(logits, dim=-1).cpu()

    def _mlp(self, x, p):
        h = self._norm(x, self.w[p + "post_attention_layernorm.weight"])
        gate = h @ self.w[p + "mlp.gate_proj.weight"].T
        up = h @ self.w[p + "mlp.up_proj.weight"].T
        return x + (torch.nn.functional.silu(gate) * up) @ self.w[p + "mlp.down_proj.weight"].T

    def prompt_logprobs(self, token_ids, layer_map, prompt_len=None, chunk_starts=(), **fp8) -> torch.Tensor:
        """Logprob of each token given the ones before it (positions 1..T-1)."""
        lp = self.logprobs(token_ids, layer_map, prompt_len, chunk_starts, **fp8)
        ids = torch.tensor(token_ids[1:])
        return lp[:-1].gather(1, ids[:, None])[:, 0]


def _fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x as an fp8 e4m3 tensor with ``scale`` holds it (saturating at +-448, as vLLM's kernels do)."""
    q = (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.to(x.dtype) * scale
