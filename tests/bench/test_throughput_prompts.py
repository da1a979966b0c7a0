"""Throughput prompts share no KV block, so prefix caching cannot favour ``none``."""
from vllm_kvevict.bench.common import BLOCK_SIZE
from vllm_kvevict.bench.throughput import distinct_prompt
from vllm_kvevict.eval.passkey import make_trial


def test_prompts_differ_in_their_first_block(model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Same key and depth: without the distinct first line the prompts would be identical.
    prompt = make_trial(tokenizer, 300, 0.5, "12345").prompt
    first_blocks = {tuple(tokenizer.encode(distinct_prompt(i, prompt))[:BLOCK_SIZE])
                    for i in range(16)}
    assert len(first_blocks) == 16


def test_decode_phase_separates_first_tokens_and_overlapping_intervals():
    from vllm_kvevict.bench.throughput import decode_phase

    # Request a: first token at 1 s, 5 tokens by 3 s; b: first at 2 s, 3 tokens by 6 s.
    replies = [(5, [1.0, 1.5, 2.0, 2.5, 3.0]), (3, [2.0, 4.0, 6.0]), (1, [2.5])]
    phase = decode_phase(replies)
    assert phase["mean_itl_ms"] == 1000 * (0.5 + 2.0) / 2
    assert phase["decode_tok_s"] == (4 + 2) / 5.0  # decoding from 1 s to 6 s


def test_rounds_give_medians_and_ratios_taken_within_each_round():
    from vllm_kvevict.bench.throughput import median_rows, with_ratios

    def row(policy, tok_s):
        return {"policy": policy, "budget": None if policy == "none" else 512,
                "total_s": 100.0 / tok_s, "output_tokens": 100, "output_tok_s": tok_s,
                "most_running": 16 if policy != "none" else 8, "mean_itl_ms": 1000.0 / tok_s,
                "decode_tok_s": tok_s}

    # The machine slows down over the second round: ratios stay those within each round.
    rounds = [with_ratios([row("none", 10.0), row("streamingllm", 20.0), row("arkvale", 18.0)]),
              with_ratios([row("none", 5.0), row("streamingllm", 10.0), row("arkvale", 8.0)]),
              with_ratios([row("none", 9.0), row("streamingllm", 20.0), row("arkvale", 19.0)])]
    none, floor, arkvale = median_rows(rounds)
    assert arkvale["output_tok_s"] == 18.0 and floor["output_tok_s"] == 20.0
    assert arkvale["tok_s_vs_streamingllm"] == 0.9  # rounds: 0.9, 0.8, 0.95
    assert arkvale["tok_s_vs_streamingllm_range"] == (0.8, 0.95)
    assert arkvale["tok_s_ratio"] == 1.8 and arkvale["concurrency_ratio"] == 2.0
    assert none["tok_s_vs_streamingllm"] == 0.5
    assert median_rows(rounds[:1]) is rounds[0]  # one round: as it is
    without_floor = median_rows([with_ratios([row("none", 10.0), row("arkvale", 18.0)])] * 2)
    assert without_floor[1]["tok_s_vs_streamingllm"] is None


def test_policies_without_none_are_refused_before_anything_runs(tmp_path):
    import pytest

    from vllm_kvevict.bench import throughput
    from vllm_kvevict.bench.common import SettingError

    with pytest.raises(SettingError, match="include none"):
        throughput.run(str(tmp_path / "no-model"), str(tmp_path), 2, 100, 8, 64, 32,
                       ["streamingllm", "h2o"])
    assert list(tmp_path.iterdir()) == []


def test_page_work_and_recalls_per_step_come_from_the_servers_exposition():
    from prometheus_client import CollectorRegistry, generate_latest

    from vllm_kvevict.bench.common import series_sums
    from vllm_kvevict.bench.throughput import (PAGE_WORK, RECALLED, page_work_ms,
                                               recalls_per_step)
    from vllm_kvevict.engine.metrics_export import EvictionCollector

    def page_work(ranks: list[tuple[int, float, int]]) -> dict[str, float]:
        """:data:`PAGE_WORK` and :data:`RECALLED` summed over the plugin's own ``/metrics``
        text, each rank with (steps, seconds) of page work and its page copies recalled."""
        collector = EvictionCollector("m")
        registry = CollectorRegistry()
        registry.register(collector)
        if ranks:
            workers = [{"rank": rank, "backed_up": 0, "evicted": 0, "recalled": recalled,
                        "host_used_bytes": 0, "host_capacity_bytes": 0,
                        "page_work_seconds": {"bounds": [0.01], "counts": [steps, 0],
                                              "sum": seconds},
                        "selections_per_step": {"bounds": [1], "counts": [steps, 0], "sum": 0}}
                       for rank, (steps, seconds, recalled) in enumerate(ranks)]
            collector.latest[0] = {"budget_blocks": 16, "resident_blocks": 0,
                                   "host_store_full": {}, "workers": workers}
        return series_sums(generate_latest(registry).decode(), (*PAGE_WORK, RECALLED))

    seconds, steps = PAGE_WORK
    assert page_work([]) == {seconds: 0.0, steps: 0.0, RECALLED: 0.0}  # none, streamingllm
    before = page_work([(10, 0.05, 7), (10, 0.07, 5)])
    assert before[steps] == 20 and abs(before[seconds] - 0.12) < 1e-12 and before[RECALLED] == 12
    after = page_work([(30, 0.09, 47), (30, 0.15, 45)])
    assert abs(page_work_ms(before, after) - 1000 * 0.12 / 40) < 1e-9  # the load's steps only
    assert recalls_per_step(before, after) == 80 / 40
    assert page_work_ms(before, before) is None and recalls_per_step(before, before) is None


def test_policy_entries_carry_the_plugin_settings_to_the_server():
    import pytest

    from vllm_kvevict.bench.common import SettingError
    from vllm_kvevict.bench.throughput import base_policy, policy_flags

    assert policy_flags("arkvale") == ["--kv-eviction-policy", "arkvale"]
    assert policy_flags("arkvale+no-kv-per-head-selection+kv-digest=cuboid-max") == [
        "--kv-eviction-policy", "arkvale", "--no-kv-per-head-selection", "--kv-digest",
        "cuboid-max"]
    assert base_policy("none") == "none"
    assert base_policy("arkvale+kv-top-k-tokens=128") == "arkvale"
    for entry in ("arkvale+max-model-len=10", "arkvale+kv-digest=", "arkvale+"):
        with pytest.raises(SettingError, match="not one of the plugin's settings"):
            policy_flags(entry)
    for entry in ("arkvale+kv-budget=256", "arkvale+kv-eviction-policy=h2o"):
        with pytest.raises(SettingError, match="the benchmark's own setting"):
            policy_flags(entry)
