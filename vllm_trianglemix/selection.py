"""Whether an engine selected TriangleMix, and what it refuses to serve.

``check_engine_config`` runs in the front-end process while vLLM builds its
config (from the platform's ``check_and_update_config``), before any engine
process starts: a bad layer map or a model TriangleMix cannot serve stops
``vllm serve`` / ``LLM(...)`` right there, with the reason.
"""

from __future__ import annotations

from vllm.logger import init_logger

from vllm_trianglemix import rules, stock_backend
from vllm_trianglemix.config import (
    RESOLVED_KEY,
    LayerMap,
    resolve_layer_map,
    to_additional_config,
)
from vllm_trianglemix.model_info import hf_attention_layer_ids  # noqa: F401 (tests import it here)

logger = init_logger("vllm.trianglemix")

BACKEND_NAME = "TRIANGLEMIX"
BACKEND_PACKAGE = "vllm_trianglemix."

SUPPORTED_DTYPES_CUDA = ("bfloat16", "float16")
SUPPORTED_HEAD_SIZES_CUDA = (64, 128, 256)
DYNAMIC_MAX_GROUPS_PER_BLOCK_CUDA = 128
"""``block_size / stride`` the GPU estimate handles (one block's key groups in one tile)."""

FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
"""--kv-cache-dtype values TriangleMix reads (both e4m3, with vLLM's per-layer scales)."""


class TriangleMixUnsupportedError(ValueError):
    """The served model or engine setting is one TriangleMix refuses."""


def backend_is_ours(backend) -> bool:
    """True for TRIANGLEMIX, and for CUSTOM while it is registered to this package."""
    if backend is None:
        return False
    name = getattr(backend, "name", None)
    if name == BACKEND_NAME:
        return True
    if name == "CUSTOM":
        try:
            return backend.get_path().startswith(BACKEND_PACKAGE)
        except ValueError:  # CUSTOM not registered
            return False
    return False


def is_selected(vllm_config) -> bool:
    attention_config = getattr(vllm_config, "attention_config", None)
    return backend_is_ours(getattr(attention_config, "backend", None))


def _refusals(vllm_config, on_cuda: bool) -> list[str]:
    """Reasons this engine cannot run TriangleMix (empty: it can): the model
    (``rules.model_refusals``, the tools' rule too), then the engine's settings."""
    mc = vllm_config.model_config
    if mc is None:
        return ["no model config"]
    reasons = rules.model_refusals(rules.ModelFacts.from_model_config(mc))
    head_size = mc.get_head_size()
    dtype = str(mc.dtype).replace("torch.", "")
    if on_cuda:
        if head_size not in SUPPORTED_HEAD_SIZES_CUDA:
            reasons.append(
                f"head size {head_size} is not supported on GPU "
                f"(supported: {', '.join(map(str, SUPPORTED_HEAD_SIZES_CUDA))})"
            )
        if dtype not in SUPPORTED_DTYPES_CUDA:
            reasons.append(
                f"dtype {dtype} is not supported on GPU (use --dtype bfloat16 or float16)"
            )
    kv_reason = kv_cache_dtype_refusal(vllm_config.cache_config.cache_dtype, dtype)
    if kv_reason:
        reasons.append(kv_reason)
    try:
        choice = stock_backend.requested(vllm_config.additional_config)
    except stock_backend.StockBackendError as e:
        reasons.append(str(e))
    else:
        if not on_cuda and choice != stock_backend.AUTO:
            reasons.append(f"{stock_backend.STOCK_BACKEND_KEY} applies to CUDA only")
    try:
        from vllm_trianglemix.density import interval_from

        interval_from(vllm_config.additional_config)
    except ValueError as e:
        reasons.append(str(e))
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding is not supported")
    pc = vllm_config.parallel_config
    if getattr(pc, "decode_context_parallel_size", 1) > 1 or getattr(
        pc, "prefill_context_parallel_size", 1
    ) > 1:
        reasons.append("context parallelism is not supported")
    if getattr(vllm_config.cache_config, "kv_sharing_fast_prefill", False):
        reasons.append("kv_sharing_fast_prefill is not supported")
    return reasons


def kv_cache_dtype_refusal(cache_dtype, model_dtype: str) -> str | None:
    """Why this --kv-cache-dtype cannot be served (None: it can), on CUDA and CPU alike.

    fp8 needs what vLLM's stock backend needs (FA3: Hopper; CPU: AVX-512/AMX), which
    vLLM checks, and compute capability >= 8.9 on CUDA (backends/cuda.py checks it).
    """
    if cache_dtype in ("auto", None) or cache_dtype == model_dtype:
        return None
    if cache_dtype in FP8_KV_CACHE_DTYPES:
        return None
    return (
        f"KV cache dtype {cache_dtype} is not supported "
        f"(supported: auto, {', '.join(FP8_KV_CACHE_DTYPES)})"
    )


def check_engine_config(vllm_config, on_cuda: bool) -> LayerMap:
    """Validate everything TriangleMix needs; refuse with the reason, else return the map.

    Also stores the validated map in ``additional_config`` so that the engine
    core and every worker (on any node) use exactly this map.
    """
    reasons = _refusals(vllm_config, on_cuda)
    if reasons:
        raise TriangleMixUnsupportedError(
            "TriangleMix attention cannot serve this engine: "
            + "; ".join(reasons)
            + ". Serve it without --attention-backend TRIANGLEMIX/CUSTOM."
        )
    mc = vllm_config.model_config
    layer_map = resolve_layer_map(
        vllm_config.additional_config, mc.model, getattr(mc, "served_model_name", None)
    )
    rules.check_layer_map(layer_map, rules.ModelFacts.from_model_config(mc))
    if on_cuda:
        problems = [p for params in layer_map.dynamic_param_sets for p in dynamic_gpu_problems(params)]
        if problems:
            raise TriangleMixUnsupportedError(
                "TriangleMix dynamic layers cannot run on this GPU path: " + "; ".join(problems)
            )
    if not isinstance(vllm_config.additional_config, dict):
        vllm_config.additional_config = {}
    vllm_config.additional_config[RESOLVED_KEY] = to_additional_config(layer_map)
    return layer_map


def dynamic_gpu_problems(params) -> list[str]:
    """What the GPU kernels of a dynamic layer cannot run (empty: they can), field named."""
    problems = []
    if params.block_size % 16:
        problems.append(f"field 'dynamic.block_size': must be a multiple of 16 on GPU, got {params.block_size}")
    groups = params.block_size // params.stride
    if params.block_size % params.stride == 0 and groups > DYNAMIC_MAX_GROUPS_PER_BLOCK_CUDA:
        problems.append(
            f"field 'dynamic.stride': {params.stride} gives {groups} groups per block of "
            f"{params.block_size}; the GPU estimate handles at most {DYNAMIC_MAX_GROUPS_PER_BLOCK_CUDA} "
            f"(use a stride >= {-(-params.block_size // DYNAMIC_MAX_GROUPS_PER_BLOCK_CUDA)})"
        )
    return problems


def engine_layer_map(vllm_config) -> LayerMap:
    """The map the front end validated (engine core and workers)."""
    mc = vllm_config.model_config
    layer_map = resolve_layer_map(vllm_config.additional_config, mc.model)
    rules.check_layer_map(layer_map, rules.ModelFacts.from_model_config(mc))
    return layer_map
