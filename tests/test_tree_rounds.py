"""Tree rounds: the context's copy and the adapter's chain verified together in one forward, losslessly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_kangaroo
from kangaroo_hf import KangarooForCausalLM
from kangaroo_hf.core import batched
from kangaroo_hf.core.acceptance import accept_greedy, accept_sampled
from kangaroo_hf.core.slots import FULL_ATTENTION, SlotTable
from test_batched import LENGTHS, assert_same_as_base, batch
from test_generation_sampling import NEW_TOKENS, SAMPLING, VOCAB, _chi_square_p_value, _exact_marginals
from test_transformers_integration import RecordingStreamer

TREE = dict(lookup_num_tokens=3, lookup_max_tokens=8, tree_rounds=True)


@pytest.mark.compat
@pytest.mark.parametrize("rows", [1, len(LENGTHS)])
def test_greedy_tree_rounds_equal_the_base(arch, rows, monkeypatch):
    branch_counts = []
    original = batched.accept_tree_greedy
    monkeypatch.setattr(
        batched, "accept_tree_greedy", lambda branches: branch_counts.append(len(branches)) or original(branches)
    )
    model = make_kangaroo(arch, draft_threshold=0.05, **TREE)
    for seed in range(3):
        input_ids, attention_mask = batch(seed=seed, repeat=True)
        assert_same_as_base(model, input_ids[-rows:], attention_mask[-rows:], max_new_tokens=30)
    assert branch_counts.count(2) > 3  # rounds verified the copy and the chain together


SECOND_CHOICE = dict(TREE, tree_second_choice_threshold=0.02)


@pytest.mark.compat
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_tree_rounds_with_the_second_choice_equal_the_base(arch, monkeypatch):
    """Rounds of three branches (the copy, the chain and the adapter's second-choice first draft) stay lossless, and
    the second choice is kept where the base picks it."""
    kept = []
    original = batched.accept_tree_greedy

    def spy(branches):
        result = original(branches)
        kept.append((len(branches), result[0], result[1]))
        return result

    monkeypatch.setattr(batched, "accept_tree_greedy", spy)
    model = make_kangaroo(arch, draft_threshold=0.05, **SECOND_CHOICE)
    for seed in range(2):
        assert_same_as_base(model, *batch(seed=seed, repeat=True), max_new_tokens=30)
    assert any(branches == 3 for branches, _, _ in kept)
    assert any(branches == 3 and chosen == 2 and accepted == 1 for branches, chosen, accepted in kept)


@pytest.mark.parametrize("settings", [dict(adapter_context="final"), dict(max_draft_tokens=1, tree_max_nodes=3)])
def test_tree_rounds_with_other_drafting_options(settings):
    model = make_kangaroo("qwen2", draft_threshold=0.05, **{**TREE, **settings})
    assert_same_as_base(model, *batch(seed=2, repeat=True), max_new_tokens=24, repetition_penalty=1.2)


def test_a_tree_round_never_accepts_less_than_its_better_branch(monkeypatch):
    """Greedy: the kept branch is the one the base accepts further, whichever it is."""
    kept = []
    original = batched.accept_tree_greedy

    def spy(branches):
        result = original(branches)
        alone = [accept_greedy(drafts, scores)[0] for drafts, scores in branches]
        kept.append((result[1], max(alone), len(branches)))
        return result

    monkeypatch.setattr(batched, "accept_tree_greedy", spy)
    model = make_kangaroo("llama", draft_threshold=0.05, **TREE)
    assert_same_as_base(model, *batch(seed=4, repeat=True), max_new_tokens=30)
    assert any(branches == 2 for _, _, branches in kept)
    assert all(accepted == best for accepted, best, _ in kept)


def test_streamer_with_tree_rounds_at_batch_one():
    model = make_kangaroo("llama", draft_threshold=0.05, **TREE)
    input_ids, _ = batch(lengths=(9,), seed=5, repeat=True)
    streamer = RecordingStreamer()
    out = model.generate(input_ids, do_sample=False, max_new_tokens=20, streamer=streamer)
    assert streamer.chunks[0] == input_ids[0].tolist()
    assert [token for chunk in streamer.chunks[1:] for token in chunk] == out[0, 9:].tolist()


def test_the_second_choice_counts_against_the_node_cap():
    base = make_kangaroo("llama").get_base_model()
    with pytest.raises(ValueError, match=r"above max_draft_tokens \+ 1 \(the second choice\) \(4\)"):
        KangarooForCausalLM.from_base(base, max_draft_tokens=3, tree_max_nodes=4, tree_second_choice_threshold=0.2)
    for bad in (0, 1.5, True, "0.2"):
        with pytest.raises(ValueError, match="tree_second_choice_threshold must be a number in"):
            KangarooForCausalLM.from_base(base, tree_second_choice_threshold=bad)
    model = KangarooForCausalLM.from_base(base, max_draft_tokens=3, tree_max_nodes=8, **SECOND_CHOICE)
    from kangaroo_hf.core.drafting import DraftSettings

    settings = DraftSettings.from_config(model.config)
    assert settings.second_choice and settings.longest_copy == 4  # 8 nodes: 3 chain drafts, 1 second choice


def test_tree_settings_are_validated():
    model = make_kangaroo("llama")
    with pytest.raises(ValueError, match="set lookup_num_tokens > 0"):
        model.generate(batch()[0], max_new_tokens=2, tree_rounds=True)
    base = model.get_base_model()
    with pytest.raises(ValueError, match="tree_max_nodes must be an int above max_draft_tokens"):
        KangarooForCausalLM.from_base(base, max_draft_tokens=6, tree_max_nodes=6, lookup_num_tokens=2)
    with pytest.raises(ValueError, match="tree_rounds must be a bool"):
        KangarooForCausalLM.from_base(base, tree_rounds="yes", lookup_num_tokens=2)


def test_branches_of_a_round_never_see_each_other():
    """Round slots: x, copy c1 -> c2, chain d1 (child of x): d1 sees x only; c2 sees x and c1; no one sees d1."""
    table = SlotTable(torch.tensor([[0, 1, 2]]))
    table.start_round()
    table.append(torch.tensor([[3, 4, 5]]))  # x, c1, c2 (a chain)
    table.append(torch.tensor([[4]]), parents=torch.tensor([[0]]))  # d1, sibling of c1
    allowed = table.masks(table.round_start, {FULL_ATTENTION}, None, torch.float32)[FULL_ATTENTION][0, 0] == 0
    assert allowed.tolist() == [
        [True, True, True, True, False, False, False],
        [True, True, True, True, True, False, False],
        [True, True, True, True, True, True, False],
        [True, True, True, True, False, False, True],
    ]


def _small_tree_model() -> KangarooForCausalLM:
    from test_generation_sampling import _small_model

    model = _small_model()
    model.config.lookup_num_tokens, model.config.tree_rounds = 2, True
    return model


def _tree_p_values(model, prompt) -> tuple[float, int]:
    torch.manual_seed(99)
    counts = np.zeros((NEW_TOKENS, VOCAB))
    copies = 0
    for _ in range(1200):
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, pad_token_id=0, **SAMPLING)
        for position, token in enumerate(out[0, prompt.shape[1] :].tolist()):
            counts[position, token] += 1
        copies += model.last_generate_stats.lookup_rounds
    exact = _exact_marginals(model, prompt)
    return min(_chi_square_p_value(counts[i], exact[i]) for i in range(1, NEW_TOKENS)), copies


PROMPT = torch.tensor([[3, 5, 4, 3]])  # "3" recurs: after "3 5" the context proposes "4", which the base often rejects


@pytest.mark.compat
def test_sampled_tree_rounds_keep_the_base_distribution():
    p_value, copies = _tree_p_values(_small_tree_model(), PROMPT)
    assert copies > 50  # copied branches were accepted: the multi-candidate rule was exercised
    assert p_value > 1e-4


def test_sampled_tree_rounds_with_the_second_choice_keep_the_base_distribution(monkeypatch):
    """The second choice is a one-hot proposal tried after the chain's sampled first draft, against the residual."""
    kept = []
    original = batched.accept_tree_sampled
    monkeypatch.setattr(
        batched,
        "accept_tree_sampled",
        lambda branches: kept.append((len(branches), *original(branches))) or kept[-1][1:],
    )
    model = _small_tree_model()
    model.config.tree_second_choice_threshold = 0.02  # the small model's second choice: about 0.02
    p_value, _ = _tree_p_values(model, PROMPT)
    assert sum(branches == 3 and chosen == 2 for branches, chosen, _, _ in kept) > 50  # the second choice landed
    assert p_value > 1e-4


def _copy_then_chain_without_residual(branches):
    """A wrong multi-candidate rule: after rejecting the copy, the chain's first token is tried against p itself."""
    drafts, _, target_scores = branches[0]
    p = target_scores[0].softmax(-1)
    for index, (drafts, draft_scores, target_scores) in enumerate(branches):
        if drafts.numel():
            q = draft_scores[0].softmax(-1)
            if float(torch.rand(())) < float(p[drafts[0]] / q[drafts[0]]):
                accepted, token = accept_sampled(drafts[1:], draft_scores[1:], target_scores[1:])
                return index, accepted + 1, token
    return None, 0, int(torch.multinomial(p, 1))


def test_a_wrong_multi_candidate_rule_is_detected(monkeypatch):
    monkeypatch.setattr(batched, "accept_tree_sampled", _copy_then_chain_without_residual)
    p_value, _ = _tree_p_values(_small_tree_model(), PROMPT)
    assert p_value < 1e-6
