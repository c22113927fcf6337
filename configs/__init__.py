"""Bundled TriangleMix layer maps (installed as ``vllm_trianglemix.configs``)."""
