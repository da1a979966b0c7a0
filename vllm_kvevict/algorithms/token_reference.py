"""Token-level references of h2o, tova, roco, snapkv, lra and lfa, and the page-level decisions
they become.

Both simulate one layer of one request on the same inputs, the post-RoPE queries and keys of a
sequence computed with full attention: the prompt ends at ``prompt_len`` and every later position
is a decode step. Both seed the statistics with the last ``observation_window`` prompt queries,
keep ``budget`` tokens from the prompt's end on, and pin the first ``sink`` and the last
``window`` tokens.

* :func:`token_level_keep` follows the definitions token by token and KV head by KV head
  (EasyKV): each decode query's attention over the kept tokens (GQA: mean over the group) updates
  each token's statistics, and one token per head is evicted whenever the cache exceeds the budget.
  lra/lfa: a query attends a token whose probability is above ``1 / n``, ``n`` the tokens the
  head has kept and the query sees (with the margin of the page rule).
* :func:`page_level_keep` uses the plugin's own scoring (:mod:`.attention_stats` and the
  policies' ``score``) on pages of ``page_size`` tokens, one decision per layer, as the engine does.

The result of each is a ``[num_kv_heads, T]`` bool mask of the tokens kept after the last step.
"""
from __future__ import annotations

import torch

from vllm_kvevict.algorithms.attention_stats import (ATTENDED, COUNT, LAST, LAST_ATTENDED,
                                                     NUM_STATS, SQUARES, TOTAL, PageAttentionStats,
                                                     accumulate, attended, latest_use,
                                                     page_attention_mass)
from vllm_kvevict.algorithms.selection import topk_prefer_recent
from vllm_kvevict.paging import cdiv

ROCO_PROTECTED_SLOTS = 10  # EasyKV protects the last 10 slots from RoCo's deviation scope


def _token_probs(query: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """``[kv_heads, T]`` attention of one query ``[q_heads, d]`` over ``keys [T, kv_heads, d]``
    restricted per head to ``kept [kv_heads, T]`` (GQA: mean over each group)."""
    num_kv_heads = keys.shape[1]
    q = query.float().reshape(num_kv_heads, -1, query.shape[-1])
    logits = torch.einsum("hgd,thd->hgt", q, keys.float()) * scale
    logits = logits.masked_fill(~kept[:, None, :], float("-inf"))
    return logits.softmax(-1).mean(1)


def _single_score(policy: str, head_stats: torch.Tensor) -> torch.Tensor:
    """Per-token score (higher = keep) of the one-statistic rules from ``[NUM_STATS, T]``."""
    row = {"tova": LAST, "lra": LAST_ATTENDED, "lfa": ATTENDED}.get(policy, TOTAL)
    return head_stats[row]  # h2o, snapkv: accumulated attention


def _token_victim(policy: str, stats: torch.Tensor, kept: torch.Tensor, t: int, sink: int,
                  window: int, budget: int) -> int:
    """The token one KV head evicts at step ``t`` (all tokens ``<= t`` exist)."""
    total, squares, count = stats[TOTAL], stats[SQUARES], stats[COUNT]
    positions = torch.arange(kept.numel())
    candidates = kept & (positions >= sink) & (positions <= t - window)
    if policy == "roco":
        mean = total / count.clamp(min=1)
        sigma = (squares / count.clamp(min=1) - mean * mean).clamp(min=0).sqrt()
        recent = positions > t - max(window, ROCO_PROTECTED_SLOTS)
        protected = kept & ((positions < sink) | recent)
        sigma = sigma.masked_fill(protected | ~kept, float("inf"))
        scope = torch.zeros_like(kept)
        scope[sigma.topk(budget - int(0.3 * budget), largest=False).indices] = True
        score = mean.masked_fill(~(scope & candidates), float("inf"))
    else:
        score = _single_score(policy, stats).masked_fill(~candidates, float("inf"))
    return int(score.argmin())


def token_level_keep(policy: str, queries: torch.Tensor, keys: torch.Tensor, prompt_len: int,
                     budget: int, sink: int, window: int, observation_window: int,
                     scale: float) -> torch.Tensor:
    """Token-by-token eviction per KV head (see the module docstring); ``[kv_heads, T]``."""
    num_tokens, num_kv_heads = keys.shape[0], keys.shape[1]
    kept = torch.zeros(num_kv_heads, num_tokens, dtype=torch.bool)
    kept[:, :prompt_len] = True
    stats = torch.zeros(num_kv_heads, NUM_STATS, num_tokens)
    positions = torch.arange(num_tokens)
    for t in range(prompt_len - observation_window, prompt_len):
        probs = _token_probs(queries[t], keys, kept & (positions <= t), scale)
        _add(stats, probs, kept & (positions <= t), t)
    # The prompt's end: keep the budget by the same rule, one eviction at a time (scores do not
    # change meanwhile, so for a single score that is keeping the best at once).
    for head in range(num_kv_heads):
        if policy != "roco":
            score = _single_score(policy, stats[head])
            pinned = (positions < sink) | (positions > prompt_len - 1 - window)
            ranked = score[:prompt_len].masked_fill(pinned[:prompt_len], float("inf"))
            kept[head, :prompt_len] = False
            kept[head, topk_prefer_recent(ranked, min(budget, prompt_len))] = True
        while int(kept[head].sum()) > budget:
            victim = _token_victim(policy, stats[head], kept[head], prompt_len - 1, sink, window,
                                   budget)
            kept[head, victim] = False
    for t in range(prompt_len, num_tokens):
        kept[:, t] = True
        if policy != "snapkv":
            probs = _token_probs(queries[t], keys, kept & (positions <= t), scale)
            _add(stats, probs, kept & (positions <= t), t)
        for head in range(num_kv_heads):
            if int(kept[head].sum()) > budget:
                kept[head, _token_victim(policy, stats[head], kept[head], t, sink, window,
                                         budget)] = False
    return kept


def _add(stats: torch.Tensor, probs: torch.Tensor, seen: torch.Tensor, t: int) -> None:
    """Add the query at position ``t`` (``probs``/``seen`` ``[kv_heads, T]``) to each head's
    token statistics ``[kv_heads, NUM_STATS, T]``."""
    hit = attended(probs, seen.long())
    stats[:, TOTAL] += probs
    stats[:, SQUARES] += probs * probs
    stats[:, COUNT] += seen.float()
    stats[:, ATTENDED] += hit.float()
    stats[:, LAST] = torch.where(seen, probs, stats[:, LAST])
    use = latest_use(hit, seen.long(), torch.full(probs.shape[:1], t),
                     torch.arange(probs.shape[-1]))
    stats[:, LAST_ATTENDED] = torch.maximum(stats[:, LAST_ATTENDED], use)


def page_level_keep(policy, queries: torch.Tensor, keys: torch.Tensor, prompt_len: int,
                    budget: int, sink: int, window: int, observation_window: int, scale: float,
                    page_size: int) -> torch.Tensor:
    """The engine's decisions for one layer: pages, one ranking for all heads; ``[kv_heads, T]``.

    ``policy`` is a registered :class:`~vllm_kvevict.policies.base.AttentionStatsPolicy`.
    ``budget``/``sink``/``window`` are in tokens and rounded like the engine rounds them.
    """
    num_tokens, num_kv_heads = keys.shape[0], keys.shape[1]
    budget_pages, sink_pages = budget // page_size, cdiv(sink, page_size)
    window_pages = cdiv(window, page_size)
    num_pages = cdiv(num_tokens, page_size)
    padded = torch.zeros(num_pages * page_size, *keys.shape[1:], dtype=keys.dtype)
    padded[:num_tokens] = keys
    page_keys = padded.view(num_pages, page_size, *keys.shape[1:])
    key_positions = torch.arange(num_pages * page_size).view(num_pages, page_size)
    held = torch.zeros(num_pages, dtype=torch.bool)
    stats = torch.zeros(NUM_STATS, num_pages)

    def observe(first: int, last: int) -> None:  # queries first..last (inclusive)
        pages = held.nonzero().squeeze(1)
        positions = torch.arange(first, last + 1)
        mass = page_attention_mass(queries[first:last + 1], page_keys[pages],
                                   key_positions[pages], positions, scale)
        accumulate(stats, pages, mass, key_positions[pages], positions)

    def evict(seq_len: int) -> None:  # keep the budget's full pages, as the engine does
        num_full = seq_len // page_size
        partial = seq_len % page_size != 0
        full = held.clone()
        full[num_full:] = False
        if int(full.sum()) <= budget_pages:
            return
        pages = full.nonzero().squeeze(1)
        window_full = window_pages - (1 if partial else 0)
        pinned = (pages < sink_pages) | (pages >= num_full - window_full)
        view = PageAttentionStats.of(stats[:, pages], pinned, budget_pages)
        scores = policy.score(view).float().masked_fill(pinned, float("inf"))
        held[pages] = False
        held[pages[topk_prefer_recent(scores, budget_pages)]] = True

    held[:cdiv(prompt_len, page_size)] = True
    observe(prompt_len - observation_window, prompt_len - 1)
    evict(prompt_len)
    for t in range(prompt_len, num_tokens):
        held[t // page_size] = True
        if policy.decode_statistics:
            observe(t, t)
        evict(t + 1)
    kept = held.repeat_interleave(page_size)[:num_tokens]
    return kept.unsqueeze(0).expand(num_kv_heads, -1).clone()


def kept_overlap(token_kept: torch.Tensor, page_kept: torch.Tensor) -> float:
    """Share of the token-level reference's kept tokens that the page-level version kept too
    (mean over KV heads)."""
    both = (token_kept & page_kept).sum(1).float()
    return float((both / token_kept.sum(1).clamp(min=1)).mean())
