"""Which drafts of a row the base accepts, and the base's own token after them (the batched loop's rules).

Greedy: the longest prefix of drafts equal to the base's argmax at each position, then the base's argmax.
Sampling (Leviathan et al., 2023, algorithm 1; the rule of transformers' assisted loop): draft `d_i`, drawn from `q_i`,
is accepted with probability `min(1, p_i(d_i) / q_i(d_i))`; at the first rejection the token is resampled from
`norm(max(0, p_i - q_i))`; if every draft is accepted, the next token is sampled from `p_k`. A draft copied from the
context is a one-hot `q`. Either way each output token has the base's distribution.

Token trees (several branches below the round's first token, e.g. the context's copy and the adapter's chain):
greedy keeps the branch with the longest accepted prefix; sampling runs SpecInfer's multi-candidate rule at the root
(Miao et al., 2024): the branches' first tokens are tried in turn, each accepted with probability
`min(1, p(d) / q(d))` against the residual `p` left by the ones rejected before it, and a rejection turns `p` into
`norm(max(0, p - q))`; below an accepted first token its branch is a chain.
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


def accept_tree_greedy(branches: list[tuple[torch.LongTensor, torch.Tensor]]) -> tuple[int, int, int]:
    """(branch, accepted drafts, next token) for `branches`, each (drafts (k,), the base's processed scores at the
    root and after each draft (k + 1, V)): the branch with the longest accepted prefix (the first on a tie)."""
    results = [accept_greedy(drafts, scores) for drafts, scores in branches]
    best = max(range(len(results)), key=lambda index: (results[index][0], -index))
    return best, *results[best]


def accept_tree_sampled(
    branches: list[tuple[torch.LongTensor, torch.Tensor, torch.Tensor]],
) -> tuple[int | None, int, int]:
    """(branch or None, accepted drafts, next token) for `branches`, each (drafts (k,), the scores they were drawn
    from (k, V), the base's processed scores at the root and after each draft (k + 1, V)); every branch has the same
    root scores. SpecInfer's rule at the root, then speculative sampling down the accepted branch."""
    p = branches[0][2][0].softmax(dim=-1)
    for index, (drafts, draft_scores, target_scores) in enumerate(branches):
        if not drafts.numel():
            continue
        q = draft_scores[0].softmax(dim=-1)
        first = int(drafts[0])
        if float(torch.rand(())) < float(p[first] / q[first]):
            accepted, token = accept_sampled(drafts[1:], draft_scores[1:], target_scores[1:])
            return index, accepted + 1, token
        residual = (p - q).clamp(min=0)
        total = residual.sum()
        p = residual / total if total > torch.finfo(total.dtype).tiny else p
    return None, 0, int(torch.multinomial(p, num_samples=1))


__all__ = ["accept_greedy", "accept_sampled", "accept_tree_greedy", "accept_tree_sampled"]
