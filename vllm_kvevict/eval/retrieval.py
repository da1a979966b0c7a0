"""Retrieval from natural prose: needles worded unlike their questions, several needles, and
variable chains, hidden in haystacks of real text (see ``texts`` for the sources).

The classic passkey test repeats one filler sentence, so any page that is not filler stands out;
here the haystack is prose of the same kind as the needle, which is harder for page selection.

Tasks (``TASKS``):

- ``needle-last``: one fact sentence at a depth spread over the trials; the question comes
  after the document and does not repeat the fact's wording.
- ``needle-first``: the same, but the question comes before the document and nothing but the
  answer cue follows it.
- ``multi-needle``: three facts ("The secret number of <label> is <number>.") spread over the
  document, asked for in one answer in a shuffled order; exact = all three in the asked order,
  ``partial`` = the share of them that appear.
- ``var-chain``: a RULER-style chain ``VAR A = number``, ``VAR B = VAR A``, ``VAR C = VAR B``
  spread over the document, plus a one-hop distractor chain with another number; the question
  asks for ``C``'s chain and number; exact = the number, ``partial`` = the share of the links
  ``B, A, number`` the answer names in order.

Every prompt uses the model's chat template, and the assistant turn starts with an answer cue,
so greedy decoding writes the answer first. For the single needles the cue is the fact's own
words up to the number ("Answer: The code that opens the north archive was reset to"): the
question is a paraphrase, but the bundled 135M model cannot answer one without that cue (full
attention, ~3k tokens, 8 trials: 2/8 after "The number is" vs 8/8 with the cue, question last;
1/8 vs 8/8 question first). It does not link several facts or walk a chain in one answer
(multi-needle and var-chain: it names the first fact or link at best), so those two tasks are
scored with partial credit as well. An answer format example in the var-chain question made it
worse (the model copies the example: 2 links named in 10 trials vs 6 without). Trial ``i``
takes its haystack from source ``texts.SOURCES[i % 3]``, so each cell mixes the sources.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import re

from vllm_kvevict.eval import texts

TASKS = ("needle-last", "needle-first", "multi-needle", "var-chain")
_MAX_TOKENS = {"needle-last": 10, "needle-first": 10, "multi-needle": 32, "var-chain": 24}
_NUMBER = re.compile(r"(?<!\d)\d{5}(?!\d)")
_LINK = re.compile(r"\b(?!VAR\b)[A-Z]{5}\b|(?<!\d)\d{5}(?!\d)")  # a variable or a number


@dataclasses.dataclass(frozen=True)
class Fact:
    """A needle sentence (with ``{n}`` for the number), a question worded unlike it, and the
    short label used when several facts are asked for at once."""
    needle: str
    question: str
    label: str

    @property
    def cue(self) -> str:
        """The needle's words before the number: the answer starts with them."""
        return self.needle.split("{n}")[0].strip()


FACTS = (
    Fact("The code that opens the north archive was reset to {n} last spring.",
         "Which number gets someone into the north archive?", "the north archive"),
    Fact("Mira keeps her bicycle chained with a lock that opens on {n}.",
         "What number unlocks Mira's bike?", "Mira's bike lock"),
    Fact("The night ferry to Hollow Point always leaves from quay {n}.",
         "Which pier number does the boat to Hollow Point depart at?", "the Hollow Point quay"),
    Fact("Doctor Ansel filed the blood test results under record {n}.",
         "Under what number are Ansel's lab findings stored?", "Ansel's lab record"),
    Fact("Someone scratched the figure {n} into the door of the lighthouse lamp room.",
         "What number was carved at the top of the lighthouse?", "the lighthouse carving"),
    Fact("Grandfather Otto buried his savings tin {n} paces from the well.",
         "How many steps from the well is Otto's money hidden?", "Otto's hidden tin"),
    Fact("The museum's missing painting was last listed in the catalogue as item {n}.",
         "What catalogue entry belonged to the lost museum picture?", "the missing painting"),
    Fact("Lena's new phone extension at the observatory is {n}.",
         "Which number should you dial to reach Lena at the telescope building?",
         "Lena's extension"),
    Fact("The shipment of winter coats was tracked under parcel {n}.",
         "What tracking number did the delivery of warm jackets have?", "the coat parcel"),
    Fact("At the harvest fair the prize pumpkin weighed in at ticket {n}.",
         "Which ticket number did the winning pumpkin get at the fair?", "the prize pumpkin"),
)

_READ = "Read the following text carefully."


@dataclasses.dataclass(frozen=True)
class Trial:
    """One prompt; ``answers`` in the order asked, ``needles`` the inserted sentences
    (distractors included) and ``depths`` theirs (0 = start, 1 = end of the document);
    ``chain`` (var-chain only) the links from the asked variable to the number."""
    task: str
    prompt: str
    answers: tuple[str, ...]
    depths: tuple[float, ...]
    needles: tuple[str, ...]
    document: str
    num_tokens: int
    source: str
    chain: tuple[str, ...] = ()


def max_tokens(task: str) -> int:
    """Greedy tokens enough for the task's answer."""
    return _MAX_TOKENS[task]


def make_trials(tokenizer, task: str, num_tokens: int, num_trials: int,
                seed: int = 0) -> list[Trial]:
    """``num_trials`` prompts of about ``num_tokens`` tokens (within 2% or one sentence).

    Needle depths are spread evenly over the trials; trial ``i`` draws its haystack from
    source ``i % 3``; numbers, facts and haystacks come from ``seed`` (and the task and length).
    """
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task {task!r}; known: {', '.join(TASKS)}")
    if num_trials < 1:
        raise ValueError(f"num_trials must be >= 1, got {num_trials}")
    rng = random.Random(f"{seed}/{task}/{num_tokens}")
    num_sources = len(texts.SOURCES)
    phases = [rng.random() for _ in texts.SOURCES]
    trials = []
    for i in range(num_trials):
        spread = i / max(1, num_trials - 1)
        # The j-th of a source's k trials starts j/k of the way round its text (so no two match).
        j, k = i // num_sources, len(range(i % num_sources, num_trials, num_sources))
        offset = (phases[i % num_sources] + j / k) % 1.0
        trials.append(_make_trial(tokenizer, task, num_tokens, spread,
                                  texts.SOURCES[i % num_sources],
                                  random.Random(rng.getrandbits(64)), offset))
    return trials


def answer_pages(tokenizer, trial: Trial, page_size: int) -> list[int | None]:
    """How many pages of ``page_size`` tokens each answer's tokens span where the prompt first
    holds them (2: the number is cut by a page boundary; None: not found as whole tokens)."""
    ids = tokenizer.encode(trial.prompt)
    spans = []
    for answer in trial.answers:
        word = tokenizer.encode(answer, add_special_tokens=False)
        at = next((i for i in range(len(ids) - len(word) + 1) if ids[i:i + len(word)] == word),
                  None)
        spans.append(None if at is None
                     else (at + len(word) - 1) // page_size - at // page_size + 1)
    return spans


def score(trial: Trial, completion: str) -> bool:
    """Exact: the completion's first 5-digit numbers are the answers, in the asked order."""
    return _NUMBER.findall(completion)[:len(trial.answers)] == list(trial.answers)


def partial(trial: Trial, completion: str) -> float:
    """The share of the answers that appear anywhere among the completion's 5-digit numbers;
    for var-chain, the share of the chain's links (next variable, first variable, number)
    that the completion names from its start, in order."""
    if trial.chain:
        words = _LINK.findall(completion)
        done = next((k for k, (w, link) in enumerate(zip(words, trial.chain)) if w != link),
                    min(len(words), len(trial.chain)))
        return done / len(trial.chain)
    numbers = set(_NUMBER.findall(completion))
    return sum(a in numbers for a in trial.answers) / len(trial.answers)


def _make_trial(tokenizer, task, num_tokens, spread, source, rng, offset) -> Trial:
    numbers = [str(n) for n in rng.sample(range(10000, 100000), 3)]
    if task in ("needle-last", "needle-first"):
        fact = rng.choice(FACTS)
        needles = [(spread, fact.needle.format(n=numbers[0]))]
        answers = [numbers[0]]
        question = f"Question: {fact.question} The answer is a 5-digit number."
        cue = f"Answer: {fact.cue}"
        if task == "needle-last":
            parts = (f"{_READ} One sentence in it holds a 5-digit number that you will be "
                     "asked about.", question, cue)
        else:
            parts = (f"{question} It is written somewhere in the text below. {_READ}", None, cue)
    elif task == "multi-needle":
        facts = rng.sample(FACTS, 3)
        needles = [((k + spread) / 3, f"The secret number of {f.label} is {n}.")
                   for k, (f, n) in enumerate(zip(facts, numbers))]
        asked = rng.sample(range(3), 3)
        answers = [numbers[k] for k in asked]
        labels = [facts[k].label for k in asked]
        parts = (f"{_READ} It mentions several secret 5-digit numbers.",
                 f"Question: What are the secret numbers of {labels[0]}, {labels[1]} and "
                 f"{labels[2]}? List them in exactly this order.",
                 f"Answer: The secret number of {labels[0]} is")
    else:
        target, hop, start, decoy, decoy_hop = _variable_names(rng, 5)
        needles = [(spread / 3, f"VAR {start} = {numbers[0]}."),
                   ((1 + spread) / 3, f"VAR {hop} = VAR {start}."),
                   ((2 + spread) / 3, f"VAR {target} = VAR {hop}."),
                   (rng.random(), f"VAR {decoy} = {numbers[1]}."),
                   (rng.random(), f"VAR {decoy_hop} = VAR {decoy}.")]
        answers = [numbers[0]]
        chain = (hop, start, numbers[0])
        parts = (f"{_READ} It assigns values to some variables.",
                 f"Question: Which variable is VAR {target} set to, which is that one set to, "
                 "and what number is at the end of the chain?",
                 f"Answer: VAR {target} = VAR")
    trial = _fit(tokenizer, task, num_tokens, source, rng, offset, needles, answers, *parts)
    return dataclasses.replace(trial, chain=chain) if task == "var-chain" else trial


def _variable_names(rng: random.Random, count: int) -> list[str]:
    letters = "BCDFGHJKLMNPQRSTVWXZ"
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(letters) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def _fit(tokenizer, task, num_tokens, source, rng, offset, needles, answers, head, tail,
         prefix) -> Trial:
    """The prompt whose haystack length brings it closest to ``num_tokens`` tokens."""
    sentences: list[tuple[int, str]] = []  # (paragraph index, sentence)
    stream = texts.paragraphs(source, rng, offset)
    approx = 0
    while approx < num_tokens * 1.1 + 200:
        para = next(stream)
        sentences += [(len(sentences), s) for s in para]  # paragraph id: its first index
        approx += len(tokenizer.encode(" ".join(para)))

    def render(count: int) -> tuple[str, str]:
        document = _insert(sentences[:count], needles)
        body = f"{head}\n\n{document}" + (f"\n\n{tail}" if tail else "")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": body}],
                                               tokenize=False, add_generation_prompt=True)
        return prompt + prefix, document

    lo, hi = 1, len(sentences)
    while lo < hi:  # the largest count whose prompt fits in num_tokens
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(render(mid)[0])) <= num_tokens:
            lo = mid
        else:
            hi = mid - 1
    best = min((lo, min(lo + 1, len(sentences))),
               key=lambda c: abs(len(tokenizer.encode(render(c)[0])) - num_tokens))
    prompt, document = render(best)
    return Trial(task=task, prompt=prompt, answers=tuple(answers),
                 depths=tuple(d for d, _ in needles), needles=tuple(s for _, s in needles),
                 document=document, num_tokens=len(tokenizer.encode(prompt)), source=source)


def _insert(sentences: list[tuple[int, str]], needles: list[tuple[float, str]]) -> str:
    """Sentences joined into paragraphs, each needle placed at the sentence boundary nearest to
    its depth (as a share of the haystack's characters), inside that sentence's paragraph."""
    ends = list(itertools.accumulate(len(s) + 1 for _, s in sentences))
    total = ends[-1]
    starts = [0] + ends[:-1]
    slots: dict[int, list[str]] = {}
    for depth, needle in sorted(needles):
        slot = min(range(len(sentences) + 1),
                   key=lambda i: abs((starts[i] if i < len(sentences) else total) - depth * total))
        slots.setdefault(slot, []).append(needle)
    paras: list[list[str]] = []
    last_pid = None
    for i, (pid, sentence) in enumerate(sentences):
        if pid != last_pid:
            paras.append([])
            last_pid = pid
        paras[-1] += slots.get(i, []) + [sentence]
    paras[-1] += slots.get(len(sentences), [])
    return "\n\n".join(" ".join(p) for p in paras)
