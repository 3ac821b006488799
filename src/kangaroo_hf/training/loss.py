"""Batches, loss and metrics of draft-vs-base distillation on cached features.

The draft distribution is `softmax(lm_head(adapter(exit_states)))`, the teacher's `softmax(lm_head(last_states))` (the
base's own next-token distribution), or, with token targets, one-hot on the text's next token (for self-distilled
answers, the base's own greedy choice). Both share the frozen LM head, so the head is applied chunk by chunk: only one
(chunk, vocab) block of logits is alive at a time, in training and in evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.stats import KangarooStats
from .features import CachedSequence, FeatureCache


@dataclass
class Batch:
    """Right-padded sequences: exit states (B, T, D), mask (B, T), positions (B, T), and the loss positions."""

    exit_states: torch.Tensor
    attention_mask: torch.Tensor | None  # None when nothing is padded
    position_ids: torch.LongTensor
    loss_mask: torch.Tensor  # (B, T) bool: position t predicts an assistant token t + 1
    teacher_states: torch.Tensor | None  # (N, D): post-norm last-layer states at the N loss positions, row-major order
    target_ids: torch.LongTensor  # (N,): the token each loss position predicts (the text's next token)
    context_states: torch.Tensor | None = None  # (B, T, D) post-norm last-layer states, for adapter_context="final"

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def make_batch(
    sequences: Sequence[CachedSequence],
    device: torch.device | str,
    with_context: bool = False,
    all_tokens: bool = False,
) -> Batch:
    """Pad cached sequences into one float32 batch on `device`.

    Loss positions are those predicting an assistant token, or every position but the last with `all_tokens`;
    `with_context` adds all last-layer states (for `adapter_context="final"`). `teacher_states` is None when the
    sequences carry no last-layer states (a cache built for token targets).
    """
    width = max(len(s.input_ids) for s in sequences)
    hidden_size = sequences[0].exit_states.shape[-1]
    # Padded where the states are (host memory for a disk cache, the accelerator for `OnlineFeatures`).
    exit_states = torch.zeros(
        (len(sequences), width, hidden_size), dtype=torch.float32, device=sequences[0].exit_states.device
    )
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    context = torch.zeros_like(exit_states) if with_context else None
    has_teacher = sequences[0].last_states is not None
    if with_context and not has_teacher:
        raise ValueError("adapter_context='final' needs the base's last-layer states, and these features have none.")
    teacher, target_ids = [], []
    for row, sequence in enumerate(sequences):
        length = len(sequence.input_ids)
        targets = sequence.assistant_mask[1:]  # (T - 1,): does position t predict an assistant token?
        if all_tokens:
            targets = torch.ones_like(targets)
        exit_states[row, :length] = sequence.exit_states.float()
        attention_mask[row, :length] = 1
        loss_mask[row, : length - 1] = targets
        target_ids.append(sequence.input_ids[1:][targets])
        if has_teacher:
            teacher.append(sequence.last_states[: length - 1][targets.to(sequence.last_states.device)].float())
        if context is not None:
            context[row, :length] = sequence.last_states.float()
    padded = bool((attention_mask == 0).any())
    return Batch(
        exit_states=exit_states.to(device),
        attention_mask=attention_mask.to(device) if padded else None,
        position_ids=torch.arange(width, device=device).unsqueeze(0).expand(len(sequences), -1),
        loss_mask=loss_mask.to(device),
        teacher_states=torch.cat(teacher).to(device) if has_teacher else None,
        target_ids=torch.cat(target_ids).long().to(device),
        context_states=context.to(device) if context is not None else None,
    )


def plan_epoch(cache: FeatureCache, batch_tokens: int, seed: int, epoch: int) -> list[tuple[int, list[int]]]:
    """The epoch's micro-batches as (shard, sequence indices), a pure function of (seed, epoch).

    Shards come in a seeded order and every shard's batches consecutively (one shard in memory at a time); inside a
    shard, sequences of similar length are batched up to `batch_tokens` padded tokens and the batches shuffled.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = []
    for shard_index in torch.randperm(len(cache.shards), generator=generator).tolist():
        lengths = cache.shards[shard_index]["lengths"]
        order = sorted(torch.randperm(len(lengths), generator=generator).tolist(), key=lambda i: lengths[i])
        shard_batches, current = [], []
        for index in order:
            if current and (len(current) + 1) * lengths[index] > batch_tokens:
                shard_batches.append(current)
                current = []
            current.append(index)
        if current:
            shard_batches.append(current)
        for position in torch.randperm(len(shard_batches), generator=generator).tolist():
            batches.append((shard_index, shard_batches[position]))
    return batches


def iter_planned(cache: FeatureCache, plan: list[tuple[int, list[int]]], exit_layer: int):
    """Yield the planned lists of sequences, loading a shard only when the plan moves to another one."""
    loaded_index, loaded = None, None
    for shard_index, members in plan:
        if shard_index != loaded_index:
            loaded_index, loaded = shard_index, cache.load_shard(shard_index, exit_layer)
        yield [loaded[i] for i in members]


@dataclass
class DistillStats:
    """Sums over loss tokens (soft cross-entropy, top-1 agreement, expected acceptance), and per-token details."""

    tokens: int = 0
    loss: float = 0.0
    agree: float = 0.0
    expected_acceptance: float = 0.0
    correct: list[torch.Tensor] = field(default_factory=list)
    confidence: list[torch.Tensor] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {
            "loss": self.loss / n,
            "top1_agreement": self.agree / n,
            "expected_acceptance": self.expected_acceptance / n,
            "tokens": self.tokens,
        }


@torch.no_grad()
def distill_loss_chunks(
    lm_head: nn.Module,
    draft_states: torch.Tensor,
    teacher_states: torch.Tensor | None,
    chunk_tokens: int,
    stats: DistillStats,
    loss_scale: float | None = None,
    keep_tokens: bool = False,
    compute_dtype: torch.dtype | None = None,
    vocab_ids: torch.LongTensor | None = None,
    full_teacher: bool = True,
    target_ids: torch.LongTensor | None = None,
) -> torch.Tensor | None:
    """Soft cross-entropy `-sum_v p_base(v) log p_draft(v)` over (N, D) states, one LM-head chunk at a time.

    The base's distribution `p_base` is `softmax(lm_head(teacher_states))`, or, with `teacher_states=None`, one-hot
    on `target_ids` (N,) (token targets: plain cross-entropy on the text's next token).

    The gradient is written out by hand: d(loss)/d(draft logits) = p_draft - p_base, so a chunk costs three LM-head
    matmuls and a few passes over its (chunk, V) logits, with no autograd graph over the vocabulary. With
    `loss_scale`, returns d(loss_scale * sum of losses)/d(draft_states) (N, D), which the caller back-propagates
    through the adapter. `compute_dtype` (e.g. bfloat16) runs the LM-head matmuls in that dtype (softmax in float32).

    `vocab_ids` (S,): the draft scores only these tokens (`KangarooConfig.draft_vocab_size`). With `full_teacher`
    the base's distribution is the full one (exact metrics: a base token outside the subset is a miss); without it,
    the base's logits are restricted to the subset too, which makes training about V / S times cheaper. A target
    token outside the subset has no loss (nothing the draft can do about it) and counts as a miss.
    Metrics go to `stats` (and per-token correctness / confidence when `keep_tokens`).
    """
    if teacher_states is None and target_ids is None:
        raise ValueError("distill_loss_chunks needs teacher_states or target_ids.")
    weight = lm_head.weight if compute_dtype is None else lm_head.weight.to(compute_dtype)  # (V, D)
    bias = getattr(lm_head, "bias", None)
    draft_weight, draft_bias = weight, bias
    if vocab_ids is not None:
        draft_weight = weight[vocab_ids]  # (S, D)
        draft_bias = bias[vocab_ids] if bias is not None else None
    subset_teacher = vocab_ids is not None and not full_teacher
    grads = []
    for start in range(0, draft_states.shape[0], chunk_tokens):
        if teacher_states is None:
            targets = target_ids[start : start + chunk_tokens]
            teacher_top, teacher_p = _one_hot_teacher(targets, vocab_ids, draft_weight.shape[0])  # (n, S or V)
            if vocab_ids is not None and not subset_teacher:
                teacher_top = targets  # compared with draft ids mapped back to the vocabulary below
        else:
            teacher = teacher_states[start : start + chunk_tokens].to(weight.dtype)
            if subset_teacher:
                teacher_logits = F.linear(teacher, draft_weight, draft_bias).float()  # (n, S)
            else:
                teacher_logits = F.linear(teacher, weight, bias).float()  # (n, V)
            teacher_top = teacher_logits.argmax(-1)
            teacher_p = teacher_logits.softmax(-1)
            del teacher_logits
        draft_logits = F.linear(draft_states[start : start + chunk_tokens].to(weight.dtype), draft_weight, draft_bias)
        draft_logits = draft_logits.float()  # (n, S or V)
        draft_top = draft_logits.argmax(-1)
        if vocab_ids is not None and not subset_teacher:
            draft_top = vocab_ids[draft_top]
            if teacher_states is not None:
                teacher_p = teacher_p[:, vocab_ids]  # mass the draft can match; the rest is lost to it
        correct = draft_top == teacher_top
        log_normalizer = draft_logits.logsumexp(-1)  # (n,)
        loss = log_normalizer * teacher_p.sum(-1) - torch.einsum("nv,nv->n", teacher_p, draft_logits)  # (n,)
        draft_p = draft_logits.sub_(log_normalizer.unsqueeze(-1)).exp_()  # in place: draft probabilities
        stats.tokens += loss.shape[0]
        stats.loss += float(loss.sum())
        stats.agree += float(correct.sum())
        # Probability that speculative sampling accepts a draft token (Leviathan et al.): sum_v min(p, q).
        stats.expected_acceptance += float(torch.minimum(teacher_p, draft_p).sum())
        if keep_tokens:
            stats.correct.append(correct.cpu())
            stats.confidence.append(draft_p.max(-1).values.cpu())
        if loss_scale is not None:
            grad_logits = draft_p.mul_(teacher_p.sum(-1, keepdim=True)).sub_(teacher_p).mul_(loss_scale)
            grads.append((grad_logits.to(weight.dtype) @ draft_weight).float())  # (n, D)
    return torch.cat(grads) if grads else None


def _one_hot_teacher(
    target_ids: torch.LongTensor, columns: torch.LongTensor | None, width: int
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Token targets (n,) as a teacher over the draft's columns: the vocabulary, or the sorted ids `columns` (S,).

    Returns the target's column (-1 for a target outside `columns`) and the distribution (n, width), one-hot on that
    column (all zero for an outside target: no loss, and a miss).
    """
    if columns is None:
        index, inside = target_ids, torch.ones_like(target_ids, dtype=torch.bool)
    else:
        index = torch.searchsorted(columns, target_ids).clamp_(max=columns.numel() - 1)
        inside = columns[index] == target_ids
    one_hot = torch.zeros((target_ids.shape[0], width), dtype=torch.float32, device=target_ids.device)
    one_hot.scatter_(1, index.unsqueeze(1), inside.unsqueeze(1).float())
    return torch.where(inside, index, -1), one_hot


def draft_vocab_ids(model: nn.Module) -> torch.LongTensor | None:
    """The draft vocabulary of `model` (`set_draft_vocab`), or None when drafts use the full vocabulary."""
    ids = getattr(model.adapter, "draft_vocab_ids", None)
    return ids if ids is not None and ids.numel() else None


def simulate_tau(
    correct: Sequence[Sequence[Sequence[bool]]],
    confidence: Sequence[Sequence[Sequence[float]]],
    draft_threshold: float,
    max_draft: int,
) -> dict[str, Any]:
    """Replay greedy Kangaroo decoding on teacher-forced answers: mean accepted tokens per verification step.

    `correct[r][d][i]` says whether the draft's argmax at the i-th position of answer `r`, drafted `d` deep into a
    round, equals the base's (one depth, `d = 0`, when the draft does not depend on it). While every
    earlier draft of a round is right, the draft sees exactly the true tokens, so teacher-forced predictions are what
    drafting produces. A round starting at i drafts while confident (a draft below `draft_threshold` ends the round
    but is still verified) up to `max_draft`, accepts the leading correct drafts and adds the base's bonus token. An
    answer's first token comes from the prefill (one step) and its last (end of turn) is never drafted, as in
    `generate()`. Exact for self-distilled answers; on other text it assumes the base would write that text.
    """
    stats = KangarooStats(max_draft_tokens=max_draft)
    for run_correct, run_confidence in zip(correct, confidence, strict=True):
        m = len(run_correct[0])
        if m == 0:
            continue
        deepest = len(run_correct) - 1
        stats.record_step(drafted=0, accepted=0)  # the prefill gives the first token
        i = 1
        while i < m:
            drafted = 0
            while drafted < max_draft and i + drafted < m - 1:
                drafted += 1
                if run_confidence[min(drafted - 1, deepest)][i + drafted - 1] < draft_threshold:
                    break
            accepted = 0
            while accepted < drafted and run_correct[min(accepted, deepest)][i + accepted]:
                accepted += 1
            stats.record_step(drafted, accepted)
            i += accepted + 1
    return {
        "tau": stats.mean_accepted_tokens,
        "acceptance_rate_by_position": stats.acceptance_rate_by_position,
        "drafts_per_step": stats.drafted_tokens / stats.verify_steps if stats.verify_steps else 0.0,
    }


def answer_runs(loss_mask: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor]:
    """Split per-loss-token `values` (N,) into runs of consecutive loss positions (one run per assistant turn)."""
    runs, offset = [], 0
    for row in range(loss_mask.shape[0]):
        positions = loss_mask[row].nonzero().flatten().cpu()
        if positions.numel() == 0:
            continue
        breaks = (((positions[1:] - positions[:-1]) != 1).nonzero().flatten() + 1).tolist()
        for run in torch.tensor_split(torch.arange(positions.numel()), breaks):
            runs.append(values[offset + run])
        offset += positions.numel()
    return runs


def draft_states(
    model: nn.Module, batch: Batch, adapter: nn.Module | None = None, draft_depth: int | torch.Tensor = 0
) -> torch.Tensor:
    """Adapter output (B, T, D) over a whole batch; with `adapter_context="final"`, as drafted `draft_depth` deep.

    `adapter` is what to call (e.g. the DDP-wrapped training module); by default the model's `adapter_forward`.
    """
    call = adapter if adapter is not None else model.adapter_forward
    if batch.context_states is None:
        return call(batch.exit_states, batch.position_ids, None, batch.attention_mask)
    return call(
        batch.exit_states,
        batch.position_ids,
        None,
        batch.attention_mask,
        context_states=batch.context_states,
        draft_depth=draft_depth,
    )


def uses_final_context(model: nn.Module) -> bool:
    """Whether the adapter attends to verified tokens' final states (`adapter_context="final"`)."""
    return getattr(model.config, "adapter_context", "exit") == "final"


@torch.no_grad()
def evaluate_adapter(
    model: nn.Module,
    cache: FeatureCache,
    batch_tokens: int = 16384,
    chunk_tokens: int = 2048,
    thresholds: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8),
    compute_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Validation metrics of `model`'s adapter on a feature cache (assistant tokens only).

    Returns `loss`, `top1_agreement`, `expected_acceptance`, `tokens` (of the first draft of a round) and
    `simulated_tau` per draft threshold (with the model's `max_draft_tokens`; see `simulate_tau`), plus the
    acceptance rate by draft position at the model's own `draft_threshold`. With `adapter_context="final"` every
    draft depth is evaluated (`top1_agreement_by_depth`), since a draft sees fewer final states the deeper it is.
    """
    device = model.parts.lm_head.weight.device
    max_draft = model.config.max_draft_tokens
    depths = range(max_draft) if uses_final_context(model) else range(1)
    stats = [DistillStats() for _ in depths]
    runs_correct, runs_confidence = [], []
    for sequences in iter_planned(cache, plan_epoch(cache, batch_tokens, 0, 0), model.config.exit_layer):
        batch = make_batch(sequences, device, with_context=uses_final_context(model))
        by_depth_correct, by_depth_confidence = [], []
        for depth in depths:
            hidden = draft_states(model, batch, draft_depth=depth)
            distill_loss_chunks(
                model.parts.lm_head,
                hidden[batch.loss_mask],
                batch.teacher_states,
                chunk_tokens,
                stats[depth],
                keep_tokens=True,
                compute_dtype=compute_dtype,
                vocab_ids=draft_vocab_ids(model),
                target_ids=batch.target_ids,
            )
            by_depth_correct.append(answer_runs(batch.loss_mask, torch.cat(stats[depth].correct)))
            by_depth_confidence.append(answer_runs(batch.loss_mask, torch.cat(stats[depth].confidence)))
            stats[depth].correct.clear()
            stats[depth].confidence.clear()
        for run in range(len(by_depth_correct[0])):
            runs_correct.append([per_depth[run].tolist() for per_depth in by_depth_correct])
            runs_confidence.append([per_depth[run].tolist() for per_depth in by_depth_confidence])
    metrics: dict[str, Any] = stats[0].summary()
    if len(stats) > 1:
        metrics["top1_agreement_by_depth"] = [round(s.summary()["top1_agreement"], 4) for s in stats]
        metrics["expected_acceptance_by_depth"] = [round(s.summary()["expected_acceptance"], 4) for s in stats]
    metrics["simulated_tau"] = {
        str(t): round(simulate_tau(runs_correct, runs_confidence, t, max_draft)["tau"], 4) for t in thresholds
    }
    own = simulate_tau(runs_correct, runs_confidence, model.config.draft_threshold, max_draft)
    metrics["simulated_acceptance_rate_by_position"] = [round(r, 4) for r in own["acceptance_rate_by_position"]]
    metrics["simulated_max_draft_tokens"] = max_draft
    return metrics


__all__ = [
    "Batch",
    "DistillStats",
    "answer_runs",
    "distill_loss_chunks",
    "draft_states",
    "draft_vocab_ids",
    "evaluate_adapter",
    "iter_planned",
    "make_batch",
    "plan_epoch",
    "simulate_tau",
    "uses_final_context",
]
