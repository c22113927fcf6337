"""Backend names: TRIANGLEMIX parses on every supported vLLM (0.26 lacks Enum.register)."""

import pytest

pytest.importorskip("vllm")


def test_backend_name_registered_and_custom_points_here():
    import vllm_trianglemix
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm_trianglemix.register()
    assert AttentionBackendEnum["TRIANGLEMIX"].value.startswith("vllm_trianglemix.backends.")
    assert AttentionBackendEnum.CUSTOM.get_path() == AttentionBackendEnum["TRIANGLEMIX"].value
    vllm_trianglemix.register()  # idempotent in one process


def test_name_registration_without_enum_register(monkeypatch):
    """vLLM 0.26 has no AttentionBackendEnum.register: the member is added directly."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_trianglemix import compat

    monkeypatch.delattr(AttentionBackendEnum, "register", raising=False)
    name, path = "TMX_COMPAT_PROBE", "vllm_trianglemix.backends.cpu.TriangleMixCPUBackend.probe"
    compat.register_backend_name(name, path)
    try:
        assert AttentionBackendEnum[name].value == path
        assert AttentionBackendEnum(path) is AttentionBackendEnum[name]
    finally:
        AttentionBackendEnum._member_map_.pop(name)
        AttentionBackendEnum._value2member_map_.pop(path)
        AttentionBackendEnum._member_names_.remove(name)
        delattr(AttentionBackendEnum, name)
