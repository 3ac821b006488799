"""adapter_context="final": the adapter attends to verified final states; lossless, training matches drafting."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import VOCAB, make_kangaroo, mimic_early_exit, tiny_base, weaken_deep_layers
from kangaroo_hf import KangarooCandidateGenerator, KangarooConfig, KangarooForCausalLM


def _final_context_model(arch: str = "llama", **kwargs) -> KangarooForCausalLM:
    base = tiny_base(arch)
    weaken_deep_layers(base, 2, scale=0.25)
    model = KangarooForCausalLM.from_base(base, exit_layer=2, adapter_context="final", **kwargs).eval()
    mimic_early_exit(model)
    with torch.no_grad():  # keep the attention's contribution non-zero so the context matters
        model.adapter.layers[0].self_attn.o_proj.weight.normal_(0, 0.02)
    return model


def _prompt(length: int, seed: int) -> torch.LongTensor:
    return torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def test_final_context_greedy_is_lossless(arch):
    model = _final_context_model(arch, draft_threshold=0.0, max_draft_tokens=4)
    for seed in range(3):
        input_ids = _prompt(4 + 3 * seed, seed)
        expected = model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=30)
        assert model.generate(input_ids, do_sample=False, max_new_tokens=30).tolist() == expected.tolist()
    stats = model.last_generate_stats
    assert 0 < stats.accepted_drafts < stats.drafted_tokens


@pytest.mark.parametrize("trust_ngram", [0, 1])
def test_final_context_adapter_cache_holds_final_states_of_the_verified_context(monkeypatch, trust_ngram):
    """Also when rounds that copy a trusted context match skip the adapter: it catches up before it next drafts."""
    lookup = dict(lookup_num_tokens=4, lookup_trust_ngram=trust_ngram) if trust_ngram else {}
    model = _final_context_model("qwen2", draft_threshold=0.0, max_draft_tokens=3, **lookup)
    snapshots = []
    original = KangarooCandidateGenerator._draft

    def spy(self, input_ids, cache, model_kwargs, *args):
        snapshots.append((input_ids.clone(), self.adapter_cache.layers[0].keys.clone()))
        return original(self, input_ids, cache, model_kwargs, *args)

    monkeypatch.setattr(KangarooCandidateGenerator, "_draft", spy)
    phrase = _prompt(5, 1)
    input_ids = torch.cat([phrase, _prompt(2, 2), phrase, _prompt(1, 3), phrase[:, :2]], dim=1)
    output = model.generate(input_ids, do_sample=False, max_new_tokens=25)
    assert output.tolist() == model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=25).tolist()
    stats = model.last_generate_stats
    skipped = stats.verify_steps - 1 - len(snapshots)  # rounds that copied a trusted match without drafting
    assert skipped > 0 if trust_ngram else skipped == 0
    with torch.no_grad():
        for input_ids, keys in snapshots:
            context = input_ids[:, :-1]
            final_states = model(context, output_exit_hidden_states=True, use_cache=False).final_hidden_states
            fresh = DynamicCache()
            positions = torch.arange(context.shape[1]).view(1, -1)
            model.adapter_add_context(final_states, positions, fresh)
            torch.testing.assert_close(keys, fresh.layers[0].keys, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_training_form_matches_incremental_drafting(depth):
    """The one-pass training attention equals what drafting computes `depth` drafts into a round."""
    model = _final_context_model("mistral")
    sequence = _prompt(12, 2)
    with torch.no_grad():
        out = model(sequence, output_exit_hidden_states=True, use_cache=False)
        exit_states, final_states = out.exit_hidden_states, out.final_hidden_states
        positions = torch.arange(12).view(1, -1)
        trained = model.adapter_forward(exit_states, positions, None, context_states=final_states, draft_depth=depth)
        for t in range(depth, 12):
            cache = DynamicCache()
            first = t - depth
            if first:
                model.adapter_add_context(final_states[:, :first], positions[:, :first], cache)
            hidden = model.adapter_forward(exit_states[:, first : t + 1], positions[:, first : t + 1], cache)
            torch.testing.assert_close(trained[:, t], hidden[:, -1], rtol=1e-4, atol=1e-5)


def test_training_form_with_padding_and_per_position_depth():
    model = _final_context_model("llama")
    sequences = torch.cat([_prompt(10, 3), _prompt(10, 4)])
    attention_mask = torch.ones_like(sequences)
    attention_mask[1, :4] = 0  # left padding in the second row
    with torch.no_grad():
        out = model(sequences, attention_mask=attention_mask, output_exit_hidden_states=True, use_cache=False)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        depth = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
        hidden = model.adapter_forward(
            out.exit_hidden_states, positions, None, attention_mask, out.final_hidden_states, draft_depth=depth
        )
    assert torch.isfinite(hidden).all()
    # The unpadded row does not depend on the padded one.
    with torch.no_grad():
        alone = model.adapter_forward(
            out.exit_hidden_states[:1], positions[:1], None, None, out.final_hidden_states[:1], draft_depth=depth
        )
    torch.testing.assert_close(hidden[:1], alone, rtol=1e-5, atol=1e-6)


def test_final_context_needs_one_adapter_layer_and_known_values():
    config = tiny_base("llama").config
    with pytest.raises(ValueError, match="adapter_context='final' needs adapter_num_layers=1, got 2"):
        KangarooConfig(base_config=config, adapter_context="final", adapter_num_layers=2)
    with pytest.raises(ValueError, match=r"adapter_context must be one of \('exit', 'final'\), got 'last'"):
        KangarooConfig(base_config=config, adapter_context="last")
    exit_model = make_kangaroo("llama")
    with pytest.raises(ValueError, match="context_states need adapter_context='final'"):
        states = torch.zeros(1, 3, 64)
        exit_model.adapter_forward(states, torch.arange(3).view(1, -1), None, context_states=states)
