"""Start a real `vllm serve` on 127.0.0.1 for a test module, and read its /metrics."""
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_executable() -> str:
    return str(Path(sys.executable).with_name("vllm"))


@contextlib.contextmanager
def running_server(model: str, args: list[str], log_path: Path, env: dict | None = None):
    """Yields the base URL once /health answers; fails the test with the log's tail if the
    server exits or does not start. Terminated on exit."""
    import pytest
    import requests

    port = free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", **(env or {}))
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [vllm_executable(), "serve", model, "--host", "127.0.0.1", "--port", str(port),
             *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n"
                            f"{log_path.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def scrape(base: str) -> dict:
    """``/metrics`` parsed: family name -> list of samples (prometheus_client's parser)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base}/metrics", timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}
