"""The plugin's per-request state in a running engine, for soak tests and leak checks.

``vllm serve`` started with ``VLLM_SERVER_DEV_MODE=1`` has vLLM's own dev endpoint
``POST /collective_rpc``, which calls a named method on every worker. :func:`install` gives vLLM's
workers a ``kvevict_state`` method, so ``{"method": "kvevict_state"}`` answers one dict per rank
with what the plugin still holds there (:func:`worker_state`: the page runtime's requests and
host-store pages). The engine core, which relays the call, adds its scheduler's side to every
rank's dict (:func:`scheduler_state`: blocks held, host reservations). The plugin adds no route;
without that variable nothing of this is reachable from outside.
"""
from __future__ import annotations


def worker_state() -> dict:
    """What this worker's page runtime holds now (zeros and an empty list when idle)."""
    from vllm_kvevict.engine.page_runtime import current_runtime

    runtime = current_runtime()
    if runtime is None:  # policy none or streamingllm: no worker-side state at all
        return {"requests": 0, "request_ids": [], "host_used_pages": 0, "host_used_bytes": 0}
    store = runtime.store
    return {"requests": len(runtime.requests), "request_ids": sorted(runtime.requests)[:20],
            "host_used_pages": store.used_pages,
            "host_used_bytes": store.used_bytes if store.bound else 0}


def scheduler_state(scheduler) -> dict:
    """Per-request state of ``scheduler``'s KV-cache managers (every policy, ``none``
    included): requests holding blocks, blocks not free, and the plugin's host reservations."""
    from vllm_kvevict.engine.kv_manager import EvictingAttentionManager

    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    evicting = [m for m in managers if isinstance(m, EvictingAttentionManager)]
    pool = scheduler.kv_cache_manager.block_pool
    return {"requests": len(scheduler.requests),
            "requests_with_blocks": sum(len(m.req_to_blocks) for m in managers),
            "blocks_in_use": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(),
            "host_reserved_pages": sum(m.host_reserved_total for m in evicting),
            "host_reserved_requests": sum(len(m.host_reserved) for m in evicting),
            "host_pages": sum(m.host_pages for m in evicting),
            "host_reserved_peak": sum(m.host_reserved_peak for m in evicting),
            "host_full_refusals": sum(m.host_full_refusals for m in evicting)}


def _kvevict_state(worker) -> dict:
    return worker_state()


def _collective_rpc(original, core, method, *args, **kwargs):
    results = original(core, method, *args, **kwargs)
    if method == "kvevict_state":
        scheduler = scheduler_state(core.scheduler)
        results = [dict(result, scheduler=scheduler) for result in results]
    return results


def install() -> None:
    """Give vLLM's workers ``kvevict_state`` and let the engine core add its side (idempotent)."""
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.worker_base import WorkerBase

    from vllm_kvevict.engine.patching import wrap_method

    if not hasattr(WorkerBase, "kvevict_state"):
        WorkerBase.kvevict_state = _kvevict_state
    wrap_method(EngineCore, "collective_rpc", _collective_rpc)
