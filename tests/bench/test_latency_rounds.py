"""bench latency's rounds: medians over rounds, each ratio taken within one round."""
from vllm_kvevict.bench.latency import median_over_rounds, with_ratios


def _row(policy, budget, tokens, ms):
    return {"policy": policy, "budget": budget, "prompt_tokens": tokens,
            "covers_context": budget == 8192, "median_ms": ms, "steps": 10, "p90_ms": ms + 1}


def _round(none, floor, arkvale, short, covering):
    return with_ratios([_row("none", None, 7000, none), _row("streamingllm", 512, 7000, floor),
                        _row("arkvale", 512, 7000, arkvale), _row("none", None, 512, short),
                        _row("arkvale", 8192, 7000, covering)])


def test_ratios_are_taken_within_each_round_then_the_median():
    # The machine slows down in the second round: each ratio stays the one within its round.
    rounds = [_round(40.0, 30.0, 33.0, 30.0, 40.0), _round(80.0, 60.0, 72.0, 60.0, 84.0),
              _round(44.0, 30.0, 31.5, 28.0, 44.0)]
    none, floor, arkvale, short, covering = median_over_rounds(rounds)
    assert arkvale["median_ms"] == 33.0 and floor["median_ms"] == 30.0
    assert arkvale["ratio_to_streamingllm"] == 1.1  # rounds: 1.1, 1.2, 1.05
    assert arkvale["ratio_to_streamingllm_range"] == (1.05, 1.2)
    assert arkvale["ratio_to_none_short"] == 1.125  # rounds: 1.1, 1.2, 1.125
    assert arkvale["ratio_to_none_short_range"] == (1.1, 1.2)
    assert covering["ratio_to_none"] == 1.0 and covering["ratio_to_none_range"] == (1.0, 1.05)
    assert covering["ratio_to_streamingllm"] is None and covering["ratio_to_none_short"] is None
    assert none["ratio_to_none"] == 1.0 and arkvale["steps"] == 30
    assert [r["policy"] for r in (none, floor, arkvale, short, covering)] == [
        "none", "streamingllm", "arkvale", "none", "arkvale"]


def test_one_round_is_reported_as_measured():
    rounds = [_round(40.0, 30.0, 33.0, 30.0, 40.0)]
    assert median_over_rounds(rounds) is rounds[0]
    arkvale = rounds[0][2]
    assert arkvale["ratio_to_streamingllm"] == 1.1 and "ratio_to_streamingllm_range" not in arkvale
