"""Which drafts of a row the base accepts, and the base's own token after them (the batched loop's rules).

Greedy: the longest prefix of drafts equal to the base's argmax at each position, then the base's argmax.
Sampling (Leviathan et al., 2023, algorithm 1; the rule of transformers' assisted loop): draft `d_i`, drawn from `q_i`,
is accepted with probability `min(1, p_i(d_i) / q_i(d_i))`; at the first rejection the token is resampled from
`norm(max(0, p_i - q_i))`; if every draft is accepted, the next token is sampled from `p_k`. A draft copied from the
context is a one-hot `q`. Either way each output token has the base's distribution.
"""

from __future__ import annotations

import torch


def accept_greedy(drafts: torch.LongTensor, target_scores: torch.Tensor) -> tuple[int, int]:
    """(accepted drafts, next token) for `drafts` (k,) checked against the base's processed scores (k + 1, V)."""
    targets = target_scores.argmax(dim=-1)
    mismatches = (drafts != targets[: drafts.numel()]).long()
    accepted = int((mismatches.cumsum(0) == 0).sum())
    return accepted, int(targets[accepted])


def accept_sampled(
    drafts: torch.LongTensor, draft_scores: torch.Tensor, target_scores: torch.Tensor
) -> tuple[int, int]:
    """(accepted drafts, next token) for `drafts` (k,) sampled from `draft_scores` (k, V), against the base's
    processed scores (k + 1, V): speculative sampling, lossless."""
    count = drafts.numel()
    p = target_scores.softmax(dim=-1)
    if count:
        q = draft_scores.softmax(dim=-1)
        index = torch.arange(count, device=drafts.device)
        ratio = p[index, drafts] / q[index, drafts]
        accepted = int(((torch.rand_like(ratio) >= ratio).long().cumsum(0) == 0).sum())
    else:
        accepted = 0
    if accepted < count:
        residual = (p[accepted] - q[accepted]).clamp(min=0)
        total = residual.sum()
        # p(d) < q(d) leaves mass where p > q; only rounding can empty the residual, and then it is p itself.
        distribution = residual / total if total > torch.finfo(total.dtype).tiny else p[accepted]
    else:
        distribution = p[accepted]
    return accepted, int(torch.multinomial(distribution, num_samples=1))


__all__ = ["accept_greedy", "accept_sampled"]
