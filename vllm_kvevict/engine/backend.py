"""Attention backends that attend over exactly a request's resident pages.

The backend wraps the platform's stock backend and changes one thing: before the stock metadata
builder runs, each row of the batch's block table is compacted to its resident pages and its
sequence length shrunk accordingly (:func:`compact_common_metadata`). Keys were written with RoPE
at their original positions, so the stock kernel then computes attention over exactly the
resident tokens. KV writes (slot mapping) are untouched: new tokens go to blocks the request owns.

When the layer's spec is not an :class:`EvictingAttentionSpec` (policy ``none``), the builder is
the stock one, byte for byte.

On CPU the override replaces the ``CPU_ATTN`` member (the CPU platform always picks it); on CUDA it
fills the ``CUSTOM`` member, selected with ``--attention-backend CUSTOM``, over FlashAttention.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.engine import page_runtime
from vllm_kvevict.engine.kv_spec import EvictingAttentionSpec
from vllm_kvevict.pages import BlockFormat, CPUBlockFormat
from vllm_kvevict.paging import PageLayout, cdiv
from vllm_kvevict.policies import AttentionStatsPolicy, get_policy


def compact_common_metadata(cm: CommonAttentionMetadata, layout: PageLayout,
                            sparse_seq_lens: dict[int, int] | None = None
                            ) -> CommonAttentionMetadata:
    """Return ``cm`` with block tables and sequence lengths restricted to resident pages.

    ``sparse_seq_lens`` (row -> tokens) overrides the length of rows that attend over selected
    pages only; the layer fills those rows' block tables (:meth:`PageRuntime.before_attention`).
    Rows past ``is_prefilling``'s (padding: Model Runner V2 pads lengths to a CUDA-graph batch
    size, not ``is_prefilling``) count as not prefilling; they are empty, so nothing is evicted.
    """
    if cm.is_prefilling is None:
        raise RuntimeError("vllm-kvevict needs CommonAttentionMetadata.is_prefilling (V1 runner)")
    device = cm.block_table_tensor.device
    query_lens = cm.query_start_loc[1:] - cm.query_start_loc[:-1]
    prefilling_cpu = cm.is_prefilling.cpu()
    prefilling = _fit_rows(prefilling_cpu, cm.seq_lens.shape[0]).to(device=device,
                                                                     non_blocking=True)
    table, seq_lens = layout.compact_block_table(cm.block_table_tensor, cm.seq_lens,
                                                 query_lens[:cm.seq_lens.shape[0]], prefilling)
    # Host-side lengths for the builders' scheduling work, shrunk the same way.
    upper = cm.seq_lens_cpu_upper_bound
    if upper is None:
        upper = cm.seq_lens.cpu()
    query_lens_cpu = (cm.query_start_loc_cpu[1:] - cm.query_start_loc_cpu[:-1])[:upper.shape[0]]
    evicted = layout.num_evicted_pages(upper - query_lens_cpu,
                                       _fit_rows(prefilling_cpu, upper.shape[0]))
    upper = (upper - evicted * layout.block_size).to(upper.dtype)
    if sparse_seq_lens:
        rows = list(sparse_seq_lens)
        lengths = torch.tensor(list(sparse_seq_lens.values()), dtype=upper.dtype)
        upper = upper.clone()
        upper[rows] = lengths
        seq_lens = seq_lens.clone()
        seq_lens[torch.tensor(rows, device=device)] = lengths.to(device=device,
                                                                  dtype=seq_lens.dtype)
    num_reqs = cm.num_reqs
    max_seq_len = int(upper[:num_reqs].max()) if num_reqs else cm.max_seq_len
    return dataclasses.replace(cm, block_table_tensor=table, seq_lens=seq_lens,
                               seq_lens_cpu_upper_bound=upper, max_seq_len=max_seq_len)


def _fit_rows(flags: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``flags`` cut or padded with False to ``num_rows`` rows."""
    if flags.shape[0] >= num_rows:
        return flags[:num_rows]
    return torch.cat([flags, flags.new_zeros(num_rows - flags.shape[0])])


_worker_config: EvictionConfig | None = None
_worker_max_model_len: int | None = None
_worker_num_layers: int | None = None


def remember_worker_config() -> None:
    """Record this process's eviction settings; called where vLLM's current config is set.

    NOTE: vLLM asks the backend for its KV-cache spec (``customize_spec``) outside any
    ``set_current_vllm_config`` context, but only after the model (and so every attention impl)
    was built inside one. Impls therefore record the settings, and ``customize_spec`` reads them.
    """
    from vllm.config import get_current_vllm_config

    global _worker_config, _worker_max_model_len, _worker_num_layers
    vllm_config = get_current_vllm_config()
    _worker_config = EvictionConfig.from_vllm_config(vllm_config)
    _worker_max_model_len = vllm_config.model_config.max_model_len
    _worker_num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
    if _worker_config.evicts and vllm_config.use_v2_model_runner:
        # engine.cli pins the V1 runner; this is the backstop (e.g. an engine built without it).
        raise RuntimeError(page_runtime.V2_RUNNER_ERROR.format(policy=_worker_config.policy))
    if _worker_config.evicts and get_policy(_worker_config.policy).selects:
        page_runtime.install_runner_hooks()


def customize_for_eviction(spec):
    """The layer spec under the configured policy: an :class:`EvictingAttentionSpec` or ``spec``."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if _worker_config is None:
        raise RuntimeError("vllm-kvevict: KV-cache spec requested before any attention layer "
                           "was built")
    config = _worker_config
    # MLA, sliding-window and hybrid models are refused at start-up (engine.cli).
    if (not config.evicts or type(spec) is not FullAttentionSpec
            or spec.sliding_window is not None or spec.attention_chunk_size is not None):
        return spec
    policy = get_policy(config.policy)
    layout = config.layout(spec.block_size)
    host_pages = 0
    if isinstance(policy, AttentionStatsPolicy):
        layout = dataclasses.replace(layout, top_k_pages=(
            layout.budget_pages - layout.sink_pages - layout.window_pages))
    elif policy.selects and policy.recalls:
        host_pages = page_runtime.host_pages_for(config, spec.page_size_bytes, _worker_num_layers)
    elif policy.selects:
        layout = resident_layout(layout, config, _worker_max_model_len)
    return EvictingAttentionSpec.from_full_attention(spec, layout, _worker_max_model_len,
                                                     host_pages)


def resident_layout(layout: PageLayout, config: EvictionConfig, max_model_len: int) -> PageLayout:
    """For policies that keep every page resident (quest): nothing is ever freed, and the budget
    is what attention reads per step (sinks + window + top-k, top-k filling the budget unless
    ``--kv-top-k-tokens`` is given)."""
    top_k = layout.top_k_pages if config.top_k_tokens is not None else (
        layout.budget_pages - layout.sink_pages - layout.window_pages)
    all_pages = max(cdiv(max_model_len, layout.block_size), layout.budget_pages)
    return dataclasses.replace(layout, budget_pages=all_pages, top_k_pages=top_k)


class EvictingBuilderMixin:
    """Compacts the batch to resident pages before the stock ``build``; under a selecting
    policy, first plans the step's page work and attaches it as ``metadata.kvevict_plan``.

    NOTE: page work runs in Python in every layer, and each step's compacted block table and
    lengths are new tensors, so an evicting builder supports no full CUDA graph (a replay would
    run none of it and read the captured buffers): vLLM then captures piecewise graphs, whose
    split points are the attention layers.
    """

    kv_cache_spec: object
    layer_names: list[str]
    vllm_config: object
    device: torch.device

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        from vllm.v1.attention.backend import AttentionCGSupport

        if isinstance(kv_cache_spec, EvictingAttentionSpec):
            return AttentionCGSupport.NEVER
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

    def block_format(self, layer, kv_cache: torch.Tensor) -> BlockFormat:
        """How ``kv_cache`` (one layer's view, as the backend's kernels read it) stores pages."""
        raise NotImplementedError

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False):
        spec = self.kv_cache_spec
        if not isinstance(spec, EvictingAttentionSpec):
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = None
        runtime = self._page_runtime()
        if runtime is not None:
            start = time.perf_counter()
            rows = page_runtime.take_step_rows(common_attn_metadata, runtime)
            if rows:
                selections = runtime.selections
                plan = runtime.plan_step(rows, self.device)
                runtime.step_metrics.begin_step(time.perf_counter() - start,
                                                runtime.selections - selections)
                page_runtime.maybe_log_stats(runtime)
        compact = compact_common_metadata(common_attn_metadata, spec.layout,
                                          plan.sparse_seq_lens if plan else None)
        metadata = super().build(common_prefix_len, compact, fast_build)
        if plan is not None and plan.has_layer_work:
            metadata.kvevict_plan = plan
            metadata.kvevict_runtime = runtime
        return metadata

    def _page_runtime(self):
        """This builder's page runtime under a selecting policy, else None (created once; bound
        to the KV cache by :func:`page_runtime.bind_page_runtimes` when the cache is allocated)."""
        if not hasattr(self, "_kvevict_runtime"):
            runtime = None
            config = EvictionConfig.from_vllm_config(self.vllm_config)
            if get_policy(config.policy).selects:
                runtime = page_runtime.create_runtime(config, self.kv_cache_spec,
                                                      list(self.layer_names))
            self._kvevict_runtime = runtime
        return self._kvevict_runtime


def forward_with_pages(forward, layer, query, key, value, kv_cache, attn_metadata, output, *args,
                       **kwargs):
    """``forward`` with the step's page work around it: backup, select and recall before the
    attention kernel, the prefill-end reshuffle after it."""
    plan = getattr(attn_metadata, "kvevict_plan", None)
    if plan is None:
        return forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
    runtime = attn_metadata.kvevict_runtime
    if not runtime.bound:
        raise RuntimeError("vllm-kvevict: page work planned before the KV cache was allocated")
    start = time.perf_counter()  # host time only: on CUDA the kernels run on asynchronously
    index = runtime.layer_index[layer.layer_name]
    tables = runtime.before_attention(index, query, kv_cache, plan)
    layer_metadata = attn_metadata
    if tables is not None:  # sparse attention: the selecting rows' blocks to attend over
        rows, table = tables
        block_table = attn_metadata.block_table.clone()
        width = min(table.shape[1], block_table.shape[1])
        block_table[rows, :width] = table[:, :width].to(block_table.dtype)
        layer_metadata = dataclasses.replace(attn_metadata, block_table=block_table)
    spent = time.perf_counter() - start
    result = forward(layer, query, key, value, kv_cache, layer_metadata, output, *args, **kwargs)
    start = time.perf_counter()
    runtime.after_attention(index, query, kv_cache, plan)
    runtime.step_metrics.add_time(spent + time.perf_counter() - start)
    return result


class EvictingCPUAttentionMetadataBuilder(EvictingBuilderMixin, CPUAttentionMetadataBuilder):
    def block_format(self, layer, kv_cache):
        return CPUBlockFormat(cpu_key_index(layer.isa, kv_cache.shape[2], layer.impl.head_size,
                                            kv_cache.dtype))


def cpu_key_index(isa: str, block_size: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Where the CPU kernel stores key ``(t, d)`` of a block (see :class:`CPUBlockFormat`).

    Found by writing probe keys through the kernel's own cache write: one probe encodes the token,
    one the channel (small integers, exact in any dtype).
    """
    from vllm import _custom_ops as ops

    probes = []
    for axis in range(2):
        cache = torch.full((1, 1, block_size, 2 * head_dim), -1.0, dtype=dtype)
        view = cache.view(1, 1, 2 * block_size, head_dim)
        key_cache, value_cache = view.chunk(2, dim=2)
        t, d = torch.meshgrid(torch.arange(block_size), torch.arange(head_dim), indexing="ij")
        key = (t if axis == 0 else d).to(dtype).unsqueeze(1)  # [block_size, 1, head_dim]
        ops.cpu_attn_reshape_and_cache(key, torch.zeros_like(key), key_cache, value_cache,
                                       torch.arange(block_size), isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")
        probes.append(cache.reshape(-1)[:block_size * head_dim].float().round().long())
    position = probes[0] * head_dim + probes[1]
    if (position < 0).any() or not torch.equal(torch.sort(position).values,
                                               torch.arange(block_size * head_dim)):
        raise RuntimeError(f"vllm-kvevict: cannot read keys of the CPU KV-cache layout ({isa})")
    index = torch.empty_like(position)
    index[position] = torch.arange(position.numel())
    return index


class EvictingCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        remember_worker_config()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        return forward_with_pages(super().forward, layer, query, key, value, kv_cache,
                                  attn_metadata, output, *args, **kwargs)


class EvictingCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` over resident pages."""

    @staticmethod
    def get_impl_cls():
        return EvictingCPUAttentionImpl

    @classmethod
    def customize_spec(cls, spec):
        return customize_for_eviction(super().customize_spec(spec))

    @staticmethod
    def get_builder_cls():
        return EvictingCPUAttentionMetadataBuilder


def register_backend(cuda: bool | None = None) -> None:
    """Install the evicting backend over the platform's default (idempotent): on CPU over
    ``CPU_ATTN``, on CUDA as ``CUSTOM`` (``cuda`` overrides the platform check, for tests)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as vllm_register_backend

    if cuda is None:
        cuda = current_platform.is_cuda()
    if cuda:
        vllm_register_backend(AttentionBackendEnum.CUSTOM,
                              "vllm_kvevict.engine.backend_cuda.EvictingFlashAttentionBackend")
    elif current_platform.is_cpu():
        vllm_register_backend(AttentionBackendEnum.CPU_ATTN,
                              f"{__name__}.EvictingCPUAttentionBackend")
