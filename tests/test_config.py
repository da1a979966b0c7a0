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
    ({"policy": "bogus"}, "unknown --kv-eviction-policy 'bogus'; choose one of: arkvale, h2o, "
                          "lfa, lra, none, quest, roco, snapkv, streamingllm, tova"),
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


@pytest.mark.parametrize("raw, message", [
    ({"host_space_gib": "lots"}, "--kv-host-space must be a positive number of GiB, got 'lots'"),
    ({"host_space_gib": 0}, "--kv-host-space must be a positive number of GiB, got 0"),
    ({"digest": "sphere"}, "unknown --kv-digest 'sphere'; choose one of: cuboid-mean, cuboid-max"),
    ({"sparse_attention": "maybe"}, "--kv-sparse-attention must be true or false, got 'maybe'"),
    ({"top_k_tokens": -1}, "--kv-top-k-tokens must be a positive integer, got -1"),
    ({"per_head_selection": "some"}, "--kv-per-head-selection must be true or false, got 'some'"),
    ({"per_head_selection": True, "sparse_attention": True},
     "--kv-per-head-selection needs attention over every resident page; drop "
     "--kv-sparse-attention or pass --no-kv-per-head-selection"),
])
def test_arkvale_settings_are_validated(raw, message):
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_dict({"policy": "arkvale", **raw})
    assert message in str(info.value)


def test_arkvale_settings_from_strings():
    config = EvictionConfig.from_dict({"policy": "arkvale", "host_space_gib": "0.5",
                                       "sparse_attention": "true", "top_k_tokens": "128"})
    assert (config.host_space_gib, config.sparse_attention, config.top_k_tokens) == (0.5, True, 128)
    assert config.host_space_bytes == 1 << 29
    assert not config.selects_per_head  # one block table serves every head under sparse attention


def test_per_head_selection_is_on_unless_sparse_attention():
    assert EvictionConfig(policy="arkvale").selects_per_head
    assert not EvictionConfig(policy="arkvale", per_head_selection=False).selects_per_head
    assert EvictionConfig.from_dict({"policy": "arkvale",
                                     "per_head_selection": "off"}).per_head_selection is False


def test_top_k_default_follows_arkvale_and_fits_the_budget():
    # Without anchors (sparse attention, quest's digest): ArkVale's min(1280, budget / 2).
    sparse = EvictionConfig(policy="arkvale", budget=512, sparse_attention=True)
    assert (sparse.keeps_anchors, sparse.layout(32).top_k_pages) == (False, 8)  # 256 tokens
    assert EvictionConfig(policy="quest", budget=1024).layout(32).top_k_pages == 16
    # With anchors, 3/8 of the budget; the anchors take the rest.
    assert EvictionConfig(policy="arkvale", budget=512).layout(32).top_k_pages == 6  # 192 tokens
    assert EvictionConfig(policy="arkvale", budget=1024).layout(32).top_k_pages == 12
    assert EvictionConfig(policy="arkvale", budget=8192).layout(32).top_k_pages == 40  # 1280
    assert EvictionConfig(policy="arkvale", budget=128).layout(32).top_k_pages == 0  # no room
    with pytest.raises(EvictionConfigError, match="--kv-top-k-tokens is 14 blocks of 32 tokens"):
        EvictionConfig(policy="arkvale", budget=512, top_k_tokens=448).layout(32)


@pytest.mark.parametrize("raw, message", [
    ({"observation_window": 0}, "--kv-observation-window must be a positive integer, got 0"),
    ({"observation_window": "many"}, "--kv-observation-window must be a positive integer, "
                                     "got 'many'"),
    ({"recent_ratio": 1.5}, "--kv-recent-ratio must be a number between 0 and 1 (exclusive), "
                            "got 1.5"),
    ({"recent_ratio": "half"}, "--kv-recent-ratio must be a number between 0 and 1 "
                               "(exclusive), got 'half'"),
])
def test_attention_statistics_settings_are_validated(raw, message):
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_dict({"policy": "h2o", **raw})
    assert message in str(info.value)


def test_recent_ratio_widens_the_window_and_must_leave_room_for_sinks():
    config = EvictionConfig.from_dict({"policy": "h2o", "budget": "512", "recent_ratio": "0.5",
                                       "observation_window": "16"})
    assert (config.observation_window, config.layout(32).window_pages) == (16, 8)
    assert EvictionConfig(policy="h2o", budget=512, recent_ratio=0.01).layout(32).window_pages == 2
    with pytest.raises(EvictionConfigError, match="fewer than 2 sink \\+ 16 window blocks"):
        EvictionConfig(policy="h2o", budget=512, recent_ratio=0.99).layout(32)
