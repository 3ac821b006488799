"""The draft's LM head: adapter states -> processed draft scores, confidences and chosen drafts, for any batch.

One object serves both decoding loops (the assisted loop at batch 1, `core/batched.py` for batches), so the two
draft exactly alike: the same kernel, the same reduced vocabulary handling and the same logits processors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList

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


def process_rows(
    logits_processor: LogitsProcessorList, sequences: Sequence[torch.LongTensor], scores: torch.Tensor
) -> torch.Tensor:
    """Apply `logits_processor` to each row of `scores` (B, V) with that row's own sequence (1, L_b): rows of a
    batch decoded with Kangaroo have different lengths, and each row sees exactly what it would see alone."""
    if not len(logits_processor):
        return scores
    if len(sequences) == 1:
        return logits_processor(sequences[0], scores)
    return torch.cat([logits_processor(seq, scores[row : row + 1]) for row, seq in enumerate(sequences)])


class DraftHead:
    """Scores drafts from adapter states with the base's LM head (or its rows for a reduced draft vocabulary).

    With a reduced draft vocabulary the head scores only `vocab_ids`; the scores are scattered back to the full
    vocabulary whenever logits processors or sampling need it (`vocab_ids` is then None for those scores).
    """

    def __init__(
        self,
        model: Any,
        logits_processor: LogitsProcessorList | None,
        do_sample: bool,
        use_few_row_matmul: bool = False,
        use_packed_weights: bool = False,
    ) -> None:
        weight, bias, self.vocab_ids = model.draft_head()
        self.vocab_size = model.parts.lm_head.out_features
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.do_sample = do_sample
        self._product = head_product(weight, bias, use_few_row_matmul, use_packed_weights)
        self._full_scores = self.vocab_ids is not None and (do_sample or len(self.logits_processor) > 0)

    def scores(
        self, hidden: torch.Tensor, sequences: Sequence[torch.LongTensor]
    ) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """Processed draft scores (B, V') from adapter states (B, D), and the vocabulary ids of their columns (None:
        the full vocabulary). `sequences[b]` (1, L_b) is row b's sequence so far, for the logits processors."""
        scores = self._product(hidden).float()
        vocab_ids = self.vocab_ids
        if self._full_scores:
            full = torch.full((scores.shape[0], self.vocab_size), float("-inf"), device=scores.device)
            scores, vocab_ids = full.index_copy_(1, vocab_ids, scores), None
        return process_rows(self.logits_processor, sequences, scores), vocab_ids

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


__all__ = ["DraftHead", "head_product", "process_rows"]
