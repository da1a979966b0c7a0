"""A step's page work as tensors, planned once per step and read by every layer."""
from __future__ import annotations

import dataclasses
import functools
import types

import numpy as np
import torch

from vllm_kvevict.pages.requests import RequestPages


def to_device(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Host tensors on ``device``, in one copy (from pinned memory, asynchronous, on CUDA)."""
    device = torch.device(device)
    if device.type == "cpu":
        return tensors
    flat = pack(tensors)
    if device.type == "cuda":
        flat = flat.pin_memory()
    return unpack(flat.to(device, non_blocking=True), tensors)


def pack(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Integer or boolean tensors as one flat int64 tensor (see :func:`unpack`)."""
    return torch.cat([t.reshape(-1).to(torch.int64) for t in tensors.values()])


def unpack(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors :func:`pack` joined into ``flat``, with the shapes and dtypes of ``like``."""
    unpacked, at = {}, 0
    for name, t in like.items():
        unpacked[name] = flat[at:at + t.numel()].view(t.shape).to(t.dtype)
        at += t.numel()
    return unpacked


@dataclasses.dataclass
class RowSelection:
    """A row that selects pages in this step (what :class:`SelectionBatch` stacks)."""

    row: int
    token: int  # the query token that scores pages
    state: RequestPages
    num_full: int  # backed-up pages
    num_full_cols: int  # owned blocks holding full pages (the page being filled excluded)
    num_keep: int  # pages kept: sinks + full window + top-k
    pinned: tuple[int, int]  # pages [0, a) and [b, num_full) are always kept
    partial_block: int  # the block of the page being filled, -1 if none
    candidates: list[int]  # full columns that may receive a kept page
    last_position: int = 0  # position of the query token
    num_observed: int = 0  # at a prompt's end: its last queries that choose anchors


class SelectionBatch:
    """The step's selecting rows as padded tensors, built once per step, read by every layer.

    ``R`` requests, each selecting for ``heads`` placements: 1 (every KV head of a block holds
    the same page) or one per KV head. A *selection row* is a (request, placement) pair,
    ``R * heads`` of them, request-major; ``tokens``, ``rows``, ``partial_blocks``,
    ``last_positions`` and ``num_observed`` are per request, every other tensor per selection
    row. ``P`` is the most full pages of a request and ``C`` the most full columns (owned blocks
    holding full pages). Page ``P`` stands for "no page": ``held`` holds it in the padding
    columns, and padding pages are not ``valid``. ``held[layer]`` is updated by the layers'
    moves and written back to the requests' page tables after the last layer (:meth:`commit`).
    ``pinned[layer]`` is sinks, window and the row's anchors in that layer; ``anchors[layer]``
    (``[R * heads, A]``, -1: none) is read from the requests, or, for rows ending their prompt,
    chosen by the layers and written back by :meth:`commit`.
    """

    def __init__(self, selections: list[RowSelection], num_layers: int, device,
                 num_anchors: int = 0, heads: int = 1) -> None:
        requests = len(selections)
        num_pages = max(sel.num_full for sel in selections)
        num_cols = max(sel.num_full_cols for sel in selections)
        self.heads = heads
        self.states = [sel.state for sel in selections]
        self.num_cols = [sel.num_full_cols for sel in selections]
        column = lambda values: np.array(values, dtype=np.int64)  # noqa: E731
        per_request = {
            "rows": column([sel.row for sel in selections]),
            "tokens": column([sel.token for sel in selections]),
            "partial_blocks": column([sel.partial_block for sel in selections]),
            "last_positions": column([sel.last_position for sel in selections]),
            "num_observed": column([sel.num_observed for sel in selections]),
        }
        per_row = {
            "num_full": column([sel.num_full for sel in selections]),
            "num_keep": column([sel.num_keep for sel in selections]),
            "host_ids": np.zeros((requests, num_pages), dtype=np.int64),
            "valid": np.zeros((requests, num_pages), dtype=np.bool_),
            "pinned": np.zeros((requests, num_pages), dtype=np.bool_),
            "blocks": np.zeros((requests, num_cols), dtype=np.int64),
            "candidates": np.zeros((requests, num_cols), dtype=np.bool_),
        }
        held = np.full((num_layers, requests, heads, num_cols), num_pages, dtype=np.int64)
        anchors = np.full((num_layers, requests, heads, num_anchors), -1, dtype=np.int64)
        for i, sel in enumerate(selections):
            n, cols = sel.num_full, sel.num_full_cols
            per_row["host_ids"][i, :n] = sel.state.host_ids[:n]
            per_row["valid"][i, :n] = True
            per_row["pinned"][i, :sel.pinned[0]] = True
            per_row["pinned"][i, sel.pinned[1]:n] = True
            per_row["blocks"][i, :cols] = sel.state.block_ids[:cols]
            per_row["candidates"][i, sel.candidates] = True
            held[:, i, :, :cols] = sel.state.held[:, :cols].numpy().transpose(0, 2, 1)
            if num_anchors and sel.state.anchors is not None:
                anchors[:, i] = sel.state.anchors.numpy()
        rows = requests * heads
        per_row = {name: a.repeat(heads, axis=0) for name, a in per_row.items()}
        anchors = anchors.reshape(num_layers, rows, num_anchors)
        # [L, R * heads, P]: sinks and window in every layer, each layer's anchors
        pinned = np.empty((num_layers, rows, num_pages), dtype=np.bool_)
        pinned[:] = per_row.pop("pinned")
        layers, anchored, slots = np.nonzero(anchors >= 0)
        pinned[layers, anchored, anchors[layers, anchored, slots]] = True
        host = {name: torch.from_numpy(a) for name, a in {
            **per_request, **per_row, "pinned": pinned,
            "held": held.reshape(num_layers, rows, num_cols), "anchors": anchors,
            "head_of_row": (np.tile(np.arange(heads), requests) if heads > 1
                            else np.full(requests, -1)),
            "row_tokens": per_request["tokens"].repeat(heads)}.items()}
        moved = to_device(host, device)
        self.rows, self.tokens = moved["rows"], moved["tokens"]
        self.partial_blocks = moved["partial_blocks"]
        self.last_positions, self.num_observed = moved["last_positions"], moved["num_observed"]
        self.num_full, self.num_keep = moved["num_full"], moved["num_keep"]
        self.host_ids, self.valid, self.pinned = moved["host_ids"], moved["valid"], moved["pinned"]
        self.blocks, self.candidates = moved["blocks"], moved["candidates"]
        self.held = moved["held"]
        self.anchors = moved["anchors"]
        self.head_of_row = moved["head_of_row"]  # [R * heads] each row's KV head, -1: all
        self.row_tokens = moved["row_tokens"]  # [R * heads] each selection row's query token

    def __len__(self) -> int:
        """Requests (not selection rows)."""
        return len(self.states)

    @functools.cached_property
    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, scores)`` ``[R, P]`` buffers a CPU layer's selection writes (each layer
        overwrites them; scores of padding pages stay 0)."""
        shape = self.host_ids.shape
        return torch.empty(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.float32)

    @functools.cached_property
    def arrays(self) -> types.SimpleNamespace:
        """Numpy views of a CPU batch's tensors (what compiled CPU kernels read and write):
        per row, per layer (``held``, ``pinned``: ``[L, ...]``) and the :attr:`outputs`."""
        names = ("row_tokens", "host_ids", "num_full", "num_keep", "candidates", "blocks",
                 "head_of_row", "partial_blocks", "held", "pinned")
        keep, scores = self.outputs
        return types.SimpleNamespace(keep=keep.numpy(), scores=scores.numpy(),
                                     **{name: getattr(self, name).numpy() for name in names})

    def queries(self, query: torch.Tensor) -> torch.Tensor:
        """The query of each selection row: ``[R, q_heads, head_dim]`` (one placement), or
        ``[R * kv_heads, group, head_dim]`` (one per KV head: the heads reading it)."""
        rows = query[self.tokens]
        if self.heads == 1:
            return rows
        return rows.unflatten(1, (self.heads, -1)).flatten(0, 1)

    def commit(self, anchors_chosen: bool = False) -> None:
        """Write the pages each column holds (and anchors the layers chose) back to the
        requests' page tables."""
        heads = self.heads
        tables = {"held": self.held, **({"anchors": self.anchors} if anchors_chosen else {})}
        tables = unpack(pack(tables).cpu(), tables)  # one device-to-host copy
        held = tables["held"].unflatten(1, (-1, heads))  # [L, R, heads, C]
        anchors = tables["anchors"].unflatten(1, (-1, heads)) if anchors_chosen else None
        for i, (state, cols) in enumerate(zip(self.states, self.num_cols)):
            state.held[:, :cols] = held[:, i, :, :cols].transpose(1, 2)
            if anchors is not None:
                state.anchors = anchors[:, i].clone()


def pin_pages(pinned: torch.Tensor, pages: torch.Tensor) -> None:
    """Set ``pinned[..., p]`` for every page ``p >= 0`` of ``pages`` (same leading dims)."""
    num_pages = pinned.shape[-1]
    padded = torch.nn.functional.pad(pinned, (0, 1))  # page P: "none"
    padded.scatter_(-1, torch.where(pages >= 0, pages, num_pages), True)
    pinned.copy_(padded[..., :num_pages])


@dataclasses.dataclass
class StepPlan:
    """What every layer does in one step (built once per step, read by every layer)."""

    backup_blocks: torch.Tensor  # [n] blocks of pages filled this step
    backup_hosts: torch.Tensor  # [n] their host pages
    selections: SelectionBatch | None  # decode rows with evicted pages: select + recall
    prefill_ends: SelectionBatch | None  # rows finishing their prompt: keep the best pages
    sparse_seq_lens: dict[int, int]  # row -> tokens attended under sparse attention

    @property
    def empty(self) -> bool:
        return not (self.backup_blocks.numel() or self.selections or self.prefill_ends)

    @property
    def has_layer_work(self) -> bool:
        """The layers have page work: backups, selections, prefill ends or rows attending over
        selected pages (the backend attaches the plan to the step only then)."""
        return not self.empty or bool(self.sparse_seq_lens)
