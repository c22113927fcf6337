"""Which KV cache dtypes and stock backends TriangleMix accepts, and the reasons it gives.

The CUDA-only rules are checked by calling the refusal function with a real
VllmConfig (vLLM's own ``EngineArgs.create_engine_config`` on this CPU, without
TriangleMix selected) and ``on_cuda=True``; what vLLM's config step refuses on
the CPU platform is in tests/e2e_cpu/test_refusals.py.
"""

import pytest

from vllm_trianglemix import selection, stock_backend

pytest.importorskip("vllm")


@pytest.mark.parametrize(
    "cache_dtype,expected",
    [
        ("auto", None),
        ("fp8", None),
        ("fp8_e4m3", None),
        ("bfloat16", None),  # the model dtype: not quantized
        ("fp8_e5m2", "KV cache dtype fp8_e5m2 is not supported (supported: auto, fp8, fp8_e4m3)"),
        ("nvfp4", "KV cache dtype nvfp4 is not supported"),
        ("float16", "KV cache dtype float16 is not supported"),  # != model dtype bf16
    ],
)
def test_kv_cache_dtype_rule(cache_dtype, expected):
    """The same on CUDA and CPU (vLLM checks what its stock backend needs for fp8)."""
    reason = selection.kv_cache_dtype_refusal(cache_dtype, "bfloat16")
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from vllm_trianglemix.tools.demo_model import build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("m") / "tiny-llama-trianglemix-demo"))


def _vllm_config(model, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), dtype="bfloat16", skip_tokenizer_init=True,
                      **kw).create_engine_config()


@pytest.mark.parametrize(
    "kw,refused_with",
    [
        (dict(kv_cache_dtype="fp8"), None),
        (dict(kv_cache_dtype="fp8_e4m3"), None),
        (dict(kv_cache_dtype="fp8_e5m2"), "KV cache dtype fp8_e5m2 is not supported"),
        (dict(additional_config={"trianglemix_stock_backend": "FLASHINFER"}), None),
        (dict(additional_config={"trianglemix_stock_backend": "flash_attn"}), None),
        (dict(additional_config={"trianglemix_stock_backend": "TRITON_ATTN"}),
         "--additional-config trianglemix_stock_backend: must be one of auto, FLASH_ATTN, "
         "FLASHINFER, got 'TRITON_ATTN'"),
    ],
)
def test_cuda_rules_on_a_real_vllm_config(tiny_model, kw, refused_with):
    reasons = selection._refusals(_vllm_config(tiny_model, **kw), on_cuda=True)
    if refused_with is None:
        assert reasons == []
    else:
        assert any(refused_with in r for r in reasons), reasons


def test_stock_backend_key_is_cuda_only(tiny_model):
    config = _vllm_config(tiny_model, additional_config={"trianglemix_stock_backend": "FLASHINFER"})
    assert "trianglemix_stock_backend applies to CUDA only" in selection._refusals(config, on_cuda=False)


@pytest.mark.parametrize(
    "value,expected",
    [(None, "auto"), ("auto", "auto"), ("AUTO", "auto"), ("flashinfer", "FLASHINFER"),
     ("FLASH_ATTN", "FLASH_ATTN")],
)
def test_requested_stock_backend(value, expected):
    config = {} if value is None else {stock_backend.STOCK_BACKEND_KEY: value}
    assert stock_backend.requested(config) == expected


@pytest.mark.parametrize("value", ["TRITON_ATTN", 3, ""])
def test_bad_stock_backend_names_the_key(value):
    with pytest.raises(stock_backend.StockBackendError, match="trianglemix_stock_backend"):
        stock_backend.requested({stock_backend.STOCK_BACKEND_KEY: value})


def test_auto_maps_vllms_pick_to_the_wrapper():
    """auto: the stock class vLLM picks for the GPU decides the TriangleMix class."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    paths = {n: AttentionBackendEnum[n].get_path() for n in ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")}
    for name in ("FLASH_ATTN", "FLASHINFER"):
        assert (stock_backend.wrapper_for_stock_path(paths[name], paths)
                == stock_backend.CUDA_BACKENDS[name])
    with pytest.raises(stock_backend.StockBackendError, match="vLLM picks TRITON_ATTN"):
        stock_backend.wrapper_for_stock_path(paths["TRITON_ATTN"], paths)


def test_wrapper_classes_are_the_stock_classes_underneath():
    """Everything vLLM reads from the backend class (cache shape, stride order) is the stock one's."""
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    fa = resolve_obj_by_qualname(stock_backend.CUDA_BACKENDS["FLASH_ATTN"])
    assert issubclass(fa, FlashAttentionBackend) and fa.get_name() == "CUSTOM"
    assert fa.get_impl_cls().__mro__[2].__name__ == "FlashAttentionImpl"  # mixin, then the stock impl
    assert stock_backend.CUDA_BACKENDS["FLASHINFER"].startswith("vllm_trianglemix.backends.flashinfer.")


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(kv_cache_dtype="fp8", device_capability=(9, 0)), []),
        (dict(kv_cache_dtype="fp8_e4m3", device_capability=(8, 9)), []),
        (dict(kv_cache_dtype="fp8", device_capability=(8, 0)),
         ["TriangleMix reads an fp8 KV cache on compute capability >= 8.9 only"]),
        (dict(kv_cache_dtype="fp8_e5m2", device_capability=(9, 0)),
         ["TriangleMix does not support KV cache dtype fp8_e5m2"]),
        (dict(kv_cache_dtype="nvfp4", device_capability=(10, 0)),
         ["TriangleMix does not support KV cache dtype nvfp4"]),
        (dict(kv_cache_dtype="auto", device_capability=(8, 0), head_size=96),
         ["TriangleMix supports head sizes (64, 128, 256)"]),
    ],
)
def test_cuda_backend_validation(kw, expected):
    """What the TriangleMix CUDA classes add to the stock backend's validate_configuration."""
    from vllm.platforms.interface import DeviceCapability

    from vllm_trianglemix.backends.cuda import triangle_refusals

    kw = {"head_size": 128, **kw, "device_capability": DeviceCapability(*kw["device_capability"])}
    assert triangle_refusals([], kw) == expected
