"""The page runtime's two implementations of its per-layer work (:mod:`vllm_kvevict.pages.ops`):
the kernels (Triton's interpreter here, compiled on CUDA) against torch, through the runtime, on
vLLM 0.32's FlashAttention cache layouts with several rows and layers; and the host
synchronisations the CUDA path makes (none per layer)."""
import pytest
import torch

from tests.host_syncs import HostSyncCounter
from tests.fake_engine import BS, CACHES, LAYERS, FakeEngine
from vllm_kvevict.algorithms.digest import digest_dtype
from vllm_kvevict.pages.ops import CompiledCPUPageOps, PageOps, TritonPageOps, page_ops_for
from vllm_kvevict.paging import PageLayout

QUEST_LAYOUT = PageLayout(block_size=BS, budget_pages=40, sink_pages=1, window_pages=1,
                          top_k_pages=2)
FLASH = ["flash-LBNHC", "flash-BLNHC", "flash-LBHNC"]


# (policy, sparse attention): arkvale-per-head places pages per KV head, with anchors.
CASES = [("arkvale", False), ("arkvale", True), ("quest", True), ("arkvale-per-head", False)]


def _engine(cache, policy, sparse, ops):
    if policy == "quest":
        return FakeEngine(cache=CACHES[cache], policy="quest", host_pages=0, layout=QUEST_LAYOUT,
                          ops=ops)
    if policy == "arkvale-per-head":
        return FakeEngine(cache=CACHES[cache], ops=ops, per_head=True, observation_window=2)
    return FakeEngine(cache=CACHES[cache], sparse=sparse, ops=ops)


def _scenario(per_head=False):
    """Steps of a mixed batch: two prompts, decodes across page boundaries with the favoured page
    moving (recalls), a third prompt ending while the others decode; ``per_head``: the KV heads
    favour different pages."""
    prompts = {"a": 11 * BS + 2, "b": 8 * BS, "c": 9 * BS + 3}
    yield {"a": prompts["a"], "b": prompts["b"]}, prompts, {"a": 3, "b": 2}
    for step in range(2 * BS + 3):
        batch = {"a": 1, "b": 1}
        if step == 3:
            batch["c"] = prompts["c"]
        elif step > 3:
            batch["c"] = 1
        favour = {"a": 2 + step % 7, "b": 1 + (3 * step) % 6, "c": 4 - step % 3}
        if per_head:
            favour = {req: (page, 1 + (page + 3) % 7) for req, page in favour.items()}
        yield batch, prompts, favour


@pytest.mark.parametrize("cache", FLASH)
@pytest.mark.parametrize("policy, sparse", CASES)
def test_kernels_match_torch_through_the_runtime(cache, policy, sparse):
    torch_engine = _engine(cache, policy, sparse, PageOps(host_sync_free=False))
    kernel_engine = _engine(cache, policy, sparse, TritonPageOps())
    recalls = 0
    for batch, prompts, favour in _scenario(policy == "arkvale-per-head"):
        _, torch_tables = torch_engine.step(batch, prompts, favour)
        _, kernel_tables = kernel_engine.step(batch, prompts, favour)
        slots = [h for state in kernel_engine.runtime.requests.values() for h in state.host_ids]
        for layer in range(LAYERS):
            assert torch.equal(kernel_engine.kv[layer], torch_engine.kv[layer])
            torch.testing.assert_close(kernel_engine.store.digests[layer][slots],
                                       torch_engine.store.digests[layer][slots])
            if kernel_engine.store.pages:
                assert torch.equal(kernel_engine.store.pages[layer][slots],
                                   torch_engine.store.pages[layer][slots])
            assert kernel_tables[layer].keys() == torch_tables[layer].keys()
            for row, blocks in kernel_tables[layer].items():
                assert torch.equal(blocks, torch_tables[layer][row])
        for req, state in kernel_engine.runtime.requests.items():
            assert torch.equal(state.held, torch_engine.runtime.requests[req].held)
            if batch[req] == 1:  # decoding: the scheduler's frees have happened
                kernel_engine.check_invariants(req)
        recalls = kernel_engine.runtime.stats.recalled
        assert kernel_engine.runtime.stats == torch_engine.runtime.stats
    assert recalls > 0 or policy == "quest"


@pytest.mark.parametrize("cache", ["cpu", "flash-LBNHC"])
@pytest.mark.parametrize("policy, sparse", CASES)
def test_compiled_cpu_kernels_match_torch_through_the_runtime(cache, policy, sparse):
    torch_engine = _engine(cache, policy, sparse, PageOps(host_sync_free=True))
    compiled_engine = _engine(cache, policy, sparse, CompiledCPUPageOps(host_sync_free=True))
    for batch, prompts, favour in _scenario(policy == "arkvale-per-head"):
        _, torch_tables = torch_engine.step(batch, prompts, favour)
        _, compiled_tables = compiled_engine.step(batch, prompts, favour)
        for layer in range(LAYERS):
            assert torch.equal(compiled_engine.kv[layer], torch_engine.kv[layer])
            for row, blocks in compiled_tables[layer].items():
                assert torch.equal(blocks, torch_tables[layer][row])
        for req, state in compiled_engine.runtime.requests.items():
            assert torch.equal(state.held, torch_engine.runtime.requests[req].held)
            slots = state.host_ids
            for layer in range(LAYERS):
                torch.testing.assert_close(compiled_engine.store.digests[layer][slots],
                                           torch_engine.store.digests[layer][slots])
                if compiled_engine.store.pages:
                    assert torch.equal(compiled_engine.store.pages[layer][slots],
                                       torch_engine.store.pages[layer][slots])
        assert compiled_engine.runtime.stats == torch_engine.runtime.stats
    assert compiled_engine.runtime.stats.recalled > 0 or policy == "quest"


def test_workers_pick_kernels_on_cuda_and_compiled_kernels_on_cpu():
    assert type(page_ops_for("cuda")) is TritonPageOps
    cpu = page_ops_for("cpu")
    assert type(cpu) is CompiledCPUPageOps and cpu.host_sync_free


@pytest.mark.parametrize("policy, sparse", CASES)
def test_no_host_sync_per_layer_on_the_cuda_path(policy, sparse, monkeypatch):
    """Several rows and layers, recalls in most decode steps: the layers make no host sync; a
    step makes one per batch it commits (the updated page tables, after the last layer)."""
    engine = _engine("flash-LBNHC", policy, sparse, TritonPageOps())
    counter = HostSyncCounter()
    calls: list[tuple[int, list[str]]] = []  # (layer, what it synced on)
    runtime = engine.runtime

    def counted(method):
        def call(layer, *args):
            counter.take()  # the fake engine's own work between calls
            result = method(layer, *args)
            calls.append((layer, counter.take()))
            return result
        return call

    monkeypatch.setattr(runtime, "before_attention", counted(runtime.before_attention))
    monkeypatch.setattr(runtime, "after_attention", counted(runtime.after_attention))
    steps = list(_scenario(policy == "arkvale-per-head"))
    engine.step(*steps[0])  # prompts (not counted)
    calls.clear()
    commits = 0
    with counter.install(monkeypatch):
        for step in steps[1:]:
            plan, _ = engine.step(*step)
            commits += (plan.selections is not None) + (plan.prefill_ends is not None)
    assert len(calls) == 2 * LAYERS * (len(steps) - 1)
    assert all(events == [] for layer, events in calls if layer < LAYERS - 1), calls
    last = [event for layer, events in calls if layer == LAYERS - 1 for event in events]
    assert last == ["cpu"] * commits  # one copy of the page tables per committed batch
    assert commits >= len(steps) // 2


def test_the_counter_sees_the_syncs_of_the_cpu_path(monkeypatch):
    """The torch ops on CPU skip empty work by reading tensors (free there): counted here, so the
    test above cannot pass by counting nothing."""
    engine = _engine("flash-LBNHC", "arkvale", False, PageOps(host_sync_free=True))
    counter = HostSyncCounter()
    steps = list(_scenario())
    engine.step(*steps[0])
    with counter.install(monkeypatch):
        for step in steps[1:6]:
            engine.step(*step)
    events = counter.take()
    assert "is_nonzero" in events or "_local_scalar_dense" in events
    assert "index" in events  # boolean-mask indexing of the masked copies


def _vnni_key_index(block_size, head_dim):
    """Where the CPU kernels' AMX packing (``[block/16, head_dim/2, 16, 2]`` tiles) puts key
    ``(t, d)``."""
    t = torch.arange(block_size).unsqueeze(1)
    d = torch.arange(head_dim).unsqueeze(0)
    return (((t // 16) * (head_dim // 2) + d // 2) * 32 + (t % 16) * 2 + d % 2).flatten()


@pytest.mark.parametrize("layout", ["cpu-row-major", "cpu-amx", "flash-LBNHC"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["cuboid-mean", "cuboid-max"])
def test_compiled_backup_matches_torch(layout, dtype, kind):
    from tests.flash_layout import flash_layer_caches
    from vllm_kvevict.pages import CPUBlockFormat, FlashBlockFormat

    block_size, kv_heads, head_dim = 32, 2, 8
    torch.manual_seed(5)
    if layout == "flash-LBNHC":
        fmt = FlashBlockFormat()
        cache = flash_layer_caches(2, 12, block_size, kv_heads, head_dim, dtype=dtype)[1]
        cache.copy_(torch.randn(cache.shape).to(dtype))
    else:
        fmt = CPUBlockFormat(_vnni_key_index(block_size, head_dim) if layout == "cpu-amx"
                             else None)
        cache = torch.randn(12, kv_heads, block_size, 2 * head_dim).to(dtype)
    blocks, slots = torch.tensor([7, 2, 9]), torch.tensor([4, 0, 5])
    results = []
    for ops in (PageOps(), CompiledCPUPageOps()):
        digests = torch.zeros(6, 2, kv_heads, head_dim, dtype=digest_dtype(dtype))
        host = torch.zeros(6, kv_heads, block_size, 2 * head_dim, dtype=dtype)
        ops.backup(cache, fmt, blocks, slots, digests, host, kind)
        results.append((digests, host))
    (torch_digests, torch_host), (compiled_digests, compiled_host) = results
    if dtype == torch.bfloat16:  # rounded outward alike (sums may differ in float32's last bits)
        assert torch.equal(compiled_digests, torch_digests)
    torch.testing.assert_close(compiled_digests, torch_digests)
    assert torch.equal(compiled_host, torch_host)
    assert compiled_digests[slots].abs().sum() > 0


def test_plans_travel_to_the_device_as_one_tensor():
    """The CUDA branch of ``to_device`` (pinning and the copy need a GPU): what it packs comes
    back with every shape, dtype and value."""
    from vllm_kvevict.pages.plan import pack, unpack

    tensors = {"ids": torch.arange(6).view(2, 3), "mask": torch.tensor([[True, False]]),
               "empty": torch.zeros((0, 4), dtype=torch.int64), "held": torch.full((2, 1, 2), 7)}
    flat = pack(tensors)
    assert flat.dim() == 1 and flat.dtype == torch.int64
    for name, t in unpack(flat, tensors).items():
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name])


def test_host_store_is_addressed_through_vllms_device_view(monkeypatch):
    """On CUDA the kernels read and write the pinned host store in place, through vLLM's
    unified-addressing view (the view itself needs a GPU; here it is recorded)."""
    import vllm.utils.torch_utils

    from vllm_kvevict.kernels.transfer import host_view

    seen = []
    monkeypatch.setattr(vllm.utils.torch_utils, "get_accelerator_view_from_cpu_tensor",
                        lambda t: seen.append(t) or "device view")
    host = torch.zeros(3, 2)
    assert host_view(host, torch.device("cuda")) == "device view" and seen == [host]
    assert host_view(host, torch.device("cpu")) is host
    ops = TritonPageOps()
    assert ops._view(host, torch.device("cuda")) == "device view"
    assert ops._view(host, torch.device("cuda")) == "device view" and len(seen) == 2  # cached


def test_kernel_scores_per_head_rows(monkeypatch):
    """Selection rows of one KV head each are scored by the Triton kernel, not by torch."""
    engine = _engine("flash-LBNHC", "arkvale-per-head", False, TritonPageOps())

    def torch_scores(*args):
        raise AssertionError("scored by the torch path")

    monkeypatch.setattr(PageOps, "score", torch_scores)
    for step in _scenario(per_head=True):
        engine.step(*step)
    assert engine.runtime.selections > 0
