"""Cache slots shared by rows of different lengths: which slot holds which token, the masks that follow, and the
gather that keeps a round's accepted tokens.

transformers' caches hold one length for the whole batch. When the rows of a batch accept different numbers of drafts,
each row `b` keeps its tokens contiguous in slots `[0, fill[b])` (left padding included) and the slots after that are
holes; `positions[b, s]` is the position of the token in slot `s` (-1 for padding, holes and rejected drafts). Every
forward's attention mask is built from these positions, so holes cost memory but never change a result: a query sees
the filled slots of its own row at positions up to its own (within the sliding window, for sliding layers), and
within a round only the round's slots `visible` to it (its ancestors, for token trees; the earlier slots, for chains).
"""

from __future__ import annotations

import torch

from .compat import cache_layer_tensors
from .layers import FULL_ATTENTION, SLIDING_ATTENTION


class SlotTable:
    """Slot bookkeeping of a batch decoded with shared caches (see the module docstring)."""

    def __init__(self, positions: torch.LongTensor) -> None:
        self.positions = positions  # (B, S)
        self.fill = (positions >= 0).long().cumsum(-1).argmax(-1) + 1  # one past each row's last filled slot
        self.round_start = positions.shape[1]
        # ancestors[b, i, j]: round slot j is slot i or one of its ancestors in row b's token tree this round.
        self.ancestors = torch.zeros(positions.shape[0], 0, 0, dtype=torch.bool, device=positions.device)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> SlotTable:
        """The table of a left-padded prompt batch: its 2D `attention_mask` (B, T) marks the real tokens."""
        real = attention_mask.bool()
        if not real[:, -1].all():
            raise ValueError(
                "Batched Kangaroo decoding needs left-padded prompts (the last token of every row real): set "
                "tokenizer.padding_side = 'left', as for any batched generation with a decoder-only model."
            )
        positions = real.long().cumsum(-1) - 1
        return cls(positions.masked_fill(~real, -1))

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    @property
    def next_positions(self) -> torch.LongTensor:
        """(B,): the position of each row's next token (the number of tokens it holds)."""
        return self.positions.max(dim=-1).values + 1

    def start_round(self) -> None:
        """The slots appended from now on belong to a new round (drafts and their verification)."""
        self.round_start = self.length
        self.ancestors = self.ancestors.new_zeros(self.positions.shape[0], 0, 0)

    def append(self, positions: torch.LongTensor, parents: torch.LongTensor | None = None) -> None:
        """Append round slots (B, T) at `positions` (-1: the slot holds nothing for that row), each the child of the
        round slot `parents` (B, T) (offsets from the round's first slot; -1: a root; default: a chain, each slot
        the child of the slot before it)."""
        batch, count = positions.shape
        offset = self.length - self.round_start
        if parents is None:
            parents = torch.arange(offset - 1, offset + count - 1, device=positions.device).expand(batch, count)
        width = offset + count
        ancestors = torch.zeros(batch, width, width, dtype=torch.bool, device=positions.device)
        ancestors[:, :offset, :offset] = self.ancestors
        rows = torch.arange(batch, device=positions.device)
        for index in range(count):
            parent = parents[:, index]
            line = ancestors[rows, parent.clamp(min=0)] & (parent >= 0)[:, None]
            line[:, offset + index] = True
            ancestors[:, offset + index] = line
        self.ancestors = ancestors
        self.positions = torch.cat([self.positions, positions], dim=1)

    def masks(
        self,
        query_start: int,
        layer_kinds: set[str],
        sliding_window: int | None,
        dtype: torch.dtype,
        end: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Additive 4D masks (B, 1, Q, K), one per attention kind in `layer_kinds`, for queries in slots
        `[query_start, end)` over keys in slots `[0, end)` (the queries' own keys are written first); `end` defaults
        to the table's length, and a negative `query_start` counts from it."""
        end = self.length if end is None else end
        query_start = query_start % end if query_start < 0 else query_start
        keys = self.positions[:, :end]  # (B, K)
        queries = keys[:, query_start:]  # (B, Q)
        seen = (keys[:, None, :] >= 0) & (keys[:, None, :] <= queries[:, :, None])  # (B, Q, K)
        if end > self.round_start:  # within the round a query sees its own ancestors only (other branches: never)
            first = max(query_start, self.round_start) - self.round_start
            in_round = self.ancestors[:, first : end - self.round_start, : end - self.round_start]
            seen[:, seen.shape[1] - in_round.shape[1] :, self.round_start :] &= in_round
        # A query slot holding nothing sees itself only, so that no attention row is empty.
        own = torch.arange(query_start, end, device=keys.device)[:, None] == torch.arange(end, device=keys.device)
        result = {}
        for kind in layer_kinds:
            allowed = seen
            if kind == SLIDING_ATTENTION and sliding_window is not None:
                allowed = allowed & (queries[:, :, None] - keys[:, None, :] < sliding_window)
            allowed = (allowed & (queries[:, :, None] >= 0)) | own
            mask = torch.zeros(allowed.shape, dtype=dtype, device=keys.device)
            result[kind] = mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
        return result

    def keep(self, paths: list[list[int]]) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor, int]:
        """Keep, in each row `b`, this round's slots `paths[b]` (offsets from the round's first slot, in token order:
        the accepted path), moved to the row's `fill`; every other slot of the round becomes a hole. Returns (rows,
        sources, destinations, length) for `move_slots`: the gather every cache must do."""
        rows, sources, destinations = [], [], []
        for row, path in enumerate(paths):
            fill = int(self.fill[row])
            rows += [row] * len(path)
            sources += [self.round_start + offset for offset in path]
            destinations += range(fill, fill + len(path))
        device = self.positions.device
        rows_t, sources_t, destinations_t = (
            torch.tensor(values, dtype=torch.long, device=device) for values in (rows, sources, destinations)
        )
        moved = self.positions[rows_t, sources_t]
        self.positions[:, self.round_start :] = -1
        self.positions[rows_t, destinations_t] = moved
        self.fill = self.fill + torch.tensor([len(path) for path in paths], dtype=torch.long, device=device)
        length = int(self.fill.max())
        self.positions = self.positions[:, :length]
        self.start_round()
        return rows_t, sources_t, destinations_t, length

    def reorder_round(self, order: torch.LongTensor, width: int) -> None:
        """Put row b's round slot `order[b, i]` at round offset i, and keep the first `width` round slots."""
        start = self.round_start
        self.positions = torch.cat([self.positions[:, :start], self.positions[:, start:].gather(1, order)], 1)
        self.positions = self.positions[:, : start + width]
        rows = torch.arange(order.shape[0], device=order.device)[:, None, None]
        self.ancestors = self.ancestors[rows, order[:, :width, None], order[:, None, :width]]

    def select_rows(self, rows: torch.LongTensor) -> int:
        """Keep only `rows` of the batch; returns the new length (the longest remaining row's fill)."""
        self.fill = self.fill[rows]
        length = int(self.fill.max())
        self.positions = self.positions[rows, :length]
        self.start_round()
        return length


def move_slots(
    cache, rows: torch.LongTensor, sources: torch.LongTensor, destinations: torch.LongTensor, length: int
) -> None:
    """Copy the keys and values of slot `sources[i]` to slot `destinations[i]` in row `rows[i]` in every layer of
    `cache`, then shorten every layer to `length` slots (what `SlotTable.keep` asks for)."""
    moved = sources != destinations  # a chain kept in place (batch 1, or the longest row) needs no copy
    rows, sources, destinations = rows[moved], sources[moved], destinations[moved]
    for layer in cache_layer_tensors(cache):
        for tensor in layer.tensors():
            if rows.numel():
                tensor[rows, :, destinations] = tensor[rows, :, sources]
        layer.set(*(tensor[:, :, :length] for tensor in layer.tensors()))


def reorder_slots(cache, start: int, order: torch.LongTensor, width: int) -> None:
    """In every layer of `cache` holding slots past `start`, put row b's slot `start + order[b, i]` at `start + i`
    and keep `start + width` slots (`SlotTable.reorder_round` for the caches)."""
    for layer in cache_layer_tensors(cache):
        tensors = layer.tensors()
        if tensors[0].shape[2] <= start:
            continue  # a layer the round has not reached yet (the deep layers, before verification)
        moved = []
        for tensor in tensors:
            index = order[:, None, :width, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
            moved.append(torch.cat([tensor[:, :, :start], tensor[:, :, start:].gather(2, index)], dim=2))
        layer.set(*moved)


def append_empty_slots(cache, count: int) -> None:
    """Append `count` zero slots to every layer of `cache`: placeholders that keep its layout the table's until their
    keys and values are written."""
    if count <= 0:
        return
    for layer in cache_layer_tensors(cache):
        layer.set(
            *(
                torch.cat([tensor, tensor.new_zeros(*tensor.shape[:2], count, tensor.shape[3])], 2)
                for tensor in layer.tensors()
            )
        )


def select_cache_rows(cache, rows: torch.LongTensor, length: int) -> None:
    """Keep only `rows` of the batch, and the first `length` slots, in every layer of `cache`."""
    for layer in cache_layer_tensors(cache):
        layer.set(*(tensor[rows, :, :length] for tensor in layer.tensors()))


__all__ = [
    "FULL_ATTENTION",
    "SLIDING_ATTENTION",
    "SlotTable",
    "append_empty_slots",
    "move_slots",
    "reorder_slots",
    "select_cache_rows",
]
