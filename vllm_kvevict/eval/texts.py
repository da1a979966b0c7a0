"""Natural prose for retrieval haystacks, from three sources available offline at run time.

Sources (nothing is downloaded; the two interpreter sources are read from the running Python, so
their text follows its version):

- ``pydoc``: the Python language reference prose bundled with CPython in
  ``pydoc_data.topics`` (the text ``help("if")`` shows). Python Software Foundation License.
- ``docstrings``: docstrings of a fixed list of pure-Python standard-library modules, an
  API-documentation style. Part of CPython, Python Software Foundation License.
- ``narrative``: a seeded generator of everyday narrative prose (people, places, errands,
  weather) written for this project; covered by the project's own licence.

Every source yields paragraphs as lists of sentences. Paragraphs keep only prose: code blocks,
headings, grammar rules and numbers of four or more digits (which could be mistaken for a needle)
are left out.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import warnings
from typing import Iterator

SOURCES = ("pydoc", "docstrings", "narrative")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_HEADING_RULE = re.compile(r"^[*=\-~^#]{3,}$")
_DOC_MODULES = (
    "argparse", "asyncio.locks", "asyncio.queues", "asyncio.tasks", "calendar", "collections",
    "configparser", "contextlib", "csv", "dataclasses", "datetime", "difflib", "email.message",
    "enum", "fractions", "functools", "gettext", "heapq", "http.client", "http.cookiejar",
    "imaplib", "inspect", "ipaddress", "json", "logging", "logging.handlers", "mailbox",
    "optparse", "pathlib", "pickle", "pprint", "queue", "random", "sched", "selectors", "shutil",
    "smtplib", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tokenize", "trace", "typing", "unittest.case", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "zipfile")


def paragraphs(source: str, rng: random.Random,
               offset: float | None = None) -> Iterator[list[str]]:
    """Endless paragraphs (lists of sentences) of ``source``.

    The interpreter sources read their corpus from ``offset`` (a fraction of the way round it;
    random from ``rng`` if None) onwards, wrapping around, so consecutive paragraphs stay in
    their original order; ``narrative`` generates new paragraphs from ``rng``.
    """
    if source == "narrative":
        while True:
            yield _story_paragraph(rng)
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r}; known: {', '.join(SOURCES)}")
    corpus = _pydoc_corpus() if source == "pydoc" else _docstring_corpus()
    start = rng.randrange(len(corpus)) if offset is None else int(offset * len(corpus))
    while True:
        for i in range(len(corpus)):
            yield corpus[(start + i) % len(corpus)]


def _prose_paragraphs(text: str) -> list[list[str]]:
    """The prose paragraphs of reStructuredText-like ``text``, each split into sentences."""
    result = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line[:1].isspace() or _HEADING_RULE.match(line.strip()) for line in lines):
            continue  # code, grammar, indented notes, or a heading
        para = " ".join(line.strip() for line in lines).strip()
        if (len(para) < 80 or not para.endswith(".") or ">>>" in para or "::" in para
                or re.search(r"\d{4,}", para) or para.count("(") > 6
                or sum(ch.isalpha() or ch == " " for ch in para) < 0.88 * len(para)):
            continue
        sentences = [s for s in _SENTENCE_END.split(para) if s]
        if len(sentences) >= 2:
            result.append(sentences)
    return result


@functools.lru_cache(maxsize=1)
def _pydoc_corpus() -> list[list[str]]:
    from pydoc_data.topics import topics

    return [p for key in sorted(topics) for p in _prose_paragraphs(topics[key])]


@functools.lru_cache(maxsize=1)
def _docstring_corpus() -> list[list[str]]:
    docs = []
    for name in _DOC_MODULES:
        with warnings.catch_warnings():  # typing.io and the like warn when read
            warnings.simplefilter("ignore", DeprecationWarning)
            docs += _module_docstrings(name)
    seen, unique = set(), []
    for p in (p for doc in docs for p in _prose_paragraphs(doc)):
        if " ".join(p) not in seen:  # inherited and copied docstrings repeat
            seen.add(" ".join(p))
            unique.append(p)
    return unique


def _module_docstrings(name: str) -> list[str]:
    """The docstrings of module ``name``, its classes, functions and methods, by name."""
    module = importlib.import_module(name)
    docs = [module.__doc__ or ""]
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != name or not (
                inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            docs += [inspect.getdoc(member) or "" for _, member in sorted(vars(obj).items())
                     if inspect.isfunction(member) and member.__doc__]
    return docs


_PEOPLE = ("Anna", "Tomas", "Leila", "Grace", "Ruben", "Priya", "Oskar", "Helen", "Marcus",
           "Ines", "Felix", "Noor", "Daniel", "Sofia", "Kwame", "Elena", "Hugo", "Yuki", "Pavel",
           "Clara", "Jonah", "Amara", "Victor", "Lucia")
_PLACES = ("the harbour town", "the valley village", "the old mill district", "the river market",
           "the hill farm", "the coastal path", "the station square", "the botanical garden",
           "the school library", "the bakery on Elm Street", "the county fair", "the boatyard",
           "the mountain hut", "the town hall", "the orchard", "the bus depot")
_JOBS = ("a carpenter", "a nurse", "a schoolteacher", "a baker", "a fisherman", "a mechanic",
         "a librarian", "a gardener", "a painter", "a postal worker", "a violin maker",
         "a bookkeeper", "a beekeeper", "a tailor")
_TIMES = ("That morning", "Early on Tuesday", "On the first day of the month", "Late that autumn",
          "One windy afternoon", "Just after sunrise", "On a quiet Sunday", "Towards evening",
          "In the middle of the week", "On the day of the spring market")
_SKIES = ("a thin rain fell over the rooftops", "a warm wind dried the streets by noon",
          "snow lay on the fences and the air smelled of smoke",
          "long shadows stretched across the fields", "fog hid the far end of the street",
          "even the dogs stayed in the shade", "the river ran high and brown after the storms",
          "the bells of the chapel could be heard across the water",
          "the first swallows of the year circled the square",
          "frost had turned the puddles to glass")
_ERRANDS = ("buy flour and a new kettle", "return a borrowed ladder", "mend a torn sail",
            "collect a parcel of seeds", "visit an aunt who had been unwell",
            "look for a lost grey cat", "deliver a basket of apples", "fix a squeaking gate",
            "sell a cart of firewood", "find a book about birds", "repair a broken clock",
            "paint the front door blue", "ask about a room to rent", "sharpen a set of knives",
            "pick up medicine for a neighbour", "bring soup to the night watchman",
            "bargain for a second-hand stove", "post a letter to a cousin abroad")
_THOUGHTS = ("{p} wondered whether the winter would be as long as the last one.",
             "{p} remembered a song from childhood and hummed it quietly.",
             "{p} thought about writing a letter to an old friend in the city.",
             "{p} decided that the garden needed more roses next year.",
             "{p} felt tired but pleased with the work of the day.",
             "{p} could not stop thinking about the argument from the night before.",
             "{p} made a note to save some money for a trip to the sea.",
             "{p} wished the old bridge had not been torn down.",
             "{p} began to plan a small party for {q}'s birthday.")
_MEETINGS = ("On the way, {p} met {q}, {j}, who talked at length about the price of timber.",
             "Near {place}, {p} ran into {q}, who was carrying a heavy sack of potatoes.",
             "{q}, {j} from {place}, stopped {p} to ask for directions.",
             "At {place}, {p} shared a pot of tea with {q} and heard the latest news.",
             "{p} waved to {q}, who was busy sweeping the steps outside {place}.",
             "Outside {place}, {q} was arguing with a driver about a dented crate.",
             "{p} helped {q}, {j}, carry a table up a narrow flight of stairs.")
_ENDINGS = ("By evening the task was done, and {p} walked home slowly.",
            "The errand took longer than planned, because the road was closed for repairs.",
            "In the end {p} left the matter for another day and went to bed early.",
            "Later, {q} came by to say thank you, and the two of them laughed about the day.",
            "Nobody in {place} noticed, but {p} was quietly proud of what had been done.")


def _story_paragraph(rng: random.Random) -> list[str]:
    p, q = rng.sample(_PEOPLE, 2)
    slots = {"p": p, "q": q, "j": rng.choice(_JOBS), "place": rng.choice(_PLACES)}
    sentences = [f"{rng.choice(_TIMES)}, {rng.choice(_SKIES)}.",
                 f"{p}, {rng.choice(_JOBS)}, set out for {rng.choice(_PLACES)} to "
                 f"{rng.choice(_ERRANDS)}."]
    middle = [rng.choice(_MEETINGS), rng.choice(_THOUGHTS), rng.choice(_MEETINGS)]
    sentences += [s.format(**slots) for s in middle[:rng.randint(1, 3)]]
    sentences.append(rng.choice(_ENDINGS).format(**slots))
    return [s[0].upper() + s[1:] for s in sentences]
