"""The soak's traffic: the seeded request mix and one client per request (``requests``)."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time

BAD_KINDS = ("too_long", "temperature", "top_p", "max_tokens", "n")
WORDS = ("river stone light paper window garden music number orange cloud silver market "
         "letter summer engine forest bridge candle yellow travel winter doctor planet "
         "island mirror pocket rabbit ticket violin wonder").split()


@dataclasses.dataclass
class Spec:
    """One request of the mix."""
    index: int
    api: str  # "completion" | "chat"
    stream: bool
    prompt_tokens: int  # target length (the server reports the real one)
    max_tokens: int
    n: int = 1
    stop: list[str] | None = None
    action: str = "normal"  # normal | disconnect | abort | bad
    bad: str | None = None
    abort_after_s: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.n == 1 and self.action == "normal"


def make_mix(num_requests: int, max_model_len: int, seed: int) -> list[Spec]:
    """The seeded request mix (see the module docstring)."""
    rng = random.Random(seed)
    specs = []
    for i in range(num_requests):
        max_tokens = 1 if rng.random() < 0.1 else rng.choice([4, 8, 16, 32, 64])
        room = max_model_len - max_tokens - 40  # chat template and tokenization slack
        if i % 40 >= 34:  # a burst of 6 long prompts in every 40
            length = rng.randint(room // 2, room)
        else:
            length = int(math.exp(rng.uniform(math.log(3), math.log(room))))
        spec = Spec(i, "chat" if rng.random() < 0.4 else "completion", rng.random() < 0.5,
                    length, max_tokens)
        roll = rng.random()
        if roll < 0.08:
            spec.n = 2
        elif roll < 0.20:
            spec.stop = [rng.choice([".", "\n", " the"])]
        roll = rng.random()
        if roll < 0.08 and spec.stream:
            spec.action, spec.max_tokens = "disconnect", max(spec.max_tokens, 16)
        elif roll < 0.10 and not spec.stream:
            spec.action, spec.abort_after_s = "abort", rng.uniform(0.05, 1.0)
        elif roll < 0.13:
            spec.action, spec.bad = "bad", rng.choice(BAD_KINDS)
        specs.append(spec)
    return specs


def prompt_text(tokenizer, spec: Spec, max_model_len: int) -> str:
    """A prompt of about ``spec.prompt_tokens`` tokens (past ``max_model_len`` for a too-long
    bad request), distinct from its first line (no prefix reuse between requests)."""
    rng = random.Random(spec.index)
    target = max_model_len + 64 if spec.bad == "too_long" else spec.prompt_tokens
    head = f"Request {spec.index}."
    words = [rng.choice(WORDS) for _ in range(target)]
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    body = tokenizer.decode(ids[:max(0, target - 4)])
    return f"{head}\n{body}" if body else head


def payload(spec: Spec, prompt: str) -> tuple[str, dict]:
    body = {"model": "m", "max_tokens": spec.max_tokens, "temperature": 0.0, "n": spec.n,
            "stream": spec.stream, "return_token_ids": True}
    if spec.n > 1:
        body.update(temperature=0.8, seed=spec.index)
    if spec.stop:
        body["stop"] = spec.stop
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    if spec.bad == "temperature":
        body["temperature"] = -1.0
    elif spec.bad == "top_p":
        body["top_p"] = 1.5
    elif spec.bad == "max_tokens":
        body["max_tokens"] = -3
    elif spec.bad == "n":
        body["n"] = 0
    if spec.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def _text(choice: dict, chat: bool, delta: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    part = choice.get("delta" if delta else "message") or {}
    return part.get("content") or ""


def send(base: str, spec: Spec, prompt: str) -> dict:
    """Run one request; returns its outcome (status, texts, usage, latency, errors)."""
    import requests

    path, body = payload(spec, prompt)
    chat = spec.api == "chat"
    out = {"index": spec.index, "status": None, "outcome": "completed", "texts": None,
           "prompt_tokens": None, "error": None, "prompt_ids": None, "token_ids": []}
    start = time.perf_counter()
    timeout = (10, spec.abort_after_s) if spec.action == "abort" else (10, 900)
    try:
        response = requests.post(base + path, json=body, stream=spec.stream, timeout=timeout)
        out["status"] = response.status_code
        if response.status_code != 200:
            out["outcome"] = "rejected"
            try:
                out["error"] = response.json().get("error", {}).get("message")
            except ValueError:
                out["error"] = response.text[:300]
            return out
        texts = [""] * spec.n
        if not spec.stream:
            reply = response.json()
            for choice in reply["choices"]:
                texts[choice["index"]] = _text(choice, chat, delta=False)
            _take_ids(out, reply)
            out["prompt_tokens"] = reply["usage"]["prompt_tokens"]
        else:
            chunks = 0
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out["outcome"], out["error"] = "stream_error", str(event["error"])[:300]
                    return out
                _take_ids(out, event)
                for choice in event.get("choices") or ():
                    piece = _text(choice, chat, delta=True)
                    texts[choice["index"]] += piece
                    chunks += bool(piece)
                if event.get("usage"):
                    out["prompt_tokens"] = event["usage"]["prompt_tokens"]
                if spec.action == "disconnect" and chunks >= 2:
                    response.close()
                    out["outcome"] = "disconnected"
                    return out
        out["texts"] = texts
        out["latency_s"] = time.perf_counter() - start
    except requests.exceptions.ReadTimeout:
        out["outcome"] = "aborted" if spec.action == "abort" else "timeout"
    except requests.exceptions.RequestException as e:
        out["outcome"], out["error"] = "connection_error", f"{type(e).__name__}: {e}"[:300]
    return out


def _take_ids(out: dict, reply: dict) -> None:
    """Prompt and first-choice token ids of a response or stream event (``return_token_ids``:
    the prompt's on the response (chat) or on the choice (completions))."""
    if reply.get("prompt_token_ids"):
        out["prompt_ids"] = reply["prompt_token_ids"]
    for choice in reply.get("choices") or ():
        if choice.get("prompt_token_ids"):
            out["prompt_ids"] = choice["prompt_token_ids"]
        if choice.get("index") == 0 and choice.get("token_ids"):
            out["token_ids"] += choice["token_ids"]
