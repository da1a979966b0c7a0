"""Shared test settings: CPU-friendly vLLM environment and the bundled model."""
import os

# Must be set before vLLM is imported anywhere in the test process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def model_path() -> str:
    from vllm_kvevict.model import prepare_bundled_model

    return str(prepare_bundled_model())
