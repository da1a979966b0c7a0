"""A real `vllm serve` on 127.0.0.1 for a test, and its /metrics."""
import contextlib
from pathlib import Path

STARTUP_TIMEOUT_S = 300


@contextlib.contextmanager
def running_server(model: str, args: list[str], log_path: Path, env: dict | None = None):
    """Yields the base URL once /health answers (the bench's ``start_server``: served as "m"
    unless ``args`` names the model otherwise); fails the test with the log's tail if the server
    exits or does not start. Terminated on exit."""
    import pytest

    from vllm_kvevict.bench.common import start_server, stop_server

    try:
        process, base = start_server(model, args, log_path, env, timeout_s=STARTUP_TIMEOUT_S)
    except RuntimeError as error:
        pytest.fail(str(error))
    try:
        yield base
    finally:
        stop_server(process)


def scrape(base: str) -> dict:
    """``/metrics`` parsed: family name -> list of samples (prometheus_client's parser)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base}/metrics", timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}
