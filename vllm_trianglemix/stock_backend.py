"""Which stock vLLM backend TriangleMix wraps on CUDA: FlashAttention or FlashInfer.

TriangleMix runs the platform's stock backend for dense layers, decode and
short prompts, and its own kernel for the prompt rows of triangle layers, on
the stock backend's KV cache. On CUDA it can wrap two stock backends:

* ``FLASH_ATTN`` (FA3 on Hopper): :mod:`vllm_trianglemix.backends.cuda`;
* ``FLASHINFER``: :mod:`vllm_trianglemix.backends.flashinfer`.

How one is chosen: ``--additional-config '{"trianglemix_stock_backend": NAME}'``
with NAME ``auto`` (the default), ``FLASH_ATTN`` or ``FLASHINFER``. ``auto``
wraps the backend vLLM itself would pick for this GPU and engine config
without ``--attention-backend`` (FlashAttention on Hopper, FlashInfer on
Blackwell); a pick TriangleMix cannot wrap stops the engine with the reason.
A named backend is validated by vLLM for this configuration like a
``--attention-backend NAME`` would be.

The choice is made where vLLM makes its own, in the platform's
``get_attn_backend_cls`` (every worker; registration.py wraps it): the
``CUSTOM`` slot has one registered path, so the wrapper returns the path of
the TriangleMix class for the chosen stock backend instead. Each class is the
stock backend class with its own builder and impl (both subclasses of the
stock ones), so everything vLLM reads from the backend class (cache shape,
stride order, block sizes, required layout) is the stock backend's.
"""

from __future__ import annotations

STOCK_BACKEND_KEY = "trianglemix_stock_backend"
AUTO = "auto"

CUDA_BACKENDS = {
    "FLASH_ATTN": "vllm_trianglemix.backends.cuda.TriangleMixFlashAttentionBackend",
    "FLASHINFER": "vllm_trianglemix.backends.flashinfer.TriangleMixFlashInferBackend",
}
"""Stock backend name -> the TriangleMix class that wraps it."""

DEFAULT_CUDA_BACKEND = CUDA_BACKENDS["FLASH_ATTN"]
"""The path registered for CUSTOM (the wrapper picks per engine)."""


class StockBackendError(ValueError):
    """The stock backend requested or picked is one TriangleMix cannot wrap."""


def requested(additional_config) -> str:
    """``auto`` or a key of :data:`CUDA_BACKENDS`; bad values name the key."""
    value = (additional_config or {}).get(STOCK_BACKEND_KEY, AUTO) if isinstance(
        additional_config, dict) else AUTO
    if not isinstance(value, str) or (value.lower() != AUTO and value.upper() not in CUDA_BACKENDS):
        raise StockBackendError(
            f"--additional-config {STOCK_BACKEND_KEY}: must be one of "
            f"{', '.join([AUTO, *CUDA_BACKENDS])}, got {value!r}"
        )
    return AUTO if value.lower() == AUTO else value.upper()


def wrapper_for_stock_path(stock_path: str, stock_paths: dict[str, str]) -> str:
    """The TriangleMix class for the stock backend class at ``stock_path``.

    ``stock_paths`` maps stock names to their class paths (vLLM's registry).
    """
    for name, path in stock_paths.items():
        if path == stock_path and name in CUDA_BACKENDS:
            return CUDA_BACKENDS[name]
    picked = next((n for n, p in stock_paths.items() if p == stock_path), stock_path)
    raise StockBackendError(
        f"TriangleMix wraps {' or '.join(CUDA_BACKENDS)}; for this GPU and engine vLLM "
        f"picks {picked}. Set --additional-config "
        f"'{{\"{STOCK_BACKEND_KEY}\": \"FLASH_ATTN\"}}' (or FLASHINFER) if one of them "
        "supports this configuration, or serve without TriangleMix."
    )
