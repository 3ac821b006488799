"""Prompt lookup inside Kangaroo rounds: what the context proposes, and when a round copies it.

A round may propose the tokens that followed the latest earlier occurrence of the context's longest matching final
n-gram instead of the adapter's drafts (prompt lookup decoding, as transformers' `prompt_lookup_num_tokens`). The
rules that decide when, and how long the copy is, live here and only here; the generator and
`scripts/replay_drafting.py` both use this object.
"""

from __future__ import annotations

import torch


class PromptLookup:
    """The lookup rules of one `generate()` call, with the state they learn as the call goes.

    Args:
        num_tokens: tokens a lookup proposes at first (and after a copy rejected at its first token).
        max_ngram: longest final n-gram searched for in the context.
        max_tokens: growth cap: after a copy of `length` tokens accepted in full, the next proposes `2 * length`, up
            to this; 0 keeps the length fixed.
        trust_ngram: a match at least this long is copied whatever the adapter drafts, without a drafting step;
            0 never overrules the adapter.
        hit_rate_decay: decay of the running rate at which the context's proposal had the token the base emitted;
            whenever that rate beats the adapter's confidence, the round copies. 0 turns it off.
    """

    def __init__(
        self, num_tokens: int, max_ngram: int, max_tokens: int = 0, trust_ngram: int = 0, hit_rate_decay: float = 0.0
    ) -> None:
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.max_tokens = max(max_tokens, num_tokens)
        self.trust_ngram = trust_ngram
        self.hit_rate_decay = hit_rate_decay
        self.length = num_tokens  # what the next lookup proposes
        self.hit_rate = 0.0

    def propose(self, sequence: torch.LongTensor) -> tuple[torch.LongTensor, int]:
        """The context's continuation after `sequence` (N,): up to `length` tokens that followed the latest earlier
        occurrence of its longest matching final n-gram, and that n-gram's length ((empty, 0) when none matches)."""
        for size in range(min(self.max_ngram, sequence.numel() - 1), 0, -1):
            windows = sequence[:-1].unfold(0, size, 1)  # (positions, size): every earlier n-gram
            matches = (windows == sequence[-size:]).all(dim=1).nonzero().view(-1)
            if matches.numel():
                start = int(matches[-1]) + size
                return sequence[start : start + self.length], size
        return sequence[:0], 0

    def trusts(self, match_length: int) -> bool:
        """Whether a match this long is copied without asking the adapter."""
        return 0 < self.trust_ngram <= match_length

    def prefers_copy(self, first_token: int, adapter_token: int, confidence: float, draft_threshold: float) -> bool:
        """Whether a round copies the proposal starting with `first_token` rather than draft with the adapter, whose
        first draft would be `adapter_token` at top-1 probability `confidence`: the two agree, the adapter is unsure,
        or the context has lately been right more often than the adapter is sure now."""
        return adapter_token == first_token or confidence < draft_threshold or confidence < self.hit_rate

    def record_round(
        self, first_token: int | None, emitted_token: int, copied: bool, proposed: int, accepted: int
    ) -> None:
        """Learn from a verified round. `first_token`: the proposal's first token (None when nothing matched);
        `emitted_token`: the first token the base emitted this round; `copied`: the round proposed the copy,
        `proposed` tokens of it, of which the base `accepted` a prefix.

        The hit rate learns whenever the context had a proposal, copied or not. A copy accepted in full at the
        current length doubles the length (up to `max_tokens`); a copy rejected at its first token brings it back to
        `num_tokens`; a copy accepted in part keeps it (the text still follows the context, as a translation or an
        edit of the prompt does between one-token changes).
        """
        decay = self.hit_rate_decay
        if decay and first_token is not None:
            self.hit_rate = decay * self.hit_rate + (1.0 - decay) * (first_token == emitted_token)
        if copied:
            if accepted == proposed == self.length:
                self.length = min(2 * self.length, self.max_tokens)
            elif accepted == 0 < proposed:
                self.length = self.num_tokens


__all__ = ["PromptLookup"]
