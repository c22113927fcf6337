"""The platform-independent half of the backend: routing a batch.

A TriangleMix backend is the platform's stock backend plus two mixins:

* the builder builds the stock metadata for the whole batch (dense layers
  use it, untouched) and, when the batch holds prompt rows that a triangle
  layer computes differently, also (a) stock metadata for the rows a triangle
  or dynamic layer leaves to the stock backend: the other requests (decodes,
  short prompts, chunks of only dense rows) and the dense rows (at or past
  the dense start: the prompt's last ``n_last``) of the triangle requests,
  one set per distinct ``n_last`` of the map, and (b) the work plan of the
  triangle requests' other rows, one per distinct parameter set of the map;
* the impl, in a dense layer or when the batch needs no triangle work, calls
  the stock ``forward`` with the stock metadata (bit for bit the stock
  backend); in a triangle or dynamic layer it runs the stock ``forward`` on
  the rows left to it and the triangle (or dynamic) op on the others.

The KV cache is written by the stock ``do_kv_cache_update`` in every layer.
The platform files only say which stock classes and which triangle op to use
and how to view the stock KV cache as ``[blocks, block_size, kv_heads, dim]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from vllm.logger import init_logger

from vllm_trianglemix import compat, prompt_lens, selection
from vllm_trianglemix.pattern import (
    DynamicParams,
    TriangleParams,
    dense_start,
    dynamic_first_sparse_row,
    first_sparse_row,
    plan_blocks,
    plan_query_blocks,
)
from vllm_trianglemix.ops.fp8 import Fp8Scales, is_fp8

logger = init_logger("vllm.trianglemix")


@dataclass
class StockRows:
    """Rows of a batch that a triangle or dynamic layer leaves to the stock backend: the
    requests the triangle path does not take, and the dense rows of those it does (each
    request's rows at or past its dense start, the last rows of its query)."""

    metadata: Any
    """Stock metadata for these rows (a request's keys are all of its keys)."""
    tokens: slice | torch.Tensor
    """Their query tokens in the batch (a slice when contiguous)."""


@dataclass
class TriangleMixMetadata:
    """Metadata of a batch with triangle work; anything else reads ``full``."""

    full: Any
    """Stock metadata for the whole batch: dense layers."""
    stock: dict[int, StockRows | None]
    """Per ``n_last`` of the map: the rows left to the stock backend (None: no rows)."""
    plans: dict[TriangleParams | DynamicParams, Any]
    """Per parameter set: the triangle op's plan (triangle layers) or the dynamic op's plan
    (dynamic layers) of the rows below the dense start."""
    num_actual_tokens: int

    def __getattr__(self, name: str):
        # Code outside the backend (KV connectors, logging) sees the stock view.
        full = self.__dict__.get("full")
        if full is None:
            raise AttributeError(name)
        return getattr(full, name)


@dataclass
class BatchRoute:
    triangle_reqs: np.ndarray
    stock_reqs: np.ndarray
    prompt_len: np.ndarray  # per request of the batch (0 for padding)
    query_start_loc: np.ndarray
    seq_lens: np.ndarray


def stock_row_ranges(route: BatchRoute, dense_from: np.ndarray):
    """``(reqs, starts, ends)``: the requests with rows for the stock backend, and those rows as
    ranges of the batch's query tokens: every row of a request the triangle path does not take,
    the rows at or past the dense start of one it takes (the last rows of its query)."""
    qsl, seq = route.query_start_loc, route.seq_lens
    starts, ends = qsl[:-1].copy(), qsl[1:]
    tri = route.triangle_reqs
    first_pos = seq[tri] - (ends[tri] - starts[tri])
    n_dense = np.maximum(seq[tri] - np.maximum(dense_from[tri], first_pos), 0)
    starts[tri] = np.maximum(starts[tri], ends[tri] - n_dense)
    reqs = np.union1d(route.stock_reqs, tri[starts[tri] < ends[tri]]).astype(np.int64)
    return reqs, starts[reqs], ends[reqs]


class TriangleMixBuilderMixin:
    """Mixed in before the platform's stock metadata builder."""

    stock_builder_cls: ClassVar[type]
    triangle_op: ClassVar[Any]
    dynamic_op: ClassVar[Any]
    supports_update_block_table: bool = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._builder_args = (kv_cache_spec, layer_names, vllm_config, device)
        self.layer_map = selection.engine_layer_map(vllm_config)
        self.param_sets = self.layer_map.param_sets
        self.dynamic_sets = self.layer_map.dynamic_param_sets
        self.min_n_last = self.layer_map.min_n_last
        self.n_lasts = sorted({p.n_last for p in (*self.param_sets, *self.dynamic_sets)})
        """The map's distinct ``n_last``: one set of stock rows (and one stock builder) each."""
        self._stock_subset_builders: dict[int, Any] = {}
        self.min_sparse_row = min(
            [first_sparse_row(p) for p in self.param_sets]
            + [dynamic_first_sparse_row(p) for p in self.dynamic_sets]
        )
        wrapped = prompt_lens.install()
        logger.debug("TriangleMix: prompt lengths from model runner %s", wrapped)
        self._warned_unsplittable = False

    def warm_up_kernels(self, vllm_config, device) -> None:
        """Compile the GPU kernels this engine's map can launch, before it serves (warmup.py)."""
        from vllm_trianglemix import warmup
        from vllm_trianglemix.settings import WARMUP, env_setting

        if (env_setting(WARMUP) or "1").strip() == "0":
            return
        warmup.warm_up(
            self.triangle_op, self.dynamic_op, self.param_sets, self.dynamic_sets,
            vllm_config.model_config.dtype,
            vllm_config.cache_config.cache_dtype in selection.FP8_KV_CACHE_DTYPES,
            self._builder_args[0].block_size, vllm_config.model_config.max_model_len, device,
        )

    def _subset_builder(self, n_last: int):
        # More stock builders, one per set of stock rows: stock builders keep persistent
        # buffers (FA3 scheduler metadata) that one batch's metadata must not share.
        if n_last not in self._stock_subset_builders:
            self._stock_subset_builders[n_last] = self.stock_builder_cls(*self._builder_args)
        return self._stock_subset_builders[n_last]

    def route(self, cam) -> BatchRoute | None:
        """Which requests of the batch need triangle work (None: none do)."""
        lengths = prompt_lens.current()
        if lengths is None:
            return None
        num_reqs = cam.num_reqs
        # Requests past the published ones are CUDA-graph padding (no rows).
        prompt_len = np.zeros(num_reqs, dtype=np.int64)
        known = min(num_reqs, lengths.shape[0])
        prompt_len[:known] = lengths[:known]
        qsl = cam.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        seq = compat.seq_lens_cpu(cam).numpy().astype(np.int64)
        q_len = np.diff(qsl)
        first_pos = seq - q_len
        take = (
            (q_len > 0)
            & (prompt_len >= self.layer_map.min_prompt_len)
            & (first_pos < prompt_len - self.min_n_last)
            & (seq - 1 >= self.min_sparse_row)
        )
        if not take.any():
            return None
        return BatchRoute(np.nonzero(take)[0], np.nonzero(~take)[0], prompt_len, qsl, seq)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cam = common_attn_metadata
        full = super().build(common_prefix_len, cam, fast_build)
        route = self.route(cam)
        if route is None:
            return full
        min_prompt_len = self.layer_map.min_prompt_len
        dense_starts = {n_last: dense_start(route.prompt_len, n_last, min_prompt_len)
                        for n_last in self.n_lasts}
        stock = {}
        for n_last, dense_from in dense_starts.items():
            built, stock[n_last] = self._build_stock_rows(cam, route, dense_from, n_last, fast_build)
            if not built:
                return full
        plans = {}
        for params in self.param_sets:
            dense_from = dense_starts[params.n_last]
            plan = plan_blocks(
                route.query_start_loc,
                route.seq_lens,
                dense_from,
                route.triangle_reqs,
                params,
                self.triangle_op.block_q,
                rows="triangle",
            )
            plans[params] = self.triangle_op.prepare(plan, dense_from, cam)
        for params in self.dynamic_sets:
            dense_from = dense_starts[params.n_last]
            block_plan = plan_query_blocks(
                route.query_start_loc, route.seq_lens, dense_from, route.triangle_reqs,
                params.block_size,
            )
            plans[params] = self.dynamic_op.prepare(block_plan, dense_from, cam)
        return TriangleMixMetadata(
            full=full,
            stock=stock,
            plans=plans,
            num_actual_tokens=cam.num_actual_tokens,
        )

    def _build_stock_rows(self, cam, route: BatchRoute, dense_from: np.ndarray, n_last: int,
                          fast_build: bool) -> tuple[bool, StockRows | None]:
        """The stock backend's rows for layers with this ``dense_from``: ``(built, rows)``, rows
        None when there are none; ``built`` False when the metadata cannot be split (the batch
        then runs dense, with one warning)."""
        reqs, starts, ends = stock_row_ranges(route, dense_from)
        if reqs.size == 0:
            return True, None
        if np.array_equal(starts[1:], ends[:-1]):
            tokens: slice | torch.Tensor = slice(int(starts[0]), int(ends[-1]))
            tok_idx = torch.arange(int(starts[0]), int(ends[-1]), device=cam.query_start_loc.device)
        else:
            idx = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
            tok_idx = torch.from_numpy(idx).to(cam.query_start_loc.device, non_blocking=True)
            tokens = tok_idx
        sub = compat.subset_common_metadata(
            cam, torch.from_numpy(reqs), tok_idx, torch.from_numpy(ends - starts)
        )
        if sub is None:
            if not self._warned_unsplittable:
                logger.warning(
                    "TriangleMix: this batch's metadata cannot be split by request; "
                    "it runs dense (stock backend). Further occurrences are not logged."
                )
                self._warned_unsplittable = True
            return False, None
        return True, StockRows(self._subset_builder(n_last).build(0, sub, fast_build), tokens)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        # Full CUDA graphs for single-token decode batches only: prefill
        # batches take data-dependent routes and run eagerly / piecewise.
        from vllm.v1.attention.backend import AttentionCGSupport

        stock = cls.stock_builder_cls.get_cudagraph_support(vllm_config, kv_cache_spec)
        return min(stock, AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, key=lambda s: s.value)


def _take(t: torch.Tensor | None, idx):
    """Rows ``idx`` of ``t``; an fp8 tensor (a query vLLM quantized) through its bytes."""
    if t is None or isinstance(idx, slice):
        return None if t is None else t[idx]
    if is_fp8(t):
        return t.view(torch.uint8)[idx].view(t.dtype)
    return t[idx]


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(layer_name: str) -> int | None:
    """'model.layers.17.self_attn.attn' -> 17."""
    found = _LAYER_INDEX.findall(layer_name)
    return int(found[0]) if len(found) == 1 else None


class TriangleMixImplMixin:
    """Mixed in before the platform's stock attention impl."""

    triangle_op: ClassVar[Any]
    dynamic_op: ClassVar[Any]

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                 sliding_window, kv_cache_dtype, *args, **kwargs):
        sinks = kwargs.get("sinks")
        if sliding_window is not None:
            raise selection.TriangleMixUnsupportedError(
                "TriangleMix attention: sliding-window layers are not supported"
            )
        if sinks is not None:
            raise selection.TriangleMixUnsupportedError(
                "TriangleMix attention: attention-sink layers are not supported"
            )
        if alibi_slopes is not None:
            raise selection.TriangleMixUnsupportedError(
                "TriangleMix attention: ALiBi models are not supported"
            )
        if kv_cache_dtype not in ("auto", "bfloat16", "float16", *selection.FP8_KV_CACHE_DTYPES):
            raise selection.TriangleMixUnsupportedError(
                f"TriangleMix attention: KV cache dtype {kv_cache_dtype} is not supported"
            )
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                         sliding_window, kv_cache_dtype, *args, **kwargs)
        self._kv_fp8 = kv_cache_dtype in selection.FP8_KV_CACHE_DTYPES
        if getattr(self, "logits_soft_cap", 0):
            raise selection.TriangleMixUnsupportedError(
                "TriangleMix attention: logits soft-capping is not supported"
            )
        from vllm.config import get_current_vllm_config

        self._layer_map = selection.engine_layer_map(get_current_vllm_config())
        self._layer_params: dict[str, TriangleParams | DynamicParams | None] = {}
        self._density = None
        if self._layer_map.dynamic_layers:
            from vllm_trianglemix import density

            self._density = density.meter_for(get_current_vllm_config())

    def kv_cache_views(self, layer, kv_cache: torch.Tensor):
        """The stock cache as (key, value), each [blocks, block_size, kv_heads, dim]
        (float8_e4m3fn views for an fp8 cache)."""
        raise NotImplementedError

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if not isinstance(attn_metadata, TriangleMixMetadata):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                   output, output_scale, output_block_scale)
        params = self.layer_params(layer)
        plan = attn_metadata.plans.get(params) if params is not None else None
        if plan is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata.full,
                                   output, output_scale, output_block_scale)
        rows = attn_metadata.stock[params.n_last]
        if rows is not None:  # the other requests, and the dense rows: the stock backend
            idx, stock = rows.tokens, rows.metadata
            k_sub = _take(key, idx)
            v_sub = _take(value, idx)
            if isinstance(idx, slice):
                super().forward(layer, query[idx], k_sub, v_sub, kv_cache, stock, output[idx])
            else:
                out_sub = output.new_empty((idx.shape[0],) + tuple(output.shape[1:]))
                super().forward(layer, _take(query, idx), k_sub, v_sub, kv_cache, stock, out_sub)
                output[idx] = out_sub
        key_cache, value_cache = self.kv_cache_views(layer, kv_cache)
        # fp8: the layer's scales (and the query's, when vLLM quantized it for the stock kernel)
        scales = Fp8Scales.of_layer(layer) if self._kv_fp8 or is_fp8(query) else None
        if isinstance(params, DynamicParams):
            extra = {} if scales is None else {"scales": scales}
            if self._density is not None:
                extra["stats"] = self._density.counts(layer_index(layer.layer_name), query.device)
            self.dynamic_op.run(query, key_cache, value_cache, plan, params, self.scale, output,
                                **extra)
        else:
            self.triangle_op.run(query, key_cache, value_cache, plan, params, self.scale, output,
                                 scales=scales)
        return output

    def layer_params(self, layer) -> TriangleParams | DynamicParams | None:
        """This layer's triangle or dynamic parameters, or None for a dense layer."""
        name = layer.layer_name
        if name not in self._layer_params:
            index = layer_index(name)
            self._layer_params[name] = None if index is None else self._layer_map.params_for(index)
        return self._layer_params[name]
