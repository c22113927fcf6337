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
"""

from __future__ import annotations

import functools
import inspect
import sys

import numpy as np

from vllm_trianglemix import compat

_current: np.ndarray | None = None


def current() -> np.ndarray | None:
    """Prompt lengths of the batch being built, in batch order, or None."""
    return _current


def publish(lengths: np.ndarray | None) -> None:
    global _current
    _current = lengths


def install() -> list[str]:
    """Wrap the loaded model runners; idempotent. Returns what was wrapped."""
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
    runner_cls._trianglemix_wrapped = True
