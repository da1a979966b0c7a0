"""Wrapping vLLM's methods in place: the one way the plugin hooks code that has no extension
point."""
from __future__ import annotations

import functools
from typing import Any, Callable

_ORIGINAL = "__kvevict_original__"  # set on our wrappers: marks them and keeps the original


def wrap_method(cls, name: str, hook: Callable[..., Any]) -> None:
    """Replace ``cls.name`` (a class's method or a module's function) by a wrapper calling
    ``hook(original, *args, **kwargs)``.

    Keeps staticmethod/classmethod kinds (a classmethod's hook receives ``cls`` after
    ``original``). Wrapping an attribute that is already our wrapper does nothing.
    """
    raw = vars(cls)[name]
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    original = raw.__func__ if kind else raw
    if hasattr(original, _ORIGINAL):
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return hook(original, *args, **kwargs)

    setattr(wrapper, _ORIGINAL, original)
    setattr(cls, name, kind(wrapper) if kind else wrapper)
