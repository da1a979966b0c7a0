"""Page digests and digest scores (ArkVale, Chen et al., NeurIPS 2024; Quest, Tang et al., 2024).

A digest bounds the post-RoPE keys of one filled page, per KV head, by a box ``[lo, hi]``:

* ``cuboid-mean`` (ArkVale): centre ``c = (max + min) / 2``, radius ``r = mean_t |k_t - c|``,
  ``hi = c + r``, ``lo = c - r``.
* ``cuboid-max`` (Quest): ``hi = max_t k_t``, ``lo = min_t k_t``.

The score of a page for a query ``q`` is ``sum_d max(q_d * hi_d, q_d * lo_d)``: the largest
``q . k`` any key inside the box could reach (exact for cuboid-max, an estimate for cuboid-mean).
Both digests have ``hi >= lo``. They are computed in float32 and stored in the KV cache's 16-bit
float type (as ArkVale's reference stores them in the model's), rounded outward so that the
stored box still holds the computed one (:func:`stored_digests`); float32 caches store float32.
"""
from __future__ import annotations

import torch

DIGEST_KINDS = ("cuboid-mean", "cuboid-max")


def page_digests(keys: torch.Tensor,
                 kind: str = "cuboid-mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Digests of full pages.

    Args:
        keys: ``[num_pages, page_size, num_kv_heads, head_dim]`` post-RoPE keys.
        kind: one of :data:`DIGEST_KINDS`.

    Returns:
        ``(hi, lo)``, each ``[num_pages, num_kv_heads, head_dim]`` in float32.
    """
    if kind not in DIGEST_KINDS:
        raise ValueError(f"unknown digest kind {kind!r}; choose one of {DIGEST_KINDS}")
    keys = keys.float()
    k_max = keys.amax(dim=1)
    k_min = keys.amin(dim=1)
    if kind == "cuboid-max":
        return k_max, k_min
    centre = (k_max + k_min) / 2
    radius = (keys - centre.unsqueeze(1)).abs().mean(dim=1)
    return centre + radius, centre - radius


def digest_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """The type digests are stored in for a KV cache of ``cache_dtype``."""
    return cache_dtype if cache_dtype in (torch.bfloat16, torch.float16) else torch.float32


def stored_digests(hi: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., 2, num_kv_heads, head_dim]``: ``hi`` rounded up and ``lo`` rounded down to
    ``dtype`` (the nearest values of ``dtype`` not below and not above them)."""
    up = _rounded(hi.float(), dtype, float("inf"))
    down = _rounded(lo.float(), dtype, float("-inf"))
    return torch.stack([up, down], dim=-3)


def _rounded(values: torch.Tensor, dtype: torch.dtype, towards: float) -> torch.Tensor:
    nearest = values.to(dtype)
    wrong_side = nearest.float() < values if towards > 0 else nearest.float() > values
    return torch.where(wrong_side, torch.nextafter(nearest, torch.full_like(nearest, towards)),
                       nearest)


def score_pages(query: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor,
                per_kv_head: bool = False) -> torch.Tensor:
    """Upper-bound scores of pages for decode queries, one request or a batch (leading dims).

    Args:
        query: ``[..., num_q_heads, head_dim]``; query head ``h`` reads KV head
            ``h // (num_q_heads // num_kv_heads)`` (GQA).
        hi, lo: ``[..., num_pages, num_kv_heads, head_dim]`` digests.
        per_kv_head: False: one ranking, the mean over all query heads (``[..., num_pages]``).
            True: one ranking per KV head, the mean over its query group
            (``[..., num_kv_heads, num_pages]``).
    """
    num_q_heads, head_dim = query.shape[-2:]
    num_kv_heads = hi.shape[-2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not divide into {num_kv_heads} KV heads")
    group = num_q_heads // num_kv_heads
    # hi >= lo, so max(q hi, q lo) = max(q, 0) hi + min(q, 0) lo: two contractions, no
    # [..., heads, pages, head_dim] intermediate. Averaging over a query group commutes with it.
    q = query.float().unflatten(-2, (num_kv_heads, group))              # [..., kv, g, d]
    q_pos = q.clamp(min=0).mean(dim=-2)                                   # [..., kv, d]
    q_neg = q.clamp(max=0).mean(dim=-2)
    per_kv = (torch.einsum("...kd,...pkd->...kp", q_pos, hi.float())
              + torch.einsum("...kd,...pkd->...kp", q_neg, lo.float()))  # [..., kv, pages]
    if per_kv_head:
        return per_kv
    return per_kv.mean(dim=-2)


def score_packed_pages(query: torch.Tensor, digests: torch.Tensor) -> torch.Tensor:
    """:func:`score_pages` (one ranking: mean over all query heads) for a batch of rows whose
    digests are packed ``[hi, lo]``: one matrix product per row, no per-head intermediate.

    Args:
        query: ``[rows, num_q_heads, head_dim]``.
        digests: ``[rows, num_pages, 2, num_kv_heads, head_dim]``.

    Returns:
        ``[rows, num_pages]`` float32.
    """
    rows, num_pages, _, num_kv_heads, head_dim = digests.shape
    num_q_heads = query.shape[-2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not divide into {num_kv_heads} KV heads")
    q = query.float().unflatten(-2, (num_kv_heads, num_q_heads // num_kv_heads))
    # max(q hi, q lo) = max(q, 0) hi + min(q, 0) lo, summed over the group's heads.
    q_bounds = torch.stack([q.clamp(min=0).sum(-2), q.clamp(max=0).sum(-2)], dim=1)
    scores = torch.bmm(digests.reshape(rows, num_pages, -1).float(),
                       q_bounds.reshape(rows, -1, 1))
    return scores.squeeze(-1) / num_q_heads
