"""Shared benchmark plumbing: engines, machine description, result files."""
from __future__ import annotations

import gc
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Sequence

BLOCK_SIZE = 32


class SettingError(ValueError):
    """A benchmark's settings cannot be run (``bench`` reports it in one line, before any run)."""


def environment(model_path: str) -> dict[str, Any]:
    """Machine, software and model, stated in every result file."""
    import torch
    import vllm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(), "torch": torch.__version__,
        "vllm": vllm.__version__, "model": Path(model_path).name,
        "kv_cache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
    }


def bundled_model() -> str:
    from vllm_kvevict.model import prepare_bundled_model

    return str(prepare_bundled_model())


def offline_llm(model_path: str, policy: str, budget: int | None = None, **kwargs):
    """An in-process engine (the benchmarks read the scheduler and the page runtime)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    import vllm_kvevict

    vllm_kvevict.register()
    settings = {"kv_eviction_policy": policy}
    if policy != "none":
        settings["kv_budget"] = budget
    kwargs.setdefault("max_model_len", 8192)
    kwargs.setdefault("block_size", BLOCK_SIZE)
    return LLM(model_path, enforce_eager=True, seed=0, **settings, **kwargs)


def close_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def label(policy: str, budget: int | None) -> str:
    return policy if policy == "none" else f"{policy}@{budget}"


def write_results(out_dir: str | Path, name: str, payload: dict[str, Any], table: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    env = payload.get("environment", {})
    header = (f"# {name}\n\n{env.get('model')} on {env.get('machine')} ({env.get('device')}), "
              f"vLLM {env.get('vllm')}, torch {env.get('torch')}, {env.get('date')}.\n\n"
              f"Settings: `{json.dumps(payload.get('settings', {}))}`\n\n")
    (out / f"{name}.md").write_text(header + table + "\n")
    return out / f"{name}.md"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return float("nan")
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def bar_plot(names: list[str], values: list[float], ylabel: str, title: str, path: str,
             color: str = "tab:blue") -> None:
    """One bar per configuration, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, values, color=color)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def annotate_percent(ax, grid) -> None:
    """Write each non-NaN cell of a heat map's ``grid`` (fractions) as a percentage."""
    import numpy as np

    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center",
                    color="white" if value < 0.6 else "black")


def series_sums(metrics: str, names: Sequence[str]) -> dict[str, float]:
    """Each named sample of a Prometheus exposition (``/metrics`` text), summed over its label
    sets (workers, engines); 0 for a name the exposition lacks."""
    sums = {}
    for name in names:
        pattern = rf'^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([0-9.e+-]+)'
        sums[name] = sum(float(value) for value in re.findall(pattern, metrics, re.M))
    return sums


def server_series_sums(base: str, names: Sequence[str], timeout: float = 10
                       ) -> dict[str, float]:
    """:func:`series_sums` of the server at ``base`` now."""
    import requests

    return series_sums(requests.get(f"{base}/metrics", timeout=timeout).text, names)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_path: str, flags: list[str], log_path: str | Path,
                 env: dict[str, str] | None = None, timeout_s: float = 600):
    """``vllm serve model_path --host 127.0.0.1 --port P --served-model-name m *flags``, waited
    for until ``/health`` answers 200; returns ``(process, base_url)``."""
    import subprocess
    import sys

    import requests

    port = free_port()
    args = [str(Path(sys.executable).with_name("vllm")), "serve", model_path, "--host",
            "127.0.0.1", "--port", str(port), "--served-model-name", "m", *flags]
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(
            os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", **(env or {})))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"vllm serve did not start: {log_path.read_text()[-2000:]}")
        time.sleep(1)


def stop_server(process) -> int:
    """Terminate ``process`` (killed if it does not exit within a minute); its exit code."""
    import subprocess

    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
