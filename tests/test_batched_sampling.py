"""Sampling a batch with Kangaroo keeps every row's distribution the base's, at drafted positions too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kangaroo_hf.core import batched
from test_generation_sampling import NEW_TOKENS, SAMPLING, VOCAB, _chi_square_p_value, _exact_marginals, _small_model

SAMPLES = 1200
PROMPTS = ([1, 4, 7, 2], [3, 5])  # the second row is left-padded


def _batch() -> tuple[torch.LongTensor, torch.LongTensor]:
    width = max(len(prompt) for prompt in PROMPTS)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    return input_ids, attention_mask


def _min_p_value_per_row(model) -> tuple[list[float], int]:
    input_ids, attention_mask = _batch()
    torch.manual_seed(4321)
    counts = np.zeros((len(PROMPTS), NEW_TOKENS, VOCAB))
    accepted = 0
    for _ in range(SAMPLES):
        out = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, **SAMPLING
        )
        for row in range(len(PROMPTS)):
            for position, token in enumerate(out[row, input_ids.shape[1] :].tolist()):
                counts[row, position, token] += 1
        accepted += model.last_generate_stats.accepted_drafts
    p_values = []
    for row, prompt in enumerate(PROMPTS):
        exact = _exact_marginals(model, torch.tensor([prompt]))
        p_values.append(min(_chi_square_p_value(counts[row, i], exact[i]) for i in range(NEW_TOKENS)))
    return p_values, accepted


@pytest.fixture(scope="module")
def model():
    return _small_model()


@pytest.mark.compat
def test_every_row_keeps_the_base_distribution(model):
    p_values, accepted = _min_p_value_per_row(model)
    assert accepted > SAMPLES // 2  # drafts were accepted, so the speculative rule was exercised
    assert min(p_values) > 1e-4, p_values


def _accept_every_draft(branches):
    drafts, _, target_scores = branches[0]
    return 0, drafts.numel(), int(torch.multinomial(target_scores[drafts.numel()].softmax(-1), 1))


def _resample_from_p_not_residual(branches):
    """Accept with min(1, p/q), but resample a rejection from p instead of norm(max(0, p - q))."""
    drafts, draft_scores, target_scores = branches[0]
    p = target_scores.softmax(-1)
    count = drafts.numel()
    if count:
        ratio = p[torch.arange(count), drafts] / draft_scores.softmax(-1)[torch.arange(count), drafts]
        accepted = int(((torch.rand_like(ratio) >= ratio).long().cumsum(0) == 0).sum())
    else:
        accepted = 0
    return 0, accepted, int(torch.multinomial(p[accepted], 1))


@pytest.mark.parametrize("broken_rule", [_accept_every_draft, _resample_from_p_not_residual])
def test_a_wrong_acceptance_rule_is_detected(model, monkeypatch, broken_rule):
    monkeypatch.setattr(batched, "accept_tree_sampled", broken_rule)
    p_values, _ = _min_p_value_per_row(model)
    assert min(p_values) < 1e-6
