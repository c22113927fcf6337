"""How each request's prompt length reaches the metadata builder.

The dense rows of a triangle layer are the last ``n_last`` rows of the
*prompt*, so the builder needs every request's prompt length ``L``. vLLM's
attention metadata does not carry it; the model runner does, per request:

* V1 runner (``gpu_model_runner.GPUModelRunner``, also the CPU runner):
  ``input_batch.num_prompt_tokens``, already in batch order;
* V2 runner (``gpu.model_runner.GPUModelRunner``, vLLM's default on GPU for
  Llama-like models): ``req_states.prompt_len`` through
  ``input_batch.idx_mapping_np``.

Both hold the length of the request's original prompt, set when the request
arrives and kept when it is preempted and resumed (V2 keeps ``prefill_len``,
prompt plus tokens generated before the preemption, apart from
``prompt_len``). ``L`` is therefore the same for every chunk of a request, in
every batch, before and after preemption, and the rule (defined on absolute
positions of the whole prompt) gives the same mask whatever the chunking.

A thin wrapper around the runner method that builds attention metadata
publishes the lengths, in batch order, for real steps, and withdraws them for
dummy, profiling and graph-capture steps, which then run stock. The wrappers
are installed when the TriangleMix builder is first created, so a vLLM that
does not select TriangleMix is never touched.

These lengths are the plugin's only per-request state in the worker (the
prefix-cache rule keeps none: a block's tag is a function of the prompt
length, computed when vLLM hashes the block). They live for one model step:
the runner's ``execute_model`` is wrapped too, and withdraws them when the step
ends, however it ends, so nothing of a finished, aborted or preempted request
outlives the step it was in. Their number is the gauge
``trianglemix_tracked_requests`` (0 between steps), and the largest number
held in one step since the process started is the gauge
``trianglemix_tracked_requests_max`` (it only grows, so a reader that comes
late still sees that state was held). Both are on the server's ``/metrics``
when vLLM gathers every process's metrics, i.e. with
``PROMETHEUS_MULTIPROC_DIR`` set at start; a debug line reports the number
when requests finish, are aborted or are preempted.
"""

from __future__ import annotations

import functools
import inspect
import sys

import numpy as np
from vllm.logger import init_logger

from vllm_trianglemix import compat

logger = init_logger("vllm.trianglemix")

_current: np.ndarray | None = None
_gauge = None
_max_gauge = None
_max_tracked = 0

TRACKED_REQUESTS_METRIC = "trianglemix_tracked_requests"
TRACKED_REQUESTS_MAX_METRIC = "trianglemix_tracked_requests_max"


def current() -> np.ndarray | None:
    """Prompt lengths of the batch being built, in batch order, or None."""
    return _current


def publish(lengths: np.ndarray | None) -> None:
    global _current, _max_tracked
    _current = lengths
    n = tracked_requests()
    if _gauge is not None:
        _gauge.set(n)
    if n > _max_tracked:
        _max_tracked = n
        if _max_gauge is not None:
            _max_gauge.set(n)


def tracked_requests() -> int:
    """How many requests' state the plugin holds in this process now."""
    return 0 if _current is None else int(_current.shape[0])


def max_tracked_requests() -> int:
    """The most requests' state the plugin held in one step in this process since it started."""
    return _max_tracked


def _make_gauges() -> None:
    """Created once per process, the way vLLM creates its own gauges."""
    global _gauge, _max_gauge
    if _gauge is not None:
        return
    _gauge = _gauge_named(
        TRACKED_REQUESTS_METRIC,
        "Requests whose per-request state (prompt length) the TriangleMix "
        "backend holds in a worker; 0 between model steps.",
        "mostrecent",
    )
    _max_gauge = _gauge_named(
        TRACKED_REQUESTS_MAX_METRIC,
        "The most requests whose per-request state the TriangleMix backend held "
        "in one model step since the engine started.",
        "max",
    )
    _max_gauge.set(_max_tracked)


def _gauge_named(name: str, documentation: str, multiprocess_mode: str):
    import prometheus_client

    try:
        return prometheus_client.Gauge(name, documentation, multiprocess_mode=multiprocess_mode)
    except ValueError:  # registered already (module reloaded)
        return prometheus_client.REGISTRY._names_to_collectors.get(name)


def _wrap_step(runner_cls) -> None:
    """Withdraw the lengths when the runner's step ends, however it ends."""
    execute_model = runner_cls.execute_model

    @functools.wraps(execute_model)
    def wrapped_execute_model(self, *args, **kwargs):
        try:
            return execute_model(self, *args, **kwargs)
        finally:
            publish(None)
            scheduler_output = args[0] if args else kwargs.get("scheduler_output")
            finished = getattr(scheduler_output, "finished_req_ids", None) or ()
            preempted = getattr(scheduler_output, "preempted_req_ids", None) or ()
            if finished or preempted:
                logger.debug(
                    "TriangleMix: %d requests finished or aborted, %d preempted; "
                    "per-request state held: %d requests",
                    len(finished), len(preempted), tracked_requests(),
                )

    runner_cls.execute_model = wrapped_execute_model


def install() -> list[str]:
    """Wrap the loaded model runners; idempotent. Returns what was wrapped."""
    _make_gauges()
    wrapped: list[str] = []
    v1 = sys.modules.get(compat.V1_RUNNER_MODULE)
    if v1 is not None and not getattr(v1.GPUModelRunner, "_trianglemix_wrapped", False):
        _wrap_v1(v1.GPUModelRunner)
        wrapped.append("V1")
    v2 = sys.modules.get(compat.V2_RUNNER_MODULE)
    if v2 is not None and not getattr(v2.GPUModelRunner, "_trianglemix_wrapped", False):
        _wrap_v2(v2.GPUModelRunner)
        wrapped.append("V2")
    return wrapped


def _wrap_v1(runner_cls) -> None:
    build = runner_cls._build_attention_metadata
    dummy_run = runner_cls._dummy_run
    signature = inspect.signature(build)

    @functools.wraps(build)
    def build_attention_metadata(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        real_step = not getattr(self, "_trianglemix_in_dummy_run", False) and not (
            bound.arguments.get("for_cudagraph_capture", False)
        )
        num_reqs = bound.arguments["num_reqs"]
        publish(compat.v1_prompt_lens(self, num_reqs) if real_step else None)
        return build(self, *args, **kwargs)

    @functools.wraps(dummy_run)
    def _dummy_run(self, *args, **kwargs):
        self._trianglemix_in_dummy_run = True
        try:
            return dummy_run(self, *args, **kwargs)
        finally:
            self._trianglemix_in_dummy_run = False

    runner_cls._build_attention_metadata = build_attention_metadata
    runner_cls._dummy_run = _dummy_run
    _wrap_step(runner_cls)
    runner_cls._trianglemix_wrapped = True


def _wrap_v2(runner_cls) -> None:
    prepare_attn = runner_cls.prepare_attn
    prepare_dummy_attn = runner_cls.prepare_dummy_attn

    @functools.wraps(prepare_attn)
    def wrapped_prepare_attn(self, input_batch, *args, **kwargs):
        publish(compat.v2_prompt_lens(self, input_batch))
        return prepare_attn(self, input_batch, *args, **kwargs)

    @functools.wraps(prepare_dummy_attn)
    def wrapped_prepare_dummy_attn(self, *args, **kwargs):
        publish(None)
        return prepare_dummy_attn(self, *args, **kwargs)

    runner_cls.prepare_attn = wrapped_prepare_attn
    runner_cls.prepare_dummy_attn = wrapped_prepare_dummy_attn
    _wrap_step(runner_cls)
    runner_cls._trianglemix_wrapped = True
