"""Policy ``none`` is stock vLLM; an evicting policy whose budget covers the context is ``none``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import close_llm, make_llm

pytestmark = pytest.mark.engine

MAX_TOKENS = 48
BLOCK_SIZE = 32  # the evicting default; `none` is given the same so the kernels match


def _prompts() -> list[str]:
    from vllm_kvevict.eval.passkey import FILLER

    return [
        "The capital of France is",
        "def fibonacci(n):\n    ",
        "Write a short poem about the sea.\n",
        "Once upon a time, " + FILLER * 30 + "In the end,",
        FILLER * 60 + "Summarize the text above in one sentence:",
    ]


def _greedy(llm, prompts):
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def none_runs(model_path):
    """Greedy tokens of ``none`` for the batch, and for each prompt alone (CPU kernels are not
    batch-invariant, so each run is compared with ``none`` run the same way)."""
    llm = make_llm(model_path, "none", block_size=BLOCK_SIZE)
    try:
        yield _greedy(llm, _prompts()), [_greedy(llm, [prompt])[0] for prompt in _prompts()]
    finally:
        close_llm(llm)


@pytest.fixture(scope="module")
def none_tokens(none_runs):
    return none_runs[0]


def test_none_matches_stock_vllm(model_path, none_tokens, tmp_path):
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(_prompts()))
    env = dict(os.environ, VLLM_PLUGINS="no-such-plugin", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    script = Path(__file__).with_name("stock_greedy.py")
    result = subprocess.run(
        [sys.executable, str(script), model_path, str(prompts_file), str(MAX_TOKENS),
         str(BLOCK_SIZE)],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vllm_kvevict" not in result.stderr, "the plugin must not load in the stock run"
    line = next(l for l in result.stdout.splitlines() if l.startswith("GREEDY_TOKENS="))
    stock = json.loads(line.removeprefix("GREEDY_TOKENS="))
    assert stock == none_tokens


@pytest.mark.parametrize("policy, settings", [
    ("streamingllm", {}),
    ("arkvale", {}),
    ("arkvale", {"kv_sparse_attention": True, "kv_digest": "cuboid-max"}),
    ("quest", {}),
    ("h2o", {}),
    ("tova", {}),
    ("roco", {}),
    ("snapkv", {}),
    ("lra", {}),
    ("lfa", {}),
])
def test_covering_budget_matches_none(model_path, none_runs, policy, settings):
    """A batch of mixed lengths, then each prompt alone (arkvale also backs every page up).
    Attention-statistics policies observe every decode query but move nothing."""
    none_tokens, none_alone = none_runs
    llm = make_llm(model_path, policy, budget=8192, **settings)
    try:
        assert llm.llm_engine.vllm_config.cache_config.block_size == BLOCK_SIZE
        assert _greedy(llm, _prompts()) == none_tokens
        if policy in ("h2o", "tova", "roco", "snapkv", "lra", "lfa"):
            from vllm_kvevict.engine.page_runtime import current_runtime

            # Statistics were gathered for every request, and nothing had to move.
            assert current_runtime().policy.name == policy
            assert current_runtime().stats.evicted == 0
        if policy in ("arkvale", "quest"):
            from vllm_kvevict.engine.page_runtime import current_runtime

            assert current_runtime().stats.backed_up > 0  # digests (and arkvale's backups)
            assert current_runtime().stats.recalled == 0
            assert current_runtime().stats.selections == 0
            alone = [_greedy(llm, [prompt])[0] for prompt in _prompts()]
            assert alone == none_alone
    finally:
        close_llm(llm)
