"""Ask every worker of a running engine what attention it runs (CPU and GPU tests).

Per rank: its process id, TP/PP rank, whether vLLM's plugin loader ran there
and which ``vllm.general_plugins`` entry points it saw, what the ``CUSTOM``
backend is registered to, the Ray actor it runs in (if any), and each
attention layer's impl class and head counts.

``attention_probe()`` returns a function for ``LLM.collective_rpc``: vLLM
sends it to each worker (mp or Ray) and returns one answer per rank. It is
made inside a function so that cloudpickle sends it by value, and a worker
that cannot import ``tests`` (a Ray worker) can still run it. The engine must
be started with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (callables cross the
front end / engine core boundary pickled).
"""

from __future__ import annotations


def attention_probe():
    def probe(worker) -> dict:
        import os
        import sys
        from importlib.metadata import entry_points

        import vllm.plugins
        from vllm.distributed import parallel_state
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        worker = getattr(worker, "worker", worker)  # Ray: the wrapper holds the worker
        context = worker.vllm_config.compilation_config.static_forward_context
        layers = {}
        for name, layer in context.items():
            impl = getattr(layer, "impl", None)
            if impl is None or not hasattr(impl, "num_kv_heads"):
                continue
            layers[name] = dict(impl=f"{type(impl).__module__}.{type(impl).__qualname__}",
                                num_heads=int(impl.num_heads), num_kv_heads=int(impl.num_kv_heads))
        custom = AttentionBackendEnum.CUSTOM
        ray_actor = None
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray_actor = ray.get_runtime_context().get_actor_id()
        return dict(
            pid=os.getpid(),
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            pp_rank=parallel_state.get_pp_group().rank_in_group,
            custom_backend=custom.get_path() if custom.is_overridden() else None,
            general_plugins_loaded=vllm.plugins.plugins_loaded,  # by vLLM's entry-point loader
            general_plugins={ep.name: ep.value
                             for ep in entry_points(group="vllm.general_plugins")},
            ray_actor_id=ray_actor,
            layers=layers,
        )

    return probe
