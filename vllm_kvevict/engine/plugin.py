"""The ``vllm.general_plugins`` entry point.

vLLM loads general plugins in every process it starts (API server, engine core, workers), before
the config is known there, so ``register`` installs everything unconditionally and each piece
reads the policy from the config when it is used: the CLI/config hooks, the KV-cache spec and its
manager, the attention backend over the platform's default, and the metrics route to
``/metrics`` (:mod:`vllm_kvevict.engine.metrics`). Under policy ``none`` the backend
keeps the stock spec and the stock metadata builder, so vLLM computes exactly what it computes
without the plugin.
"""
from __future__ import annotations


def register() -> None:
    from vllm_kvevict.engine import (backend, cli, diagnostics, kv_spec, metrics, metrics_export,
                                     vllm_fixes)

    vllm_fixes.install()
    diagnostics.install()
    cli.install()
    metrics.install()
    metrics_export.install()
    kv_spec.register_spec()
    backend.register_backend()
