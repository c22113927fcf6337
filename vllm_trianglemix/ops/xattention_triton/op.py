"""The dynamic-layer op: plans a step and runs repack, estimate, select and attend on the device,
without a host synchronisation. Items come heaviest first (the plan orders them)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError
from vllm.logger import init_logger

from vllm_trianglemix.ops.fp8 import Fp8Scales, kernel_fp8_args, round_e4m3
from vllm_trianglemix.ops.triangle_triton import _next_pow2
from vllm_trianglemix.ops.xattention_triton import attend as attend_stage
from vllm_trianglemix.ops.xattention_triton import attend_cute
from vllm_trianglemix.ops.xattention_triton import estimate as estimate_stage
from vllm_trianglemix.ops.xattention_triton import estimate_gluon
from vllm_trianglemix.ops.xattention_triton import select as select_stage
from vllm_trianglemix.ops.xattention_triton.config import CONFIG_ENV, XAttnKernelConfig, has_tma
from vllm_trianglemix.ops.xattention_triton.plan import (
    Groups,
    KeptBlocks,
    TritonDynamicPlan,
    build_groups,
    kept_blocks_from_mask,
    round_up,
)
from vllm_trianglemix.ops.xattention_triton.repack import repack
from vllm_trianglemix.pattern import QUERY_BLOCK_FIELDS, DynamicParams, QueryBlockPlan, select_key_blocks
from vllm_trianglemix.selection import SUPPORTED_HEAD_SIZES_CUDA, dynamic_gpu_problems

COMPILE_ERRORS = (CompilationError, OutOfResources, PTXASError)
"""What a kernel that does not build on this GPU raises (before anything is launched)."""

logger = init_logger("vllm.trianglemix")


@dataclasses.dataclass
class Packed:
    """A step's repacked keys (and values), ``[kv_heads, keys, head_size]``, and their layout."""

    keys: torch.Tensor
    values: torch.Tensor | None
    groups: Groups


class TritonXAttentionOp:
    """Plans and launches the dynamic-layer kernels for one model shape."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int,
                 config: XAttnKernelConfig | None = None):
        if head_size not in SUPPORTED_HEAD_SIZES_CUDA:
            raise ValueError(f"head size {head_size} is not supported (supported: {SUPPORTED_HEAD_SIZES_CUDA})")
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.group = num_heads // num_kv_heads
        self.group_p = _next_pow2(self.group)
        self.config = config if config is not None else XAttnKernelConfig.from_env(head_size)
        try:  # a setting that cannot work is refused when the engine starts, naming the field
            estimate_stage.estimate_block_d(self.config, head_size)
            if self.config.est_gluon:
                estimate_gluon.gluon_stages(self.config)
        except ValueError as e:
            raise ValueError(f"{CONFIG_ENV}: {e}") from None
        self.blocks_width = 16  # the selection's block axis; warm_up sets it for the longest prompt
        self._select_params: dict = {}
        self.warmed: set = set()
        self._cute_not_run: str | None = None  # why the CuTe-DSL attention did not run (logged once each)
        self.last_attention: str | None = None  # "cute" or "triton": the attention of the last step

    # 0.
    def prepare(self, plan: QueryBlockPlan, dense_from: np.ndarray, cam) -> TritonDynamicPlan:
        """The plan's items on the device (the builder calls this once per batch)."""
        device = cam.block_table_tensor.device
        items = np.stack([getattr(plan, f) for f in QUERY_BLOCK_FIELDS], axis=1).astype(np.int64)
        return TritonDynamicPlan(
            items=torch.from_numpy(items.astype(np.int32)).to(device, non_blocking=True),
            q_block=torch.from_numpy(plan.q_block.astype(np.int64)).to(device, non_blocking=True),
            block_table=cam.block_table_tensor,
            num_items=plan.num_items,
            num_blocks=int(plan.q_block.max()) + 1 if plan.num_items else 0,
            host_items=items,
        )

    def groups(self, prepared: TritonDynamicPlan, params: DynamicParams) -> Groups:
        """The estimate's groups and the repacked layout for this plan (once per plan and shape)."""
        _, _, kb, _, qb, _ = estimate_stage.estimate_shape(self.config, self.group_p, params.block_size,
                                                          params.stride)
        key = (qb, kb, params.block_size)
        if key not in prepared.groups:
            prepared.groups[key] = build_groups(prepared.host_items, qb, params.block_size, kb,
                                                prepared.items.device)
        return prepared.groups[key]

    def pack(self, query, key_cache, value_cache, prepared: TritonDynamicPlan, params: DynamicParams,
             fp8, with_values: bool = True) -> Packed:
        """The step's keys (and values, for the attention) repacked contiguous."""
        groups = self.groups(prepared, params)
        if self.config.est_fp8_dot and fp8.q_fp8 and fp8.kv_fp8:
            dtype = torch.float8_e4m3fn
        else:
            dtype = torch.float16 if fp8.q_fp8 else query.dtype  # fp16 holds e4m3 values exactly
        kp, vp = repack(key_cache, value_cache, prepared.block_table, groups, self.num_kv_heads,
                        self.head_size, dtype, with_values)
        return Packed(kp, vp, groups)

    def fp8_scored(self, fp8) -> bool:
        """Whether the estimate scores e4m3 roundings of a bf16/fp16 query and cache."""
        return bool(self.config.est_fp8_score) and not fp8.q_fp8 and not fp8.kv_fp8

    def _fp8(self, query, key_cache, value_cache, prepared, scales):
        return kernel_fp8_args(query, key_cache, value_cache, scales, self.num_kv_heads,
                               placeholder=prepared.q_block)

    # 1.
    def estimate(self, query, key_cache, prepared: TritonDynamicPlan, params: DynamicParams,
                 scale: float, scales: Fp8Scales | None = None) -> torch.Tensor:
        """Block masses ``[items, kv_heads, num_blocks]`` (float32; zero past each item's block)."""
        mass = self.estimate_row_tiles(query, key_cache, prepared, params, scale, scales)
        return mass[:, :, 0] if mass.shape[2] == 1 else mass.sum(2)

    def estimate_row_tiles(self, query, key_cache, prepared, params, scale, scales=None,
                           packed: Packed | None = None) -> torch.Tensor:
        """Block masses per row tile ``[items, kv_heads, row_tiles, num_blocks]``."""
        problems = dynamic_gpu_problems(params)  # refused at start (selection.py); a direct caller too
        if problems:
            raise ValueError("; ".join(problems))
        fp8 = self._fp8(query, key_cache, key_cache, prepared, scales)

        def run():
            p = packed  # (repacked for this tile shape: a fallback to other tiles repacks)
            if p is None or p.groups is not self.groups(prepared, params):
                p = self.pack(query, key_cache, key_cache, prepared, params, fp8, with_values=False)
            q, keys = query, p.keys
            if self.fp8_scored(fp8):
                q, keys = round_e4m3(query), round_e4m3(p.keys)
            return estimate_stage.estimate(self, q, keys, prepared, p.groups, params, scale, fp8)

        return self._built(run, "the estimate kernel", ("est_block_m", "est_block_n", "est_block_d",
                                                        "est_num_warps", "est_num_stages", "est_fp8_dot",
                                                        "est_fp8_score", "est_fp8_fast_acc", "est_tma",
                                                        "est_gluon", "est_gluon_lag"))

    def _built(self, fn, what: str, fields: tuple[str, ...]):
        """``fn()``; if its kernel does not build on this GPU (shared memory, registers), first the
        defaults of ``fields``, then fewer pipeline stages and smaller tiles, until one builds:
        that configuration from then on, with one warning (warmup.py meets this at start)."""
        tried = []
        while True:
            try:
                result = fn()
            except COMPILE_ERRORS as e:
                tried.append(",".join(f"{f}={getattr(self.config, f)}" for f in fields))
                smaller = self._smaller(fields, first=len(tried) == 1)
                if smaller is None:
                    raise
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                self.config = smaller
                continue
            if tried:
                logger.warning("TriangleMix dynamic layers: %s does not build on this GPU with %s (%s); "
                               "using %s (%s sets it)", what, " nor ".join(tried), error,
                               ",".join(f"{f}={getattr(self.config, f)}" for f in fields), CONFIG_ENV)
            return result

    def _smaller(self, fields: tuple[str, ...], first: bool) -> XAttnKernelConfig | None:
        """The next configuration to try after a build failure (None: nothing smaller): the
        defaults after the first failure of a configured variant, then (the estimate) its loads
        by pointers instead of TMA, then smaller ones."""
        cfg, default = self.config, XAttnKernelConfig.default_for(self.head_size)
        changed = {f: getattr(default, f) for f in fields if getattr(cfg, f) != getattr(default, f)}
        if first and changed:
            return dataclasses.replace(cfg, **changed)
        est = fields[0].startswith("est_")
        if est and (cfg.est_tma == 1 or (cfg.est_tma == -1 and has_tma())):
            return dataclasses.replace(cfg, est_tma=0)
        stages, rows = ("est_num_stages", "est_block_m") if est else ("num_stages", "block_m")
        if getattr(cfg, stages) > 1:
            return dataclasses.replace(cfg, **{stages: getattr(cfg, stages) - 1})
        if getattr(cfg, rows) > 32:
            return dataclasses.replace(cfg, **{rows: getattr(cfg, rows) // 2})
        return None

    # 2.
    def select(self, mass, prepared: TritonDynamicPlan, params: DynamicParams,
               select=select_key_blocks, keep_mask: bool = False) -> KeptBlocks:
        """The kept blocks; ``mass`` as :meth:`estimate` returns it, or per row tile (4-d).

        The rule itself runs fused (select.py); another ``select`` function (tests record or
        alter the selection with one) runs in torch and is compacted here; ``keep_mask`` also
        returns the kept-block mask.
        """
        if select is select_key_blocks:
            return select_stage.select(mass, prepared.q_block, self._params_tensor(params, mass.device),
                                       params, self.blocks_width, keep_mask)
        if mass.dim() == 4:
            mass = mass[:, :, 0] if mass.shape[2] == 1 else mass.sum(2)
        keep = select(mass, prepared.q_block[:, None], params.threshold, params.max_density)
        blocks = kept_blocks_from_mask(keep, prepared.q_block)
        if keep_mask:
            blocks.keep = keep
        return blocks

    def _params_tensor(self, params: DynamicParams, device) -> torch.Tensor:
        key = (params.threshold, params.max_density, str(device))
        if key not in self._select_params:
            md = params.max_density if params.max_density is not None else 1.0
            self._select_params[key] = torch.tensor([params.threshold, md], dtype=torch.float64, device=device)
        return self._select_params[key]

    def all_blocks(self, prepared: TritonDynamicPlan) -> KeptBlocks:
        """Every causal block (no estimate needed when nothing can be dropped)."""
        n, kv, dev = prepared.num_items, self.num_kv_heads, prepared.q_block.device
        kept = torch.arange(round_up(max(prepared.num_blocks, 1)), dtype=torch.int32, device=dev)
        n_kept = prepared.q_block.to(torch.int32)[:, None].expand(n, kv).contiguous()
        return KeptBlocks(kept.expand(n * kv, -1).view(n, kv, -1), n_kept,
                          torch.ones((n, kv), dtype=torch.int32, device=dev))

    # 3.
    def uses_cute(self, query, key_cache, fp8, params: DynamicParams) -> bool:
        """Whether the attention runs through the CuTe-DSL forward (``attn_cute``: attend_cute.py).

        Where it cannot run, the Triton attention does; a new reason is logged once: a warning
        where ``attn_cute=1`` asked for it, a debug line for the default (-1)."""
        if not self.config.attn_cute:
            return False
        why = attend_cute.usable(self, query, key_cache, fp8, params.block_size)
        if why is not None and why != self._cute_not_run:
            self._cute_not_run = why
            log = logger.warning if self.config.attn_cute > 0 else logger.debug
            log("TriangleMix dynamic layers: attn_cute cannot run here (%s); the Triton attention runs "
                "instead", why)
        return why is None

    def _cute_refused(self, e: Exception) -> None:
        """FA4's forward refused a step before writing (its own checks, its compiler): the Triton
        attention from now on, with one warning."""
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        logger.warning("TriangleMix dynamic layers: attn_cute: the library kernel refused this step (%s); "
                       "the Triton attention runs from now on (%s sets it)", why, CONFIG_ENV)
        self.config = dataclasses.replace(self.config, attn_cute=0)
        self._cute_not_run = f"refused: {why}"

    def not_run(self) -> dict[str, str]:
        """``{"attn_cute": why}`` where the CuTe-DSL attention was asked for (``attn_cute=1``) and
        could not run, or refused a step (as warned); else empty."""
        why = self._cute_not_run
        return {"attn_cute": why} if why and (self.config.attn_cute > 0 or why.startswith("refused")) else {}

    def attend(self, query, key_cache, value_cache, prepared: TritonDynamicPlan,
               params: DynamicParams, scale: float, output, blocks: KeptBlocks,
               scales: Fp8Scales | None = None, packed: Packed | None = None) -> None:
        """The attention over ``blocks``: FA4's CuTe-DSL forward where it can run, else Triton's."""
        fp8 = self._fp8(query, key_cache, value_cache, prepared, scales)
        if packed is None or packed.values is None or packed.groups is not self.groups(prepared, params):
            packed = self.pack(query, key_cache, value_cache, prepared, params, fp8)
        if self.uses_cute(query, key_cache, fp8, params):
            try:
                if attend_cute.attend(self, query, prepared, params, scale, output, blocks, packed):
                    self.last_attention = "cute"
                    return
            except Exception as e:  # noqa: BLE001 (its checks and its DSL compiler raise their own types)
                self._cute_refused(e)

        def run():
            attend_stage.attend(self, query, prepared, params, scale, output, blocks, fp8, packed)

        self._built(run, "the attention kernel", ("block_m", "block_n", "num_warps", "num_stages"))
        self.last_attention = "triton"

    def run(self, query, key_cache, value_cache, prepared: TritonDynamicPlan,
            params: DynamicParams, scale: float, output, select=select_key_blocks,
            scales: Fp8Scales | None = None, stats: torch.Tensor | None = None) -> None:
        """query/output: [tokens, heads, dim]; caches: [blocks, block_size, kv_heads, dim] views.

        An fp8 cache (float8_e4m3fn views) needs ``scales``, and so does an fp8 query.
        ``stats`` (the density report, float64 [3] on the device): adds the kept and the
        causal key blocks on the device, no host synchronisation (the estimate's time, its
        third entry, is measured on the CPU path only).
        """
        if prepared.num_items == 0:
            return
        everything = params.keeps_everything and select is select_key_blocks
        fp8 = self._fp8(query, key_cache, value_cache, prepared, scales)
        packed = self.pack(query, key_cache, value_cache, prepared, params, fp8)
        if everything:
            blocks = self.all_blocks(prepared)
        else:
            mass = self.estimate_row_tiles(query, key_cache, prepared, params, scale, scales, packed)
            blocks = self.select(mass, prepared, params, select)
        if stats is not None:
            stats[0] += (blocks.n_kept.sum() + blocks.diag_kept.sum()).to(stats.dtype)
            stats[1] += ((prepared.q_block + 1).sum() * blocks.n_kept.shape[1]).to(stats.dtype)
        self.attend(query, key_cache, value_cache, prepared, params, scale, output, blocks, scales, packed)
