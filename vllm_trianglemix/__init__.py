"""TriangleMix attention for vLLM: faster long-context prefill, same decode.

Installed, the package registers the ``TRIANGLEMIX`` (vLLM >= 0.32) and
``CUSTOM`` attention backends through vLLM's ``vllm.general_plugins`` entry
point; ``--attention-backend TRIANGLEMIX`` (or ``CUSTOM``) selects it. Nothing
heavy happens at import time.
"""

__version__ = "0.1.0"


def register() -> None:
    """The ``vllm.general_plugins`` entry point (runs in every vLLM process)."""
    from vllm_trianglemix.registration import register_plugin

    register_plugin()
