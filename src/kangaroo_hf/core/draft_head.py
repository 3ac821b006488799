"""The draft's LM head: adapter states -> processed draft scores, confidences and chosen drafts, for any batch.

One object serves both decoding loops (the assisted loop at batch 1, `core/batched.py` for batches), so the two
draft exactly alike: the same kernel, the same reduced vocabulary handling and the same logits processors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList
from transformers.generation import logits_process

from .kernels import few_row_matmul, pack_weight, packed_matmul


def head_product(
    weight: torch.Tensor, bias: torch.Tensor | None, use_few_row_matmul: bool, use_packed_weights: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden -> logits through the kernel the model's other products use in this generate() call."""
    if use_few_row_matmul:
        return lambda hidden: few_row_matmul(hidden, weight, bias)
    if use_packed_weights:
        packed = pack_weight(weight)
        return lambda hidden: packed_matmul(hidden, packed, bias)
    return lambda hidden: torch.nn.functional.linear(hidden, weight, bias)


# Warpers that read only the scores, each row alone: applied to many rows in one call.
_SCORES_ONLY = tuple(
    getattr(logits_process, name)
    for name in (
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "TopHLogitsWarper",
    )
    if hasattr(logits_process, name)
)
# Processors whose state couples the rows of a batch: a row cannot be processed on its own.
_BATCH_COUPLED = tuple(
    getattr(logits_process, name)
    for name in (
        "PrefixConstrainedLogitsProcessor",
        "WatermarkLogitsProcessor",
        "SynthIDTextWatermarkLogitsProcessor",
        "ClassifierFreeGuidanceLogitsProcessor",
        "UnbatchedClassifierFreeGuidanceLogitsProcessor",
    )
    if hasattr(logits_process, name)
)
# Per-row state some processors hold for a whole batch (first dimension: the batch), sliced for one row.
_PER_ROW_STATE = {logits_process.RepetitionPenaltyLogitsProcessor: ("prompt_ignore_length",)}


class RowProcessors:
    """A `generate()` call's logits processors, applied to rows that may have different lengths.

    Rows of a batch decoded with Kangaroo advance at their own pace, so each row is processed with its own sequence
    (1, L), exactly what it would see in transformers' batched loop; per-row state built for the whole batch (the
    repetition penalty's prompt lengths) is sliced to the row. Trailing warpers that read only the scores
    (temperature, top-k, top-p, ...) run once over all rows. Processors that couple the rows are refused for batches.
    """

    def __init__(self, logits_processor: LogitsProcessorList | None, batch_size: int = 1) -> None:
        processors = list(logits_processor or [])
        split = len(processors)
        while split and isinstance(processors[split - 1], _SCORES_ONLY):
            split -= 1
        self.shared = LogitsProcessorList(processors[split:])
        coupled = [type(p).__name__ for p in processors[:split] if isinstance(p, _BATCH_COUPLED)]
        if coupled and batch_size > 1:
            raise ValueError(
                f"{', '.join(coupled)} couples the rows of a batch, which batched Kangaroo decoding processes one by "
                "one; decode one prompt at a time or pass use_kangaroo=False."
            )
        self.per_row = [
            LogitsProcessorList(_row_view(p, row, batch_size) for p in processors[:split]) for row in range(batch_size)
        ]

    def __len__(self) -> int:
        return len(self.shared) + len(self.per_row[0])

    def __call__(
        self, rows: Sequence[int], sequences: Sequence[torch.LongTensor], scores: torch.Tensor
    ) -> torch.Tensor:
        """Process `scores` (N, V): line i belongs to batch row `rows[i]`, whose sequence is `sequences[i]` (1, L)."""
        if len(self.per_row[0]):
            scores = torch.cat(
                [
                    self.per_row[row](seq, scores[i : i + 1])
                    for i, (row, seq) in enumerate(zip(rows, sequences, strict=True))
                ]
            )
        if len(self.shared):
            scores = self.shared(sequences[0], scores)  # these read the scores only
        return scores


def _row_view(processor: Any, row: int, batch_size: int) -> Any:
    names = _PER_ROW_STATE.get(type(processor), ())
    state = {
        name: value[row : row + 1]
        for name in names
        if isinstance(value := getattr(processor, name, None), torch.Tensor) and value.shape[:1] == (batch_size,)
    }
    if not state:
        return processor
    view = copy.copy(processor)
    vars(view).update(state)
    return view


def one_hot_scores(tokens: torch.LongTensor, vocab_size: int) -> torch.Tensor:
    """(N, V) scores of deterministic proposals `tokens` (N,): 0 at the token, -inf elsewhere. A draft copied from the
    context is such a proposal: q is one-hot on it, so speculative sampling accepts it with probability p(d) and, on
    rejection, resamples from p with d's mass removed."""
    scores = torch.full((tokens.numel(), vocab_size), float("-inf"), device=tokens.device)
    scores[torch.arange(tokens.numel(), device=tokens.device), tokens.view(-1)] = 0.0
    return scores


class DraftHead:
    """Scores drafts from adapter states with the base's LM head (or its rows for a reduced draft vocabulary).

    With a reduced draft vocabulary the head scores only `vocab_ids`; the scores are scattered back to the full
    vocabulary whenever logits processors or sampling need it (`vocab_ids` is then None for those scores).
    """

    def __init__(
        self,
        model: Any,
        processors: RowProcessors,
        do_sample: bool,
        use_few_row_matmul: bool = False,
        use_packed_weights: bool = False,
    ) -> None:
        weight, bias, self.vocab_ids = model.draft_head()
        self.vocab_size = model.parts.lm_head.out_features
        self.processors = processors
        self.do_sample = do_sample
        self._product = head_product(weight, bias, use_few_row_matmul, use_packed_weights)
        self._full_scores = self.vocab_ids is not None and (do_sample or len(processors) > 0)

    def scores(
        self, hidden: torch.Tensor, rows: Sequence[int], sequences: Sequence[torch.LongTensor]
    ) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """Processed draft scores (B, V') from adapter states (B, D), and the vocabulary ids of their columns (None:
        the full vocabulary). Line b belongs to batch row `rows[b]`, whose sequence so far is `sequences[b]` (1, L);
        neither is read without logits processors."""
        scores = self._product(hidden).float()
        vocab_ids = self.vocab_ids
        if self._full_scores:
            full = torch.full((scores.shape[0], self.vocab_size), float("-inf"), device=scores.device)
            scores, vocab_ids = full.index_copy_(1, vocab_ids, scores), None
        if len(self.processors):
            scores = self.processors(rows, sequences, scores)
        return scores, vocab_ids

    @staticmethod
    def top1(scores: torch.Tensor, vocab_ids: torch.LongTensor | None) -> tuple[torch.Tensor, torch.LongTensor]:
        """Each row's confidence (top-1 probability) and top-1 token id, both (B,)."""
        confidence, index = scores.softmax(dim=-1).max(dim=-1)
        return confidence, vocab_ids[index] if vocab_ids is not None else index

    def choose(self, scores: torch.Tensor, vocab_ids: torch.LongTensor | None) -> torch.LongTensor:
        """Each row's draft (B,) from processed `scores`: argmax, or a sample when sampling.

        Speculative sampling accepts a draft d with probability min(1, p(d) / q(d)), where q is the distribution d was
        drawn from: `scores` are exactly the processed logits the verification uses as q.
        """
        if self.do_sample:
            index = torch.multinomial(scores.softmax(dim=-1), num_samples=1).view(-1)
        else:
            index = scores.argmax(dim=-1)
        return vocab_ids[index] if vocab_ids is not None else index


__all__ = ["DraftHead", "RowProcessors", "head_product", "one_hot_scores"]
