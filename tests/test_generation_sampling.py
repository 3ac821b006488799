"""Sampling with Kangaroo has the base's output distribution, at drafted positions too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers.generation.utils as generation_utils
from scipy.stats import chi2
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from conftest import ARCHS, tiny_base
from kangaroo_hf import KangarooCandidateGenerator, KangarooForCausalLM

VOCAB = 10
NEW_TOKENS = 3
SAMPLES = 1500
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=8, top_p=0.95)


def _small_model(arch: str = "llama") -> KangarooForCausalLM:
    base = tiny_base(arch, seed=3, vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32, initializer_range=0.3)
    return KangarooForCausalLM.from_base(base, exit_layer=1, draft_threshold=0.0, max_draft_tokens=NEW_TOKENS).eval()


def _exact_marginals(model: KangarooForCausalLM, prompt: torch.LongTensor) -> np.ndarray:
    """P(token at new position i) under the base with the same warpers, by enumerating every continuation."""
    warpers = LogitsProcessorList(
        [
            TemperatureLogitsWarper(SAMPLING["temperature"]),
            TopKLogitsWarper(SAMPLING["top_k"]),
            TopPLogitsWarper(SAMPLING["top_p"]),
        ]
    )
    base = model.get_base_model()
    marginals = np.zeros((NEW_TOKENS, VOCAB))
    prefixes = {(): 1.0}
    with torch.no_grad():
        for position in range(NEW_TOKENS):
            continuations = list(prefixes)
            ids = torch.tensor([list(prompt[0].tolist()) + list(c) for c in continuations])
            logits = base(ids).logits[:, -1].float()
            probs = torch.stack([warpers(ids[i : i + 1], logits[i : i + 1])[0] for i in range(len(ids))]).softmax(-1)
            next_prefixes = {}
            for row, prefix in enumerate(continuations):
                for token in range(VOCAB):
                    p = prefixes[prefix] * probs[row, token].item()
                    marginals[position, token] += p
                    if p > 0:
                        next_prefixes[prefix + (token,)] = p
            prefixes = next_prefixes
    return marginals


def _sampled_counts(model: KangarooForCausalLM, prompt: torch.LongTensor) -> tuple[np.ndarray, int]:
    torch.manual_seed(1234)
    counts = np.zeros((NEW_TOKENS, VOCAB))
    accepted = 0
    for _ in range(SAMPLES):
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, pad_token_id=0, **SAMPLING)
        for position, token in enumerate(out[0, prompt.shape[1] :].tolist()):
            counts[position, token] += 1
        accepted += model.last_generate_stats.accepted_drafts
    return counts, accepted


def _chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected >= 5  # pool rare tokens into one cell so the chi-square approximation holds
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    return float(chi2.sf(statistic, df=len(observed) - 1))


def _min_p_value_at_drafted_positions(model, prompt) -> tuple[float, int]:
    exact = _exact_marginals(model, prompt)
    counts, accepted = _sampled_counts(model, prompt)
    # Position 0 comes from the prefill; positions 1.. are drafted, verified and possibly resampled.
    return min(_chi_square_p_value(counts[i], exact[i]) for i in range(1, NEW_TOKENS)), accepted


@pytest.fixture(scope="module")
def model_and_prompt():
    return _small_model(), torch.tensor([[1, 4, 7, 2]])


@pytest.mark.compat
@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_matches_the_base_distribution(model_and_prompt, arch):
    model, prompt = model_and_prompt if arch == "llama" else (_small_model(arch), model_and_prompt[1])
    p_value, accepted = _min_p_value_at_drafted_positions(model, prompt)
    assert accepted > SAMPLES // 10  # drafts were really accepted, not only resampled
    assert p_value > 1e-3


def test_sampling_with_copied_drafts_and_a_reduced_draft_vocabulary(model_and_prompt, monkeypatch):
    """One-hot proposals copied from the context and drafts over a token subset keep the base's distribution."""
    model, prompt = model_and_prompt
    model.set_draft_vocab(list(range(2, VOCAB)))
    monkeypatch.setattr(model.config, "lookup_num_tokens", 2)
    try:
        p_value, accepted = _min_p_value_at_drafted_positions(model, prompt)
        assert model.last_generate_stats is not None
    finally:
        model.set_draft_vocab(None)
    assert accepted > SAMPLES // 10
    assert p_value > 1e-3


def test_sampling_with_copies_chosen_by_the_lookup_hit_rate(model_and_prompt, monkeypatch):
    """Copies made because the context's hit rate beats the adapter's confidence (here from the first round: the
    rate starts at 1) are one-hot proposals too, whatever the adapter drafted: the base's distribution holds."""
    model, _ = model_and_prompt
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 4]])  # every token but 0 and 1 has an earlier occurrence
    monkeypatch.setattr(model.config, "lookup_num_tokens", 2)
    monkeypatch.setattr(model.config, "lookup_hit_rate_decay", 0.9)
    original_init = KangarooCandidateGenerator.__init__

    generator_stats = []

    def init_with_a_high_rate(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.lookup.hit_rate = 1.0
        generator_stats.append(self.stats)

    monkeypatch.setattr(KangarooCandidateGenerator, "__init__", init_with_a_high_rate)
    p_value, accepted = _min_p_value_at_drafted_positions(model, prompt)
    assert sum(stats.lookup_rounds for stats in generator_stats) > SAMPLES // 2  # most generations copied
    assert accepted > SAMPLES // 20  # copies were accepted too, not only rejected and resampled
    assert p_value > 1e-3, p_value


@pytest.mark.parametrize("adapter_context, adapter_num_layers", [("exit", 2), ("final", 1)])
def test_sampling_with_full_decoder_layer_adapters(adapter_context, adapter_num_layers):
    """Full-layer adapters (the shipped one: two layers over exit states) keep the base's distribution."""
    base = tiny_base("llama", seed=3, vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32, initializer_range=0.3)
    model = KangarooForCausalLM.from_base(
        base,
        exit_layer=1,
        draft_threshold=0.0,
        max_draft_tokens=NEW_TOKENS,
        adapter_context=adapter_context,
        adapter_mlp=True,
        adapter_num_layers=adapter_num_layers,
    ).eval()
    p_value, accepted = _min_p_value_at_drafted_positions(model, torch.tensor([[1, 4, 7, 2]]))
    assert accepted > SAMPLES // 10
    assert p_value > 1e-3


def _accept_every_draft(candidate_input_ids, candidate_logits, candidate_length, new_logits, **kwargs):
    """A wrong acceptance rule: keep every draft, then sample the bonus from the base."""
    bonus = torch.multinomial(new_logits[:, candidate_length].softmax(-1), 1)
    return torch.cat([candidate_input_ids[:, -candidate_length:], bonus], dim=-1), candidate_length


def _resample_from_p_not_residual(candidate_input_ids, candidate_logits, candidate_length, new_logits, **kwargs):
    """A subtler wrong rule: accept with min(1, p/q) but resample a rejection from p instead of norm(max(0, p-q))."""
    drafts = candidate_input_ids[:, -candidate_length:]
    q = candidate_logits.softmax(-1)[0, torch.arange(candidate_length), drafts[0]]
    p_all = new_logits.softmax(-1)
    p = p_all[0, torch.arange(candidate_length), drafts[0]]
    accepted = ((torch.rand_like(p) > p / q).cumsum(-1) < 1).sum().item()
    token = torch.multinomial(p_all[:, accepted], 1)
    return torch.cat([drafts[:, :accepted], token], dim=-1), accepted


@pytest.mark.compat
@pytest.mark.parametrize("broken_rule", [_accept_every_draft, _resample_from_p_not_residual])
def test_a_wrong_acceptance_rule_is_detected(model_and_prompt, monkeypatch, broken_rule):
    """The statistical test above has teeth: it rejects the distribution a wrong rule produces."""
    model, prompt = model_and_prompt
    monkeypatch.setattr(generation_utils, "_speculative_sampling", broken_rule)
    p_value, _ = _min_p_value_at_drafted_positions(model, prompt)
    assert p_value < 1e-6


def test_candidate_logits_are_the_processed_distribution_drafts_were_sampled_from(model_and_prompt, monkeypatch):
    model, prompt = model_and_prompt
    seen = []
    original = generation_utils._speculative_sampling

    def spy(candidate_input_ids, candidate_logits, candidate_length, new_logits, **kwargs):
        seen.append(candidate_logits.clone())
        return original(candidate_input_ids, candidate_logits, candidate_length, new_logits, **kwargs)

    monkeypatch.setattr(generation_utils, "_speculative_sampling", spy)
    torch.manual_seed(0)
    model.generate(prompt, max_new_tokens=6, pad_token_id=0, **SAMPLING)
    assert seen
    for logits in seen:
        finite = torch.isfinite(logits).sum(-1)
        assert (finite <= SAMPLING["top_k"]).all()  # top-k applied: the warped, not the raw, distribution
