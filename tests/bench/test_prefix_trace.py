"""The prefix benchmark's trace: shared contexts revisited, prompts inside the context limit."""
from vllm_kvevict.bench.prefix import make_trace

SETTINGS = dict(doc_words=1100, system_words=350, turn_words=110, oneoff_words=600, num_docs=4,
                num_systems=3, num_conversations=3)


def test_trace_mixes_shared_contexts_and_one_offs():
    trace = make_trace(80, **SETTINGS)
    assert trace == make_trace(80, **SETTINGS)  # seeded: every policy sees the same requests
    kinds = {r["kind"] for r in trace}
    assert kinds == {"document", "system", "conversation", "one-off"}
    documents = [r for r in trace if r["kind"] == "document"]
    assert len({r["tenant"] for r in documents}) < len(documents)  # documents are revisited
    turns = [r["prompt"] for r in trace if r["tenant"] == "conversation0"]
    assert all(b.startswith(a) for a, b in zip(turns, turns[1:]))  # a conversation grows
    one_offs = [r["prompt"].split("\n")[0] for r in trace if r["kind"] == "one-off"]
    assert len(set(one_offs)) == len(one_offs)


def test_long_traces_restart_conversations_within_the_limit():
    limit = 1300
    trace = make_trace(300, max_conversation_words=limit, **SETTINGS)
    turns = [r["prompt"] for r in trace if r["kind"] == "conversation"]
    assert max(len(t.split()) for t in turns) <= limit
    assert any("session" in t.split("\n")[0] for t in turns)
    # the defaults' 80 requests never reach the limit, so their trace is unchanged by it
    assert make_trace(80, max_conversation_words=int((2048 - 8 - 64) / 1.5), **SETTINGS) == \
        make_trace(80, **SETTINGS)
