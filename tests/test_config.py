"""EvictionConfig validation: one clear line per mistake."""
import pytest

from vllm_kvevict.config import EvictionConfig, EvictionConfigError


def test_defaults_are_stock_vllm():
    config = EvictionConfig.from_additional_config(None)
    assert config.policy == "none" and not config.evicts


def test_reads_additional_config_and_coerces_strings():
    config = EvictionConfig.from_additional_config(
        {"kv_eviction": {"policy": "streamingllm", "budget": "512", "sink_tokens": 32}})
    assert (config.policy, config.budget, config.sink_tokens) == ("streamingllm", 512, 32)
    assert config.evicts


@pytest.mark.parametrize("raw, message", [
    ({"policy": "bogus"}, "unknown --kv-eviction-policy 'bogus'; choose one of: none, streamingllm"),
    ({"budget": 0}, "--kv-budget must be a positive integer, got 0"),
    ({"sink_tokens": -4}, "--kv-sink-tokens must be a positive integer, got -4"),
    ({"window_tokens": "many"}, "--kv-window-tokens must be a positive integer, got 'many'"),
    ({"budget": 100, "sink_tokens": 64, "window_tokens": 64},
     "--kv-budget 100 is smaller than --kv-sink-tokens 64 + --kv-window-tokens 64"),
    ({"bugdet": 100}, "unknown kv_eviction setting(s) bugdet"),
])
def test_invalid_settings_raise_one_line(raw, message):
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_layout_uses_block_size():
    layout = EvictionConfig(policy="streamingllm", budget=512).layout(32)
    assert (layout.budget_pages, layout.sink_pages, layout.window_pages) == (16, 2, 2)
