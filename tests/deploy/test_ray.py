"""deploy/ray/README.md says the Ray recipe cannot run on vLLM's CPU build; keep that true.

If this fails, the installed vLLM gives its CPU platform a Ray device key: run the Ray recipe on
CPU (two CPU nodes or one) and update the README's "What was run".
"""
import pytest


def test_cpu_platform_has_no_ray_device_key():
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("checks vLLM's CPU build")
    assert current_platform.ray_device_key == ""
