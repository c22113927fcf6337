"""Tile sizes and variants of the dynamic-layer kernels, and how a user overrides them.

``TRIANGLEMIX_XATTN_CONFIG="block_n=64,est_num_warps=4"`` overrides fields for every
engine started with it in the environment (``bench dynamic --best-env`` writes such a
line). The defaults are the fastest configuration ``bench dynamic`` measured on an H200
(BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm_trianglemix.ops.triangle_triton import with_overrides
from vllm_trianglemix.settings import XATTN_CONFIG, env_setting

CONFIG_ENV = XATTN_CONFIG
RETIRED_FIELDS = ("est_kernel", "select_kernel", "attn_tma", "attn_ws", "attn_fa3", "est_q_repack")
"""Fields of earlier releases that chose kernels now removed (each measured slower than what
replaced it): ignored, with one warning."""


def has_tma(device=None) -> bool:
    """Whether ``device`` (a CUDA device; None: this process's current one) has TMA, the
    tensor-memory accelerator of compute capability 9 and later."""
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return False
    elif torch.device(device).type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@dataclass(frozen=True)
class XAttnKernelConfig:
    # 1. Estimate: keys repacked contiguous; a program takes one KV head and several consecutive
    # query blocks of one request (rows: query blocks x query heads x query groups), and loops
    # over (key tile, stride offset).
    est_block_m: int = 128  # rows per program
    est_block_n: int = 256  # key groups per tile (rounded to whole key blocks)
    est_num_warps: int = 8
    est_num_stages: int = 2
    est_fp8_dot: int = 0  # 1: fp8 query and fp8 cache scored in e4m3 (exact products, float32 sums)
    # 1: a bf16/fp16 query and cache scored on their e4m3 roundings (saturating at +-448; float32
    # sums): half the bytes and twice the tensor-core rate of the estimate, but the selection is
    # XAttention's on the rounded values, so it may differ from the exact one near the threshold
    # (`bench dynamic` reports the agreement). Off by default; no effect on an fp8 cache.
    est_fp8_score: int = 0
    # 1: e4m3 dots (est_fp8_dot, est_fp8_score) accumulate as the tensor cores do by themselves
    # (Hopper: fewer bits than float32 between promotions) instead of promoting to float32 after
    # every instruction: faster, the scores rounded further. Off by default.
    est_fp8_fast_acc: int = 0
    # Head-dimension step of the estimate's dots (0: the whole head at once; else a power of two
    # >= 16 dividing the head size): smaller query and key tiles per pipeline stage, so that larger
    # row and column tiles fit in shared memory with more stages. Same scores. The defaults for
    # head sizes 128 and 256 use it (default_for).
    est_block_d: int = 0
    # The estimate's operand tiles by tensor descriptors (TMA bulk copies): each program's strided
    # query rows are first copied into a buffer laid out as its loop reads them (one [rows, head]
    # tile per stride offset), the keys are read as boxes of whole key groups (where a key block
    # holds a power-of-two number of groups; else by pointers). Same scores. -1 (default): on
    # GPUs with TMA (compute capability 9 and later), else the loads by pointers; 1: asked for;
    # 0: off (the defaults then take the tiles swept for loads by pointers). On the H200 the
    # estimate at 128K / 10% costs 17.7 ms (Llama-3.1-8B shape; 24.5 by pointers, measured before
    # full key tiles were scored without masks) and 16.7 ms (Qwen3.5-4B shape; 28.1 by pointers
    # with the earlier tiles; BENCHMARKS.md sections 3 and 5).
    est_tma: int = -1
    est_scratch_mb: int = 1024  # scratch per launch; larger work is launched in slices
    # 1: the estimate's programs ordered by KV head (those reading the same keys run together);
    # 0: by query rows (the KV heads of the same query blocks run together).
    est_head_major: int = 0
    # Programs per row tile, each taking a consecutive part of its key tiles (their running maxima
    # and sums combined by a second small launch): fewer query tiles in use at a time.
    # Head size 128 takes both (est_head_major=1, est_key_splits=2; default_for): on the H200 the
    # estimate at 128K / 10% took 17.1-17.3 ms against 18.7-21.3 ms without, in three interleaved
    # rounds of one run (BENCHMARKS.md section 3). The masses move by float rounding (3.8e-6).
    est_key_splits: int = 1
    # 1: the key-tile loop in Gluon for Hopper (estimate_gluon.py): each program's two warpgroups of
    # 64 rows issue their own asynchronous wgmmas on a shared ring of TMA-loaded tiles and run their
    # own tile epilogues, so one's epilogue overlaps the other's dots. Same scores (the masses move
    # by float rounding). Where it cannot run (not Hopper, fp8, est_block_m other than 128, key
    # blocks of a non-power-of-two number of groups), the Triton loop runs, with one warning.
    # Off by default: not yet measured against the Triton loop.
    est_gluon: int = 0
    # est_gluon's loads run est_num_stages - est_gluon_lag steps ahead, and its second warpgroup
    # starts est_gluon_lag - 1 steps behind the first (0: half of est_num_stages).
    est_gluon_lag: int = 0
    # 3. Attention over the kept blocks.
    # FlashAttention's CuTe-DSL Hopper forward that vLLM ships (vllm.vllm_flash_attn.cute: TMA
    # loads, warp-specialised producer and consumers) in its block-sparse mode, on the repacked
    # keys and values (attend_cute.py). -1 (default): where it can run (Hopper, a bf16/fp16 query
    # and cache, blocks of 128 keys, head sizes up to 256, nvidia-cutlass-dsl and quack-kernels
    # installed), else the Triton attention below, silently; 1: asked for, a warning where it
    # cannot run; 0: the Triton attention. On the H200 it took 23.8 against 32.6 ms at 128K / 10%
    # and 45.0 against 63.8 ms at 20% (BENCHMARKS.md section 3).
    attn_cute: int = -1
    # The Triton attention (attend.py): its tiles.
    block_m: int = 256  # rows (query rows x heads of a KV head) per program
    block_n: int = 64  # keys per tile (a divisor of the block size)
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def default_for(cls, head_size: int, tma: bool | None = None) -> "XAttnKernelConfig":
        """The fastest tiles ``bench dynamic`` measured for this head size on an H200: those swept
        with the estimate's operands by TMA where the GPU has it (``tma``; None: this process's
        GPU), else those swept with the loads by pointers (BENCHMARKS.md sections 3 and 5).
        Head size 128 takes the same tiles either way (since full key tiles are scored without
        masks, the TMA sweep chose the tiles of the loads by pointers)."""
        if tma is None:
            tma = has_tma()
        if head_size >= 256:  # bench dynamic's choice on the Qwen3.5-4B shape (16/4 heads, page 528)
            est = (dict(est_block_n=256, est_block_d=64, est_num_stages=4) if tma
                   else dict(est_block_n=128, est_block_d=128, est_num_stages=3))
            return cls(est_block_m=128, est_num_warps=8, block_m=128, block_n=64,
                       num_warps=8, num_stages=2, **est)
        if head_size == 128:  # bench dynamic's choice on the Llama-3.1-8B shape (32/8 heads)
            # (est_head_major / est_key_splits measured with TMA; the order of programs holds for both loads)
            return cls(est_num_stages=4, est_block_d=64, est_head_major=1, est_key_splits=2)
        return cls()

    @classmethod
    def from_env(cls, head_size: int) -> "XAttnKernelConfig":
        """The defaults with the overrides of ``TRIANGLEMIX_XATTN_CONFIG``, if set; ``est_tma=0`` /
        ``est_tma=1`` there also choose the default tiles swept without / with TMA."""
        config = cls.default_for(head_size)
        text = (env_setting(CONFIG_ENV) or "").strip()
        if not text:
            return config
        overridden = config.with_overrides(text, CONFIG_ENV)
        tma = {0: False, 1: True}.get(overridden.est_tma)
        if tma is None:
            return overridden
        named = {part.partition("=")[0].strip() for part in text.split(",")}
        fields = [f.name for f in dataclasses.fields(cls) if f.name in named]
        return dataclasses.replace(cls.default_for(head_size, tma=tma),
                                   **{f: getattr(overridden, f) for f in fields})

    def with_overrides(self, text: str, source: str = "config") -> "XAttnKernelConfig":
        return with_overrides(self, text, source, RETIRED_FIELDS)

    def as_text(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
