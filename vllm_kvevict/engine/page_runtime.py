"""Worker-side glue between vLLM's model runner and :class:`vllm_kvevict.pages.PageRuntime`.

The attention metadata builder sees a batch as tensors with no request identity, so hooks on the
V1 model runner (the runner the plugin pins; see ``V2_RUNNER_ERROR``) supply it:

* ``_update_states`` (start of every ``execute_model``): forget requests that finished, were
  aborted or preempted (their host pages are freed at once), or resumed (they are recomputed);
  and mark that a real step is starting.
* the builder of that step reads the runner's persistent batch (request ids, prompt lengths),
  in row order, and plans the step. Dummy/profiling runs never start a step, so they plan nothing.
* ``initialize_kv_cache``: right after the KV cache is allocated, each builder's runtime is bound
  to it (host store and digests allocated, :func:`bind_page_runtimes`), before any step runs.

And one on the GPU worker: ``determine_available_memory`` leaves room for the device-side page
digests, so the KV cache is sized with them accounted for (:func:`digest_bytes`).

One runtime per worker process (one KV-cache group: models with other attention types are
refused at start-up).
"""
from __future__ import annotations

import itertools
import os
import time

from vllm.logger import init_logger

from vllm_kvevict.algorithms.digest import digest_dtype
from vllm_kvevict.attention_pages import AttentionStatsRuntime
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.engine.faults import install_fault
from vllm_kvevict.engine.metrics import StepMetrics
from vllm_kvevict.engine.patching import wrap_method
from vllm_kvevict.pages import BlockFormat, HostPageStore, PageRuntime, RowInput
from vllm_kvevict.paging import cdiv

logger = init_logger("vllm.kvevict")

# The workers' INFO line of page statistics: every N seconds while something changes; 0: off.
STATS_LOG_INTERVAL_ENV = "VLLM_KVEVICT_LOG_STATS_INTERVAL"
DEFAULT_STATS_LOG_INTERVAL_S = 10.0

_runtime: PageRuntime | None = None
_active_runner = None  # the model runner whose step is being planned
_step_pending = False
_last_log = 0.0
_last_logged_stats: tuple | None = None
_log_interval: float | None = None

V2_RUNNER_ERROR = ("--kv-eviction-policy {policy} needs vLLM's V1 model runner (its worker hooks "
                   "are not ported to Model Runner V2); unset VLLM_USE_V2_MODEL_RUNNER or set it "
                   "to 0")


def current_runtime() -> PageRuntime | None:
    """The runtime created last in this process (one per worker; tests and stats)."""
    return _runtime


def create_runtime(config: EvictionConfig, spec, layer_names: list[str]) -> PageRuntime:
    """A new runtime for this worker's engine (replacing one of an engine shut down before).

    Its block format is set when it is bound to the KV cache (:func:`bind_page_runtimes`)."""
    runtime = _new_runtime(config, spec, layer_names)
    runtime.step_metrics = StepMetrics()
    return runtime


def _new_runtime(config: EvictionConfig, spec, layer_names: list[str]) -> PageRuntime:
    global _runtime
    from vllm_kvevict.policies import AttentionStatsPolicy, get_policy

    policy = get_policy(config.policy)
    block_format = BlockFormat()
    if isinstance(policy, AttentionStatsPolicy):
        _runtime = AttentionStatsRuntime(spec.layout, policy, block_format, len(layer_names),
                                         config.observation_window)
        _runtime.layer_index = {name: i for i, name in enumerate(layer_names)}
        logger.info("vllm-kvevict: %s keeps %d pages per layer (%d sink, %d window, %d by "
                    "attention statistics; observation window %d prompt queries)",
                    config.policy, spec.budget_pages, spec.sink_pages, spec.window_pages,
                    spec.top_k_pages, config.observation_window)
        install_fault(_runtime)
        return _runtime
    store = HostPageStore(spec.host_pages, len(layer_names))
    _runtime = PageRuntime(spec.layout, policy, policy.digest or config.digest,
                           config.sparse_attention, store, block_format, len(layer_names),
                           observation_window=config.observation_window,
                           per_head=config.selects_per_head)
    _runtime.layer_index = {name: i for i, name in enumerate(layer_names)}
    logger.info("vllm-kvevict: %s keeps up to %d pages per step and layer (%d sink, %d window, "
                "%d anchored by the last %d prompt queries, top-%d%s), attends over %s; host store "
                "holds %d pages", config.policy,
                spec.sink_pages + spec.window_pages + _runtime.anchor_pages + spec.top_k_pages,
                spec.sink_pages, spec.window_pages, _runtime.anchor_pages,
                config.observation_window, spec.top_k_pages,
                "; chosen per KV head" if _runtime.per_head else "",
                "them only" if _runtime.sparse_attention else "all resident pages", spec.host_pages)
    install_fault(_runtime)
    return _runtime


def install_runner_hooks() -> None:
    """Wrap the V1 runner's ``_update_states`` and ``initialize_kv_cache`` and the GPU worker's
    ``determine_available_memory`` (idempotent; the CPU runner inherits the runner's)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    wrap_method(GPUModelRunner, "_update_states", _update_states)
    wrap_method(GPUModelRunner, "initialize_kv_cache", _initialize_kv_cache)
    wrap_method(Worker, "determine_available_memory", determine_available_memory)


def _update_states(original, runner, scheduler_output):
    global _active_runner, _step_pending
    runtime = getattr(runner, "_kvevict_runtime", None)
    if runtime is not None:
        gone = set(scheduler_output.finished_req_ids)
        gone |= set(scheduler_output.preempted_req_ids or ())
        gone |= set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        for req_id in gone:
            runtime.release(req_id)
    result = original(runner, scheduler_output)
    _active_runner, _step_pending = runner, True
    return result


def _initialize_kv_cache(original, runner, kv_cache_config, *args, **kwargs):
    result = original(runner, kv_cache_config, *args, **kwargs)
    is_profiling = kwargs.get("is_profiling", args[0] if args else False)
    if not is_profiling:
        bind_page_runtimes(runner.attn_groups,
                           runner.compilation_config.static_forward_context)
    return result


def bind_page_runtimes(attn_groups, forward_context: dict) -> None:
    """Bind the page runtime of every evicting builder to its layers' freshly allocated KV cache:
    the builder names the block format, the first layer gives shapes and dtype."""
    from vllm_kvevict.engine.kv_spec import EvictingAttentionSpec

    for group in itertools.chain.from_iterable(attn_groups):
        if not isinstance(group.kv_cache_spec, EvictingAttentionSpec):
            continue
        layer = forward_context[group.layer_names[0]]
        kv_cache = layer.kv_cache
        for builder in group.metadata_builders:
            runtime = builder._page_runtime()
            if runtime is None or runtime.bound:
                continue
            runtime.format = builder.block_format(layer, kv_cache)
            impl = layer.impl
            runtime.bind(kv_cache, impl.num_kv_heads, impl.head_size, impl.scale)


def digest_bytes(spec, policy, num_layers: int, available_bytes: int) -> int:
    """Device bytes the page digests of one worker take out of ``available_bytes``.

    A digest is ``[2, kv_heads, head_dim]`` per page and layer, in the KV cache's 16-bit float
    type (float32 for other caches): one per host page under a recalling policy (arkvale), one
    per KV-cache block otherwise (quest), so then it shares the memory with the blocks in
    proportion.
    """
    from vllm_kvevict.policies import PageSelectionPolicy

    if not isinstance(policy, PageSelectionPolicy):
        return 0  # no digests (attention statistics are kept per request, on the device)
    per_page = (2 * spec.num_kv_heads * spec.head_size * digest_dtype(spec.dtype).itemsize
                * num_layers)
    if policy.recalls:
        return spec.host_pages * per_page
    block = spec.page_size_bytes * num_layers
    return available_bytes * per_page // (block + per_page)


def determine_available_memory(original, worker) -> int:
    """The GPU worker's KV-cache memory, less the page digests when vLLM sized it from free
    memory (an explicit ``--kv-cache-memory-bytes`` is kept as given)."""
    from vllm_kvevict.engine.kv_spec import EvictingAttentionSpec
    from vllm_kvevict.policies import get_policy

    available = original(worker)
    specs = [spec for spec in worker.model_runner.get_kv_cache_spec().values()
             if isinstance(spec, EvictingAttentionSpec)]
    if not specs or worker.cache_config.kv_cache_memory_bytes is not None:
        return available
    policy = get_policy(EvictionConfig.from_vllm_config(worker.vllm_config).policy)
    reserved = digest_bytes(specs[0], policy, len(specs), available)
    logger.info("vllm-kvevict: %.2f GiB of device memory for page digests, not for the KV cache",
                reserved / 2**30)
    return available - reserved


def take_step_rows(cm, runtime: PageRuntime) -> list[RowInput] | None:
    """The rows of the step being built, or None outside a real step (dummy/profiling runs).

    Also ties ``runtime`` to the runner, whose ``_update_states`` then releases its requests.
    """
    global _step_pending
    if not _step_pending or _active_runner is None:
        return None
    _step_pending = False
    batch = _active_runner.input_batch
    num_reqs = cm.num_reqs
    req_ids = batch.req_ids[:num_reqs]
    if len(req_ids) != num_reqs:
        return None
    _active_runner._kvevict_runtime = runtime
    query_start = cm.query_start_loc_cpu[:num_reqs + 1].tolist()
    seq_lens = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                else cm.seq_lens.cpu())[:num_reqs].tolist()
    # The runner's host copy of the block table (the device one would cost a sync).
    num_pages = cdiv(max(seq_lens, default=0), runtime.layout.block_size)
    table = batch.block_table.block_tables[0].get_cpu_tensor()[:num_reqs, :num_pages].tolist()
    rows = []
    for i, req_id in enumerate(req_ids):
        num_new = query_start[i + 1] - query_start[i]
        rows.append(RowInput(req_id=req_id, first_token=query_start[i],
                             num_computed=seq_lens[i] - num_new, num_new=num_new,
                             num_prompt=int(batch.num_prompt_tokens[i]), block_row=table[i]))
    return rows


def stats_log_interval() -> float:
    """Seconds between the workers' page-statistics lines (``VLLM_KVEVICT_LOG_STATS_INTERVAL``;
    0 turns them off; read once per process)."""
    global _log_interval
    if _log_interval is None:
        raw = os.environ.get(STATS_LOG_INTERVAL_ENV, "")
        try:
            _log_interval = float(raw) if raw else DEFAULT_STATS_LOG_INTERVAL_S
        except ValueError:
            logger.warning("vllm-kvevict: %s=%r is not a number of seconds; using %g",
                           STATS_LOG_INTERVAL_ENV, raw, DEFAULT_STATS_LOG_INTERVAL_S)
            _log_interval = DEFAULT_STATS_LOG_INTERVAL_S
    return _log_interval


def maybe_log_stats(runtime: PageRuntime) -> None:
    """One INFO line every :func:`stats_log_interval` seconds while something changes."""
    global _last_log, _last_logged_stats
    now = time.monotonic()
    interval = stats_log_interval()
    if interval <= 0 or now - _last_log < interval:
        return
    stats = runtime.stats  # folds the layers' device-side counts: read only when due
    current = (stats.backed_up, stats.evicted, stats.recalled, runtime.store.used_pages)
    if current == _last_logged_stats:
        return
    _last_log, _last_logged_stats = now, current
    store = runtime.store
    if not runtime.recalls:
        logger.info("vllm-kvevict: %d requests; page copies evicted %d", len(runtime.requests),
                    stats.evicted)
        return
    logger.info("vllm-kvevict: host store %d/%d pages (%.1f MiB) for %d requests; pages backed "
                "up %d, page copies evicted %d, recalled %d", store.used_pages, store.num_pages,
                store.used_bytes / 2**20, len(runtime.requests), stats.backed_up, stats.evicted,
                stats.recalled)


def host_pages_for(config: EvictionConfig, page_size_bytes: int, num_layers: int) -> int:
    """Host pages (all layers of one rank) that ``--kv-host-space`` holds."""
    return config.host_space_bytes // (page_size_bytes * num_layers)
