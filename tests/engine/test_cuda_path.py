"""The CUDA engine path, run on CPU: what a CUDA run of each policy gets (attention backend, model
runner, CUDA-graph mode), the one-line refusals, the evicting FlashAttention builder's ``build``
over CPU tensors (V1- and V2-shaped batches), and the device memory the page digests take.

No GPU here: vLLM's own CUDA code paths that decide these things (backend registry, CUDA-graph
resolution, the FlashAttention metadata builder) are called directly with CPU tensors; only
kernel launches are left out. The block format and runtimes over the FlashAttention cache
layout are tested in ``tests/test_pages.py`` and ``tests/test_attention_pages.py``.
"""
import os
import subprocess
import sys
import types

import pytest
import torch

from vllm_kvevict.config import EvictionConfig, EvictionConfigError

BLOCK = 32

pytestmark = pytest.mark.usefixtures("restore_environ")


def engine_args(model_path, policy="arkvale", **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model_path, kv_eviction_policy=policy, kv_budget=256, **kwargs)


def cuda_adapted(args):
    """``args`` after the plugin's adaptation for a CUDA platform."""
    from vllm_kvevict.engine.cli import adapt_engine_args, eviction_config

    adapt_engine_args(args, eviction_config(args.additional_config), cuda=True)
    return args


# --- what a CUDA run gets --------------------------------------------------------------------


EVICTING = ["streamingllm", "arkvale", "quest", "h2o", "tova", "roco", "snapkv", "lra", "lfa"]


def test_every_evicting_policy_is_covered():
    from vllm_kvevict.policies import POLICY_REGISTRY

    assert sorted(EVICTING) == sorted(name for name in POLICY_REGISTRY if name != "none")


@pytest.mark.parametrize("policy", EVICTING)
def test_cuda_run_gets_custom_backend_v1_runner_and_piecewise_graphs(plugin, model_path, policy):
    from vllm.config import CUDAGraphMode
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    args = cuda_adapted(engine_args(model_path, policy))
    assert args.block_size == BLOCK and args.enable_prefix_caching is False
    assert args.async_scheduling is False
    backend = AttentionConfig.validate_backend_before(args.attention_backend)
    assert backend == AttentionBackendEnum.CUSTOM
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    import vllm.envs as envs

    assert envs.VLLM_USE_V2_MODEL_RUNNER is False


def test_custom_backend_on_cuda_is_the_evicting_flash_attention_backend():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kvevict.engine.backend import register_backend
    from vllm_kvevict.engine.backend_cuda import (EvictingFlashAttentionBackend,
                                                  EvictingFlashAttentionMetadataBuilder)

    register_backend(cuda=True)
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend is EvictingFlashAttentionBackend and backend.get_name() == "CUSTOM"
    assert backend.get_builder_cls() is EvictingFlashAttentionMetadataBuilder


def test_cpu_run_is_unchanged_but_for_the_v1_runner(plugin, model_path):
    from vllm_kvevict.engine.cli import adapt_engine_args, eviction_config

    args = engine_args(model_path)
    adapt_engine_args(args, eviction_config(args.additional_config), cuda=False)
    assert args.attention_backend is None and args.compilation_config.cudagraph_mode is None
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"


@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "PIECEWISE"])
def test_evicting_builder_resolves_to_piecewise_cuda_graphs(mode):
    """vLLM's own resolution with the evicting builder's support: piecewise only, even from
    vLLM's default mode (a decode batch never replays a full graph)."""
    from vllm.config import CompilationConfig, CUDAGraphMode
    from vllm.config.compilation import CompilationMode
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from vllm_kvevict.engine.backend_cuda import EvictingFlashAttentionMetadataBuilder as Builder

    spec, plain = evicting_spec()
    support = Builder.get_cudagraph_support(None, spec)
    assert support == AttentionCGSupport.NEVER
    stock = FlashAttentionMetadataBuilder.get_cudagraph_support(None, plain)
    assert Builder.get_cudagraph_support(None, plain) == stock  # policy none: stock
    compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                                    cudagraph_mode=CUDAGraphMode[mode])
    compilation.set_splitting_ops_for_v1("naive")
    resolved = compilation.resolve_cudagraph_mode_and_sizes(support, "CUSTOM")
    assert resolved == CUDAGraphMode.PIECEWISE


# --- one-line refusals -----------------------------------------------------------------------


def test_conflicting_attention_backend_is_refused(plugin, model_path):
    with pytest.raises(EvictionConfigError, match="drop --attention-backend FLASH_ATTN"):
        cuda_adapted(engine_args(model_path, attention_backend="FLASH_ATTN"))
    args = cuda_adapted(engine_args(model_path, attention_backend="CUSTOM"))
    assert str(getattr(args.attention_backend, "name", args.attention_backend)) == "CUSTOM"


def test_full_cuda_graphs_are_refused(plugin, model_path):
    with pytest.raises(EvictionConfigError, match="cudagraph_mode PIECEWISE or NONE"):
        cuda_adapted(engine_args(model_path, compilation_config={"cudagraph_mode": "FULL"}))


def test_model_runner_v2_is_refused_in_one_line(model_path):
    """The real `vllm serve` (CPU), with Model Runner V2 asked for: one line, exit code 2."""
    env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER="1")
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", model_path,
         "--kv-eviction-policy", "arkvale", "--port", "0"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "vllm-kvevict: error:" in line]
    assert errors == ["vllm-kvevict: error: --kv-eviction-policy arkvale needs vLLM's V1 model "
                      "runner (its worker hooks are not ported to Model Runner V2); unset "
                      "VLLM_USE_V2_MODEL_RUNNER or set it to 0"]
    assert "Traceback" not in result.stderr


# --- the FlashAttention builder over CPU tensors ---------------------------------------------


def evicting_spec(budget=128, host_pages=0, kv_heads=3, head_size=64):
    """An evicting spec (streamingllm's layout) and the plain one it extends."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvevict.engine.kv_spec import EvictingAttentionSpec

    plain = FullAttentionSpec(block_size=BLOCK, num_kv_heads=kv_heads, head_size=head_size,
                              dtype=torch.bfloat16)
    layout = EvictionConfig(policy="streamingllm", budget=budget, sink_tokens=32,
                            window_tokens=32).layout(BLOCK)
    return EvictingAttentionSpec.from_full_attention(plain, layout, 2048, host_pages), plain


@pytest.fixture(scope="module")
def streamingllm_config(plugin, model_path):
    args = engine_args(model_path, "streamingllm", max_model_len=2048)
    args.kv_budget = None
    args.additional_config["kv_eviction"].update(budget=128, sink_tokens=32, window_tokens=32)
    return args.create_engine_config()


def batch(num_rows, is_prefilling_rows):
    """Row 0 decodes at 325 tokens (pages 1..6 evicted under a 4-page budget with 1 sink);
    row 1 prefills 100 tokens; rows past 2 are padding (Model Runner V2 pads lengths to a
    CUDA-graph batch size, not ``is_prefilling``)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    seq_lens = torch.tensor([325, 100] + [0] * (num_rows - 2), dtype=torch.int32)
    query_start = torch.tensor([0, 1, 101] + [101] * (num_rows - 2), dtype=torch.int32)
    table = torch.arange(1, 1 + num_rows * 12, dtype=torch.int32).view(num_rows, 12)
    return CommonAttentionMetadata(
        query_start_loc=query_start, query_start_loc_cpu=query_start.clone(),
        seq_lens=seq_lens, seq_lens_cpu_upper_bound=seq_lens.clone(), num_reqs=num_rows,
        num_actual_tokens=101, max_query_len=100, max_seq_len=325, block_table_tensor=table,
        slot_mapping=torch.zeros(101, dtype=torch.int64),
        is_prefilling=torch.tensor([False, True] + [False] * (is_prefilling_rows - 2)))


@pytest.mark.parametrize("num_rows, is_prefilling_rows", [(2, 2), (4, 2), (4, 4)],
                         ids=["v1", "v2-padded", "padded-both"])
def test_flash_builder_build_compacts_to_resident_pages(streamingllm_config, num_rows,
                                                        is_prefilling_rows):
    from vllm.config import set_current_vllm_config

    from vllm_kvevict.engine.backend_cuda import EvictingFlashAttentionMetadataBuilder

    spec, _ = evicting_spec()
    with set_current_vllm_config(streamingllm_config):
        builder = EvictingFlashAttentionMetadataBuilder(
            spec, ["model.layers.0.self_attn.attn"], streamingllm_config, torch.device("cpu"))
    metadata = builder.build(0, batch(num_rows, is_prefilling_rows))
    table = metadata.block_table
    assert table[0, :5].tolist() == [1, 8, 9, 10, 11]  # sink page 0, then pages 7..10
    assert table[1, :4].tolist() == [13, 14, 15, 16]  # prefilling: untouched
    assert metadata.seq_lens.tolist() == [325 - 6 * BLOCK, 100] + [0] * (num_rows - 2)
    assert metadata.max_seq_len == 133


def test_flash_builder_under_policy_none_is_stock(streamingllm_config):
    from vllm.config import set_current_vllm_config

    from vllm_kvevict.engine.backend_cuda import EvictingFlashAttentionMetadataBuilder

    _, spec = evicting_spec()
    with set_current_vllm_config(streamingllm_config):
        builder = EvictingFlashAttentionMetadataBuilder(
            spec, ["model.layers.0.self_attn.attn"], streamingllm_config, torch.device("cpu"))
    cm = batch(2, 2)
    metadata = builder.build(0, cm)
    assert metadata.block_table is cm.block_table_tensor and metadata.seq_lens is cm.seq_lens


def test_flash_builder_binds_its_runtime_to_the_flash_cache(plugin, model_path):
    """What the worker does right after vLLM allocates the KV cache, for the CUDA builder: the
    runtime gets FlashAttention's block format, a host store of pages in the cache's page shape
    and one digest per host page, before any step (here over a CPU cache in vLLM's layout)."""
    from vllm.config import set_current_vllm_config

    from tests.flash_layout import flash_layer_caches
    from vllm_kvevict.engine.backend_cuda import EvictingFlashAttentionMetadataBuilder
    from vllm_kvevict.engine.page_runtime import bind_page_runtimes
    from vllm_kvevict.pages import FlashBlockFormat

    config = engine_args(model_path, "arkvale", max_model_len=2048).create_engine_config()
    spec, _ = evicting_spec(host_pages=50, kv_heads=3, head_size=64)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(2)]
    with set_current_vllm_config(config):
        builder = EvictingFlashAttentionMetadataBuilder(spec, names, config, torch.device("cpu"))
    caches = flash_layer_caches(2, 20, BLOCK, 3, 64, torch.bfloat16)
    impl = types.SimpleNamespace(num_kv_heads=3, head_size=64, scale=0.125)
    layers = {name: types.SimpleNamespace(kv_cache=cache, impl=impl)
              for name, cache in zip(names, caches)}
    group = types.SimpleNamespace(kv_cache_spec=spec, layer_names=names,
                                  metadata_builders=[builder])
    bind_page_runtimes([[group]], layers)
    runtime = builder._page_runtime()
    assert runtime.bound and isinstance(runtime.format, FlashBlockFormat)
    store = runtime.store
    assert [tuple(p.shape) for p in store.pages] == [(50, 3, BLOCK, 128)] * 2
    assert [tuple(d.shape) for d in store.digests] == [(50, 2, 3, 64)] * 2
    assert store.pages[0].dtype == torch.bfloat16 and not store.pages[0].is_pinned()


# --- device memory for the digests -----------------------------------------------------------


def fake_worker(spec, policy, kv_cache_memory_bytes=None, num_layers=30):
    layers = {f"model.layers.{i}.self_attn.attn": spec for i in range(num_layers)}
    return types.SimpleNamespace(
        model_runner=types.SimpleNamespace(get_kv_cache_spec=lambda: layers),
        cache_config=types.SimpleNamespace(kv_cache_memory_bytes=kv_cache_memory_bytes),
        vllm_config=types.SimpleNamespace(additional_config={"kv_eviction": {"policy": policy}}))


def test_kv_cache_is_sized_with_the_digests_accounted():
    from vllm_kvevict.engine.page_runtime import determine_available_memory

    free = 8 * 2**30
    sized = lambda worker: free  # noqa: E731  (what vLLM's profiling found)
    # arkvale: one [2, kv_heads, head_dim] digest per host page and layer, bfloat16 as the cache.
    spec, _ = evicting_spec(host_pages=1000, kv_heads=3, head_size=64)
    digests = 1000 * 30 * 2 * 3 * 64 * 2
    assert determine_available_memory(sized, fake_worker(spec, "arkvale")) == free - digests
    # quest: one digest per KV block and layer, sharing the memory with the blocks.
    left = determine_available_memory(sized, fake_worker(evicting_spec()[0], "quest"))
    page, digest = spec.page_size_bytes, 2 * 3 * 64 * 2
    assert left == free - free * digest // (page + digest)
    assert (free - left) / free == pytest.approx(digest / (page + digest))
    # No digests: streamingllm, h2o; an explicit --kv-cache-memory-bytes is kept as given.
    for policy in ("streamingllm", "h2o"):
        assert determine_available_memory(sized, fake_worker(spec, policy)) == free
    assert determine_available_memory(sized, fake_worker(spec, "arkvale", free)) == free
