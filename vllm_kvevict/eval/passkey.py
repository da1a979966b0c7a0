"""Passkey retrieval: a 5-digit key hidden at a chosen depth of repetitive filler text.

The prompt follows the classic format (Mohtashami & Jaggi, 2023; used by ArkVale's benchmarks):
an instruction, filler sentences, the key sentence at ``depth`` (0 = start, 1 = end of the filler),
more filler, then the question, ending where the model should write the key.
"""
from __future__ import annotations

import dataclasses
import random
import re

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about the important information there.\n")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.\n")
QUESTION = "What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyTrial:
    prompt: str
    passkey: str
    depth: float
    num_tokens: int


def _needle(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key.\n"


def make_trial(tokenizer, num_tokens: int, depth: float, passkey: str) -> PasskeyTrial:
    """A prompt of about ``num_tokens`` tokens (within one filler sentence) with the key at
    ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    fixed = len(tokenizer.encode(INSTRUCTION + _needle(passkey) + QUESTION))
    per_filler = len(tokenizer.encode(FILLER * 10)) / 10
    num_fillers = max(1, round((num_tokens - fixed) / per_filler))
    before = round(num_fillers * depth)
    prompt = (INSTRUCTION + FILLER * before + _needle(passkey) + FILLER * (num_fillers - before)
              + QUESTION)
    return PasskeyTrial(prompt=prompt, passkey=passkey, depth=depth,
                        num_tokens=len(tokenizer.encode(prompt)))


def make_trials(tokenizer, num_tokens: int, num_trials: int, seed: int = 0,
                depths: list[float] | None = None) -> list[PasskeyTrial]:
    """``num_trials`` trials with depths spread evenly over [0, 1] unless given."""
    rng = random.Random(seed * 1_000_003 + num_tokens)
    if depths is None:
        depths = [i / max(1, num_trials - 1) for i in range(num_trials)]
    return [make_trial(tokenizer, num_tokens, d, str(rng.randint(10000, 99999))) for d in depths]


def found(trial: PasskeyTrial, completion: str) -> bool:
    """True when the first 5-digit number of the completion is the key."""
    match = re.search(r"\d{5}", completion)
    return match is not None and match.group(0) == trial.passkey
