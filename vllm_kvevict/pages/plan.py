"""A step's page work as tensors, planned once per step and read by every layer."""
from __future__ import annotations

import dataclasses

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


class SelectionBatch:
    """The step's selecting rows as padded tensors, built once per step, read by every layer.

    ``R`` rows; ``P`` the most full pages of a row and ``C`` the most full columns (owned
    blocks holding full pages). Page ``P`` stands for "no page": ``held`` holds it in the
    padding columns, and padding pages are not ``valid``. ``held[layer]`` is updated by the
    layers' moves and written back to the requests' page tables after the last layer
    (:meth:`commit`).
    """

    def __init__(self, selections: list[RowSelection], num_layers: int, device) -> None:
        rows = len(selections)
        num_pages = max(sel.num_full for sel in selections)
        num_cols = max(sel.num_full_cols for sel in selections)
        self.states = [sel.state for sel in selections]
        self.num_cols = [sel.num_full_cols for sel in selections]
        column = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
        host = {
            "rows": column([sel.row for sel in selections]),
            "tokens": column([sel.token for sel in selections]),
            "num_full": column([sel.num_full for sel in selections]),
            "num_keep": column([sel.num_keep for sel in selections]),
            "partial_blocks": column([sel.partial_block for sel in selections]),
            "host_ids": torch.zeros((rows, num_pages), dtype=torch.int64),
            "valid": torch.zeros((rows, num_pages), dtype=torch.bool),
            "pinned": torch.zeros((rows, num_pages), dtype=torch.bool),
            "blocks": torch.zeros((rows, num_cols), dtype=torch.int64),
            "candidates": torch.zeros((rows, num_cols), dtype=torch.bool),
            "held": torch.full((num_layers, rows, num_cols), num_pages, dtype=torch.int64),
        }
        for i, sel in enumerate(selections):
            n, cols = sel.num_full, sel.num_full_cols
            host["host_ids"][i, :n] = torch.tensor(sel.state.host_ids[:n])
            host["valid"][i, :n] = True
            host["pinned"][i, :sel.pinned[0]] = True
            host["pinned"][i, sel.pinned[1]:n] = True
            host["blocks"][i, :cols] = torch.tensor(sel.state.block_ids[:cols])
            host["candidates"][i, sel.candidates] = True
            host["held"][:, i, :cols] = sel.state.held[:, :cols]
        moved = to_device(host, device)
        self.rows, self.tokens, self.num_full = moved["rows"], moved["tokens"], moved["num_full"]
        self.num_keep, self.partial_blocks = moved["num_keep"], moved["partial_blocks"]
        self.host_ids, self.valid, self.pinned = moved["host_ids"], moved["valid"], moved["pinned"]
        self.blocks, self.candidates = moved["blocks"], moved["candidates"]
        self.held = moved["held"]

    def __len__(self) -> int:
        return len(self.states)

    def commit(self) -> None:
        """Write the pages each column holds back to the requests' page tables."""
        held = self.held.cpu()
        for i, (state, cols) in enumerate(zip(self.states, self.num_cols)):
            state.held[:, :cols] = held[:, i, :cols]


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
