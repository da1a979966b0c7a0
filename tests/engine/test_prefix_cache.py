"""`--prefix-cache-eviction-policy {lru,marconi}`: settings routes, refusals, and real engines.

``lru`` must be stock vLLM: no scheduler or pool of ours, the same config hash, the same block
ids handed out in the same order on a recorded trace and the same greedy tokens. ``marconi``
runs vLLM's scheduler over the Marconi block pool and must not change what the model computes.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import serve_engine_args
from vllm_kvevict.config import EvictionConfigError

pytestmark = pytest.mark.usefixtures("restore_environ")


def test_flags_fill_additional_config(serve_parser, model_path):
    args = serve_engine_args(serve_parser, model_path, "--prefix-cache-eviction-policy", "marconi",
                       "--prefix-cache-alpha", "0.5", "--prefix-cache-tune-window", "16")
    assert args.additional_config == {"prefix_cache": {"eviction_policy": "marconi",
                                                       "alpha": 0.5, "tune_window": 16}}


def test_additional_config_and_yaml_routes(serve_parser, model_path, tmp_path):
    args = serve_engine_args(serve_parser, model_path,
                       "--additional-config.prefix_cache.eviction_policy", "marconi")
    assert args.additional_config == {"prefix_cache": {"eviction_policy": "marconi"}}
    yaml = tmp_path / "marconi.yaml"
    yaml.write_text("prefix-cache-eviction-policy: marconi\nprefix-cache-alpha: 1.5\n")
    args = serve_engine_args(serve_parser, model_path, "--config", yaml)
    assert args.additional_config["prefix_cache"] == {"eviction_policy": "marconi",
                                                      "alpha": 1.5}


def test_lru_is_stock_config(plugin, model_path):
    from vllm.engine.arg_utils import EngineArgs

    stock = EngineArgs(model=model_path, max_model_len=2048).create_engine_config()
    lru = EngineArgs(model=model_path, max_model_len=2048,
                     prefix_cache_eviction_policy="lru").create_engine_config()
    assert lru.additional_config == {} and lru.scheduler_config.scheduler_cls is None
    assert lru.compute_hash() == stock.compute_hash()
    assert (lru.scheduler_config.get_scheduler_cls()
            is stock.scheduler_config.get_scheduler_cls())


def test_marconi_selects_the_scheduler_over_its_pool(plugin, model_path):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=model_path, max_model_len=2048,
                        prefix_cache_eviction_policy="marconi").create_engine_config()
    assert config.cache_config.enable_prefix_caching
    cls = config.scheduler_config.get_scheduler_cls()
    assert cls.__module__ == "vllm_kvevict.engine.prefix_cache"
    expected = "MarconiAsyncScheduler" if config.scheduler_config.async_scheduling else \
        "MarconiScheduler"
    assert cls.__name__ == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"prefix_cache_eviction_policy": "marconi", "kv_eviction_policy": "streamingllm"},
     "--prefix-cache-eviction-policy marconi needs vLLM's prefix cache, which "
     "--kv-eviction-policy streamingllm switches off"),
    ({"prefix_cache_eviction_policy": "marconi", "enable_prefix_caching": False},
     "--prefix-cache-eviction-policy marconi needs prefix caching; drop "
     "--no-enable-prefix-caching"),
    ({"prefix_cache_eviction_policy": "lru", "prefix_cache_alpha": 1.0},
     "--prefix-cache-alpha and --prefix-cache-tune-window apply to "
     "--prefix-cache-eviction-policy marconi only"),
    ({"prefix_cache_eviction_policy": "marconi", "prefix_cache_alpha": -1.0},
     "--prefix-cache-alpha must be a number >= 0, got -1.0"),
    ({"prefix_cache_eviction_policy": "fifo"},
     "unknown --prefix-cache-eviction-policy 'fifo'; choose one of: lru, marconi"),
    ({"prefix_cache_eviction_policy": "marconi", "scheduler_cls": "my.Scheduler"},
     "drop --scheduler-cls my.Scheduler"),
])
def test_refusals(plugin, model_path, kwargs, message):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(EvictionConfigError, match=None) as error:
        EngineArgs(model=model_path, max_model_len=2048, **kwargs).create_engine_config()
    assert message in str(error.value)


def test_vllm_serve_refuses_the_combination_with_one_line(model_path):
    vllm = str(Path(sys.executable).with_name("vllm"))
    result = subprocess.run([vllm, "serve", model_path, "--port", "0",
                             "--kv-eviction-policy", "arkvale",
                             "--prefix-cache-eviction-policy", "marconi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("vllm-kvevict: error")]
    assert lines == ["vllm-kvevict: error: --prefix-cache-eviction-policy marconi needs vLLM's "
                     "prefix cache, which --kv-eviction-policy arkvale switches off (evicted "
                     "blocks cannot be shared between requests); use one of the two"], \
        result.stderr
    assert "Traceback" not in result.stderr


# --- real engines ----------------------------------------------------------------------------

TRACE_DOC = "The quick brown fox jumps over the lazy dog near the river bank. " * 25


def trace_prompts() -> list[str]:
    """Shared documents revisited between one-off prompts, in a pool too small for all."""
    other = "Numbers and letters go round in circles all day long. " * 20
    return [TRACE_DOC + "Question one?", "Unrelated words " * 70, other + "First?",
            TRACE_DOC + "Question two?", "More unrelated words " * 60, other + "Second?",
            "Yet other words " * 80, TRACE_DOC + "Question three?", other + "Third?"]


def run_trace(llm):
    """Greedy tokens, cached prompt tokens and the block ids the pool handed out, in order."""
    from vllm import SamplingParams

    core = llm.llm_engine.engine_core.engine_core
    pool = core.scheduler.kv_cache_manager.block_pool
    handed = []
    original = pool.get_new_blocks

    def recording(num_blocks):
        blocks = original(num_blocks)
        handed.extend(b.block_id for b in blocks)
        return blocks

    pool.get_new_blocks = recording
    tokens, cached = [], []
    for prompt in trace_prompts():
        out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0),
                           use_tqdm=False)[0]
        tokens.append(list(out.outputs[0].token_ids))
        cached.append(out.num_cached_tokens)
    del pool.get_new_blocks
    return {"tokens": tokens, "cached": cached, "handed": handed,
            "pool": type(pool), "scheduler": type(core.scheduler)}


ENGINE = {"max_model_len": 1024, "block_size": 32, "num_gpu_blocks_override": 40}


@pytest.fixture(scope="module")
def traces(llm_factory):
    runs = {}
    for name, flags in [("stock", {}), ("lru", {"prefix_cache_eviction_policy": "lru"}),
                        ("marconi", {"prefix_cache_eviction_policy": "marconi"})]:
        llm = llm_factory("none", **ENGINE, **flags)
        runs[name] = run_trace(llm)
        llm.llm_engine.engine_core.shutdown()
    return runs


@pytest.mark.engine
def test_lru_hands_out_the_same_blocks_as_stock_vllm(traces):
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    stock, lru = traces["stock"], traces["lru"]
    assert lru["pool"] is BlockPool and lru["scheduler"] in (Scheduler, AsyncScheduler)
    assert lru["scheduler"] is stock["scheduler"]
    assert len(lru["handed"]) > 39  # the pool was used up and cached blocks were given up
    assert lru["handed"] == stock["handed"]
    assert lru["tokens"] == stock["tokens"] and lru["cached"] == stock["cached"]
    assert sum(stock["cached"]) > 0


@pytest.mark.engine
def test_marconi_runs_the_same_model_over_its_pool(traces):
    from vllm_kvevict.engine.prefix_cache import MarconiBlockPool

    marconi = traces["marconi"]
    assert marconi["pool"] is MarconiBlockPool
    assert marconi["tokens"] == traces["stock"]["tokens"]
    assert sum(marconi["cached"]) > 0
