"""Greedy Kangaroo decoding returns exactly what the base's greedy decoding returns."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import VOCAB, make_kangaroo, tiny_tokenizer


def _prompt(length: int, seed: int) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (1, length), generator=generator)


def _assert_same_as_base(model, input_ids, draft_threshold=None, max_draft_tokens=None, **kwargs) -> torch.LongTensor:
    expected = model.get_base_model().generate(input_ids, do_sample=False, **kwargs)
    actual = model.generate(
        input_ids, do_sample=False, draft_threshold=draft_threshold, max_draft_tokens=max_draft_tokens, **kwargs
    )
    assert actual.tolist() == expected.tolist()
    return actual


@pytest.mark.compat
@pytest.mark.parametrize("agreement", ["mixed", "random"])
def test_greedy_identical_across_settings(arch, agreement):
    model = make_kangaroo(arch, exit_layer=2, agreement=agreement)
    settings = list(itertools.product([0.0, 0.3, 0.6, 1.0], [1, 3, 6]))
    for case, (threshold, max_drafts) in enumerate(settings):
        input_ids = _prompt(length=1 + (case * 5) % 23, seed=case)
        _assert_same_as_base(
            model, input_ids, max_new_tokens=24, draft_threshold=threshold, max_draft_tokens=max_drafts
        )
        stats = model.last_generate_stats
        assert stats.new_tokens == 24
        assert stats.new_tokens == stats.verify_steps + stats.accepted_drafts


@pytest.mark.parametrize("exit_layer", [1, 3])
def test_greedy_identical_other_exit_layers(arch, exit_layer):
    model = make_kangaroo(arch, exit_layer=exit_layer, draft_threshold=0.0, max_draft_tokens=4)
    for seed in range(3):
        _assert_same_as_base(model, _prompt(6 + seed, seed), max_new_tokens=30)


def test_mixed_agreement_exercises_accept_and_reject_paths():
    """The fixtures must produce all-accepted rounds and rejections, or the tests above prove little."""
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=3)
    model.generate(_prompt(8, 0), do_sample=False, max_new_tokens=60)
    stats = model.last_generate_stats
    assert stats.accepted_by_position[2] > 0  # some rounds accepted every draft
    assert stats.accepted_drafts < stats.drafted_tokens  # some drafts were rejected


def test_threshold_zero_drafts_to_the_maximum_and_one_stops_after_one():
    model = make_kangaroo("llama", max_draft_tokens=4)
    model.generate(_prompt(5, 1), do_sample=False, max_new_tokens=40, draft_threshold=0.0)
    stats = model.last_generate_stats
    rounds_with_drafts = stats.verify_steps - 1  # the prefill drafts nothing
    # Every round drafts 4, except the last rounds that the length budget caps.
    assert stats.drafted_by_position[3] >= rounds_with_drafts - 2
    model.generate(_prompt(5, 1), do_sample=False, max_new_tokens=40, draft_threshold=1.0)
    stats = model.last_generate_stats
    assert stats.drafted_by_position[1:] == [0, 0, 0]
    assert stats.drafted_tokens == stats.verify_steps - 1


def test_one_token_prompt(arch):
    model = make_kangaroo(arch, draft_threshold=0.0, max_draft_tokens=5)
    _assert_same_as_base(model, torch.tensor([[7]]), max_new_tokens=20)


@pytest.mark.parametrize("max_new_tokens", range(1, 10))
def test_max_new_tokens_reached_mid_draft(max_new_tokens):
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=6)
    input_ids = _prompt(4, 3)
    out = _assert_same_as_base(model, input_ids, max_new_tokens=max_new_tokens)
    assert out.shape[1] == 4 + max_new_tokens
    assert model.last_generate_stats.new_tokens == max_new_tokens


def test_eos_inside_a_draft(arch):
    model = make_kangaroo(arch, draft_threshold=0.0, max_draft_tokens=6)
    input_ids = _prompt(5, 4)
    free_run = model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=30)[0, 5:].tolist()
    # A token that first appears well inside the continuation, where a round is mid-draft.
    eos = next(token for i, token in enumerate(free_run) if i >= 7 and token not in free_run[:i])
    out = _assert_same_as_base(model, input_ids, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    assert out[0, -1].item() == eos
    assert out.shape[1] == 5 + free_run.index(eos) + 1


def test_stop_strings():
    tokenizer = tiny_tokenizer()
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=6)
    input_ids = _prompt(6, 5)
    free_run = model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=30)[0, 6:]
    tokens = tokenizer.convert_ids_to_tokens(free_run.tolist())
    stop = tokens[8] + tokens[9]  # spans two tokens, completed mid-continuation
    out = _assert_same_as_base(model, input_ids, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer)
    generated = "".join(tokenizer.convert_ids_to_tokens(out[0, 6:].tolist()))
    assert generated.endswith(stop) and generated.count(stop) == 1


def test_explicit_attention_mask(arch):
    model = make_kangaroo(arch, draft_threshold=0.0, max_draft_tokens=4)
    input_ids = _prompt(9, 6)
    _assert_same_as_base(model, input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=20)


def test_left_padded_attention_mask(arch):
    model = make_kangaroo(arch, draft_threshold=0.0, max_draft_tokens=4)
    input_ids = _prompt(9, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, :3] = 0
    _assert_same_as_base(model, input_ids, attention_mask=attention_mask, max_new_tokens=20, pad_token_id=0)


def test_repeated_generate_calls_on_one_model():
    model = make_kangaroo("qwen2", draft_threshold=0.2, max_draft_tokens=3)
    for seed in range(6):
        _assert_same_as_base(model, _prompt(3 + seed, 10 + seed), max_new_tokens=15)
    first = model.generate(_prompt(4, 99), do_sample=False, max_new_tokens=15)
    again = model.generate(_prompt(4, 99), do_sample=False, max_new_tokens=15)
    assert first.tolist() == again.tolist()


def test_use_kangaroo_false_is_plain_decoding():
    model = make_kangaroo("llama")
    input_ids = _prompt(5, 11)
    out = model.generate(input_ids, do_sample=False, max_new_tokens=12, use_kangaroo=False)
    assert model.last_generate_stats is None
    assert out.tolist() == model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=12).tolist()
