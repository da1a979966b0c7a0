"""Retrieval prompts on natural prose: lengths, needle placement, question position, scoring,
seeding and the mix of text sources (the bundled model's tokenizer; no engine)."""
import dataclasses
import random

import pytest

from vllm_kvevict.eval import retrieval, texts
from vllm_kvevict.eval.retrieval import TASKS, Trial, make_trials, partial, score


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def trials(tokenizer) -> dict[str, list[Trial]]:
    return {task: make_trials(tokenizer, task, 3000, 7, seed=5) for task in TASKS}


@pytest.mark.parametrize("task", TASKS)
def test_prompt_lengths_are_near_the_target(tokenizer, trials, task):
    assert all(abs(t.num_tokens - 3000) <= 60 for t in trials[task])
    assert all(len(tokenizer.encode(t.prompt)) == t.num_tokens for t in trials[task])
    short = make_trials(tokenizer, task, 800, 3, seed=1)
    assert all(abs(t.num_tokens - 800) <= 40 for t in short), [t.num_tokens for t in short]


@pytest.mark.parametrize("task", TASKS)
def test_needles_sit_at_their_depths_once(trials, task):
    for t in trials[task]:
        for depth, needle in zip(t.depths, t.needles):
            assert t.document.count(needle) == 1 and t.prompt.count(needle) == 1
            position = t.document.index(needle) / len(t.document)
            assert abs(position - depth) < 0.04, (needle, depth, position)
        for answer in t.answers:
            assert answer in t.document


def test_single_needle_depths_spread_over_the_document(trials):
    for task in ("needle-last", "needle-first"):
        assert [t.depths for t in trials[task]] == [(i / 6,) for i in range(7)]
    assert all(t.depths[:3] == tuple((k + i / 6) / 3 for k in range(3))
               for i, t in enumerate(trials["multi-needle"]))


def test_question_comes_after_or_before_the_document(trials):
    for last, first in zip(trials["needle-last"], trials["needle-first"]):
        question = last.prompt[last.prompt.index("Question:"):].split("\n")[0]
        assert last.prompt.index(question) > last.prompt.index(last.document) + len(
            last.document) - 1
        question = first.prompt[first.prompt.index("Question:"):].split("\n")[0]
        end_of_document = first.prompt.index(first.document) + len(first.document)
        assert first.prompt.index(question) < first.prompt.index(first.document)
        assert "Question" not in first.prompt[end_of_document:]
        assert "?" not in first.prompt[end_of_document:]


def test_questions_are_worded_unlike_their_needles():
    for fact in retrieval.FACTS:
        needle_words = set(fact.needle.lower().rstrip(".").split())
        question_words = set(fact.question.lower().rstrip("?").split())
        assert len(question_words - needle_words) >= len(question_words) / 2, fact


def test_prompts_end_in_the_assistant_turn(trials):
    for task_trials in trials.values():
        for t in task_trials:
            assert "<|im_start|>assistant\n" in t.prompt[-200:]
            assert not t.prompt.endswith((" ", "\n"))


def _trial(answers) -> Trial:
    return Trial(task="multi-needle", prompt="", answers=tuple(answers), depths=(0.0,) * 3,
                 needles=(), document="", num_tokens=0, source="pydoc")


def test_score_wants_every_answer_in_order():
    t = _trial(["11111", "22222", "33333"])
    assert score(t, " 11111, 22222 and 33333.") and partial(t, " 11111, 22222 and 33333.") == 1
    assert not score(t, " 22222, 11111 and 33333.")
    assert partial(t, " 22222, 11111 and 33333.") == 1
    assert not score(t, " 11111 and 22222.") and partial(t, " 11111 and 22222.") == 2 / 3
    assert not score(t, " 111112, 22222, 33333") and partial(t, " 123456") == 0
    single = dataclasses.replace(t, answers=("48291",))
    assert score(single, " 48291.") and not score(single, " 48292, 48291")
    assert not score(single, " 482910") and not score(single, "")


def test_same_seed_same_trials_other_seed_other_trials(tokenizer, trials):
    for task in TASKS:
        again = make_trials(tokenizer, task, 3000, 7, seed=5)
        assert again == trials[task]
        other = make_trials(tokenizer, task, 3000, 7, seed=6)
        assert all(a.prompt != b.prompt for a, b in zip(other, trials[task]))


def test_sources_rotate_and_haystacks_differ(trials):
    for task_trials in trials.values():
        assert [t.source for t in task_trials] == [texts.SOURCES[i % 3] for i in range(7)]
        haystacks = set()
        for t in task_trials:
            haystack = t.document
            for needle in t.needles:
                haystack = haystack.replace(needle, "")
            haystacks.add(haystack)
        assert len(haystacks) == len(task_trials)
    firsts = {t.document[:200] for task_trials in trials.values() for t in task_trials}
    assert len(firsts) == sum(len(v) for v in trials.values())


def test_haystacks_read_as_prose_without_long_numbers():
    for source in texts.SOURCES:
        stream = texts.paragraphs(source, random.Random(0))
        paras = [next(stream) for _ in range(40)]
        assert len({" ".join(p) for p in paras}) > 30
        for para in paras:
            text = " ".join(para)
            assert text.endswith((".", "!", "?"))
            assert not any(w.isdigit() and len(w) >= 4 for w in text.replace(".", " ").split())


def test_bad_arguments_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown retrieval task"):
        make_trials(tokenizer, "needle", 1000, 2)
    with pytest.raises(ValueError, match="unknown text source"):
        next(texts.paragraphs("wikipedia", random.Random(0)))


def test_var_chain_partial_counts_links_named_in_order(trials):
    t = trials["var-chain"][0]
    hop, start, value = t.chain
    assert t.answers == (value,) and f"VAR {hop} = VAR {start}." in t.needles
    assert partial(t, f" {hop}.") == 1 / 3 and not score(t, f" {hop}.")
    assert partial(t, f" {hop} = VAR {start} = {value}.") == 1 and score(t, f" {hop} = {value}")
    assert partial(t, f" {start} = {value}") == 0 and partial(t, " X = VAR Y = 12345") == 0


def test_answer_pages_counts_the_pages_an_answer_spans():
    from vllm_kvevict.eval.retrieval import answer_pages

    class Chars:  # one token per character
        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    trial = Trial(task="needle-last", prompt="abc12345xyz 777", answers=("12345", "99"),
                  depths=(0.5,), needles=("",), document="", num_tokens=15, source="docs")
    assert answer_pages(Chars(), trial, 4) == [2, None]  # tokens 3..7: pages 0 and 1
    assert answer_pages(Chars(), trial, 8) == [1, None]
    assert answer_pages(Chars(), trial, 2) == [3, None]


def test_answers_are_found_whole_in_the_prompt(tokenizer, trials):
    from vllm_kvevict.eval.retrieval import answer_pages

    for task in ("needle-last", "needle-first", "multi-needle"):
        for t in trials[task]:
            assert all(p in (1, 2) for p in answer_pages(tokenizer, t, 32)), t.answers
