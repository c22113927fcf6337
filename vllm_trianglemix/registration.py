"""What the plugin changes in vLLM, and when.

In every process (front end, engine core, workers, Ray workers) ``register``:

* names the backend: ``CUSTOM`` -> this package's backend for the platform,
  and a new ``TRIANGLEMIX`` member as well;
* wraps the platform's ``check_and_update_config`` so that, when an engine
  selects TriangleMix, the layer map and the model are validated in the front
  end before any engine process starts (and the INFO line is logged), and the
  plugin's settings (settings.py) are named to vLLM for its Ray actors;
* names those settings in the platform's ``additional_env_vars``, which the Ray
  executor copies to its workers;
* on the CPU platform, which otherwise ignores a selected backend, returns
  the TriangleMix CPU backend when (and only when) it is the one selected;
* in the engine-core process, installs the prefix-cache rule (no-op unless
  the engine selected TriangleMix);
* in the process of vLLM's HTTP server, makes the server exit non-zero when
  its engine died (engine_death.py; only for an engine that selected
  TriangleMix).

Every wrapper passes straight through unless TriangleMix is selected, so an
installed but unselected plugin leaves vLLM's behaviour as it is.
"""

from __future__ import annotations

import functools

from vllm.logger import init_logger

from vllm_trianglemix import compat, engine_death, prefix_cache, selection, settings, stock_backend
from vllm_trianglemix.config import TriangleMixConfigError

logger = init_logger("vllm.trianglemix")

CUDA_BACKEND = stock_backend.DEFAULT_CUDA_BACKEND  # CUSTOM's path; the wrapper picks per engine
CPU_BACKEND = "vllm_trianglemix.backends.cpu.TriangleMixCPUBackend"


def _backend_path(platform) -> str | None:
    if platform.is_cuda():
        return CUDA_BACKEND
    if platform.is_cpu():
        return CPU_BACKEND
    return None


def register_plugin() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if not compat.version_supported():
        logger.warning(
            "vllm-trianglemix supports vLLM >= %s and < %s (tested: %s); this is %s.",
            ".".join(map(str, compat.SUPPORTED_MIN)),
            ".".join(map(str, compat.SUPPORTED_MAX_EXCLUSIVE)),
            ", ".join(compat.TESTED),
            ".".join(map(str, compat.vllm_version())),
        )
    path = _backend_path(current_platform)
    if path is None:
        logger.debug("TriangleMix: no backend for platform %s", current_platform.device_name)
        return

    custom = AttentionBackendEnum.CUSTOM
    if not custom.is_overridden():
        register_backend(custom, path)
    elif not custom.get_path().startswith(selection.BACKEND_PACKAGE):
        logger.warning(
            "TriangleMix: the CUSTOM attention backend is already registered to %s; "
            "TriangleMix needs that slot: --attention-backend CUSTOM selects the other "
            "backend and --attention-backend %s stops at start.",
            custom.get_path(),
            selection.BACKEND_NAME,
        )
    compat.register_backend_name(selection.BACKEND_NAME, path)

    settings.name_for_ray_workers(type(current_platform))
    _wrap_config_check(type(current_platform))
    if current_platform.is_cpu():
        _wrap_cpu_backend_choice(type(current_platform), path)
    if current_platform.is_cuda():
        _wrap_cuda_backend_choice(type(current_platform))
    prefix_cache.install()
    engine_death.install()


def _wrap_config_check(platform_cls) -> None:
    if getattr(platform_cls, "_trianglemix_config_check", False):
        return
    original = platform_cls.check_and_update_config.__func__

    @functools.wraps(original)
    def check_and_update_config(cls, vllm_config) -> None:
        original(cls, vllm_config)
        if not selection.is_selected(vllm_config):
            return
        first_time = selection.RESOLVED_KEY not in (vllm_config.additional_config or {})
        from vllm.platforms import current_platform

        try:
            layer_map = selection.check_engine_config(vllm_config, on_cuda=current_platform.is_cuda())
        except (TriangleMixConfigError, selection.TriangleMixUnsupportedError) as e:
            # vLLM wraps this in a long traceback (pydantic's, under `vllm serve`): say it first.
            logger.error("%s", e)
            raise
        if first_time:
            logger.info("TriangleMix attention: %s", layer_map.describe())
            if layer_map.dynamic_layers:
                from vllm_trianglemix import density

                density.install_collector(vllm_config)
            if "uncalibrated" in (layer_map.notes or "").lower():
                logger.warning(
                    "TriangleMix: map %s is an uncalibrated starting point; run "
                    "`vllm-trianglemix calibrate --model %s` and serve with the map it writes",
                    layer_map.source, vllm_config.model_config.model,
                )
        settings.carry_to_ray()
        _select_by_static_member(vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    platform_cls._trianglemix_config_check = True


def _select_by_static_member(vllm_config) -> None:
    """Carry the selection to the engine processes as ``CUSTOM``.

    A member added with ``AttentionBackendEnum.register`` exists only in the
    processes that ran the plugin before unpickling the config; the engine
    core unpickles its config first, so ``TRIANGLEMIX`` would not resolve
    there. ``CUSTOM`` is a static member, registered to this package in every
    process.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = vllm_config.attention_config.backend
    if backend.name == "CUSTOM":
        return
    custom = AttentionBackendEnum.CUSTOM
    if not (custom.is_overridden() and custom.get_path().startswith(selection.BACKEND_PACKAGE)):
        raise selection.TriangleMixUnsupportedError(
            f"TriangleMix: --attention-backend {selection.BACKEND_NAME} needs the CUSTOM "
            f"backend slot, which another plugin holds ({custom.get_path()})"
        )
    vllm_config.attention_config.backend = custom


def _wrap_cpu_backend_choice(platform_cls, path: str) -> None:
    if getattr(platform_cls, "_trianglemix_backend_choice", False):
        return
    original = platform_cls.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, *args, **kwargs):
        if selection.backend_is_ours(selected_backend):
            return path
        return original(cls, selected_backend, *args, **kwargs)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform_cls._trianglemix_backend_choice = True


def _wrap_cuda_backend_choice(platform_cls) -> None:
    """CUDA: TriangleMix wraps FlashAttention or FlashInfer (see stock_backend.py)."""
    if getattr(platform_cls, "_trianglemix_backend_choice", False):
        return
    original = platform_cls.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if not selection.backend_is_ours(selected_backend):
            return original(cls, selected_backend, attn_selector_config, num_heads=num_heads)
        return _cuda_triangle_backend(cls, original, attn_selector_config, num_heads)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform_cls._trianglemix_backend_choice = True


def _cuda_triangle_backend(platform_cls, original, attn_selector_config, num_heads) -> str:
    from vllm.config import get_current_vllm_config
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    requested = choice = stock_backend.requested(get_current_vllm_config().additional_config)
    if choice == stock_backend.AUTO:
        # What vLLM itself would run for this GPU and config without --attention-backend.
        stock_path = original(platform_cls, None, attn_selector_config, num_heads=num_heads)
        stock_paths = {name: AttentionBackendEnum[name].get_path() for name in stock_backend.CUDA_BACKENDS}
        path = stock_backend.wrapper_for_stock_path(stock_path, stock_paths)
        choice = next(n for n, p in stock_backend.CUDA_BACKENDS.items() if p == path)
    else:
        path = stock_backend.CUDA_BACKENDS[choice]
    # Validate the TriangleMix class (the stock checks plus its own) as vLLM
    # validates a selected backend.
    reasons = resolve_obj_by_qualname(path).validate_configuration(
        device_capability=platform_cls.get_device_capability(),
        **attn_selector_config._asdict(),
    )
    if reasons:
        raise stock_backend.StockBackendError(
            f"TriangleMix on stock {choice} is not valid for this configuration: {reasons}"
        )
    logger.info("TriangleMix: stock backend %s (%s=%s)", choice, stock_backend.STOCK_BACKEND_KEY,
                requested)
    return path
