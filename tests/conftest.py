"""Shared test settings: CPU-friendly vLLM environment and the bundled model."""
import os

# Must be set before vLLM is imported anywhere in the test process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.fake_engine import CACHES  # noqa: E402


@pytest.fixture(params=list(CACHES))
def cache(request):
    """Each KV-cache layout the page runtimes are tested on (a :data:`CACHES` entry)."""
    return CACHES[request.param]


@pytest.fixture(scope="session")
def model_path() -> str:
    from vllm_kvevict.model import prepare_bundled_model

    return str(prepare_bundled_model())


_REPORTS: list[str] = []


def report(line: str) -> None:
    """A measured result worth seeing in the test log (printed in the terminal summary)."""
    _REPORTS.append(line)


def pytest_terminal_summary(terminalreporter):
    if _REPORTS:
        terminalreporter.section("vllm-kvevict measurements")
        for line in _REPORTS:
            terminalreporter.write_line(line)
