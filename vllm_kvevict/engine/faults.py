"""Test-only fault injection in the page work: ``VLLM_KVEVICT_FAULT=POINT[:AFTER]``.

``POINT`` is ``backup`` (host backup / digest of newly filled pages: arkvale, quest), ``scoring``
(page selection: arkvale, quest; attention statistics: h2o, tova, roco, snapkv) or ``recall``
(selection that copies pages back from the host store: arkvale). The fault raises
:class:`InjectedFault` at the point's call number ``AFTER + 1`` in the worker (calls count per
layer; default 0: the first call).

The variable is read once, when a worker creates its page runtime; if set, that runtime's method
is replaced by a raising wrapper on the instance. Unset (the normal case) nothing is wrapped, so
the per-layer path costs nothing more.

What the engine does then is vLLM's: an exception inside a model step kills the engine core
(vLLM 0.32 has no way to fail single requests from inside a step), the API server answers the
requests in flight with an error, ``/health`` with 503, and the server exits.
"""
from __future__ import annotations

import functools
import os

FAULT_ENV = "VLLM_KVEVICT_FAULT"
FAULT_POINTS = ("backup", "scoring", "recall")


class InjectedFault(RuntimeError):
    """Raised by an injected fault (never on the normal path)."""


def parse_fault(value: str | None) -> tuple[str, int] | None:
    """``"recall:3"`` -> ``("recall", 3)``; None or empty -> None."""
    if not value:
        return None
    point, _, after = value.partition(":")
    if point not in FAULT_POINTS or (after and not after.isdigit()):
        raise ValueError(f"{FAULT_ENV} must be one of {', '.join(FAULT_POINTS)}, optionally "
                         f"followed by :N (calls to let through), got {value!r}")
    return point, int(after or 0)


def install_fault(runtime) -> None:
    """Wrap the method of ``runtime`` at the configured point (no-op when the variable is
    unset, or when the runtime's policy never reaches that point)."""
    fault = parse_fault(os.environ.get(FAULT_ENV))
    if fault is None:
        return
    point, after = fault
    from vllm_kvevict.attention_pages import AttentionStatsRuntime

    if isinstance(runtime, AttentionStatsRuntime):
        if point == "scoring":
            _wrap(runtime, "_observe", point, after, lambda *args, **kwargs: True)
        return
    if point == "backup":
        _wrap(runtime, "before_attention", point, after,
              lambda layer, query, kv_cache, plan: plan.backup_blocks.numel() > 0)
    elif point == "scoring":
        _wrap(runtime, "_select", point, after, lambda *args, **kwargs: True)
    elif runtime.recalls:  # recall: selection over host copies
        _wrap(runtime, "_select", point, after,
              lambda layer, query, kv_cache, batch, from_host: from_host)


def _wrap(runtime, name: str, point: str, after: int, applies) -> None:
    method = getattr(runtime, name)
    calls = 0

    @functools.wraps(method)
    def faulty(*args, **kwargs):
        nonlocal calls
        if applies(*args, **kwargs):
            calls += 1
            if calls > after:
                raise InjectedFault(f"vllm-kvevict: injected {point} fault ({FAULT_ENV})")
        return method(*args, **kwargs)

    setattr(runtime, name, faulty)
