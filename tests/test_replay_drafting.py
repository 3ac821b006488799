"""`scripts/replay_drafting.py` replays drafting with the generator's own `PromptLookup` rules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
replay_drafting = pytest.importorskip("replay_drafting")


def _answer(prompt: list[int], answer: list[int], top: int, confidence: float):
    n = len(answer)
    return replay_drafting.Answer(
        category="extraction",
        prompt=prompt,
        answer=answer,
        correct=[t == top for t in answer],
        top=[top] * n,
        confidence=[confidence] * n,
        rank=[0] * n,
    )


def test_a_trusted_match_overrules_a_sure_wrong_adapter_in_the_replay():
    quoted = [11, 12, 13, 14, 15, 16, 17, 18]
    answers = [_answer(prompt=[1, *quoted, 2], answer=[3, *quoted, 4], top=0, confidence=0.9)]
    common = dict(threshold=0.6, max_drafts=6, lookup_tokens=4, max_ngram=3)
    tau_untrusted, _ = replay_drafting.replay(answers, trust_ngram=0, **common)
    tau_trusted, _ = replay_drafting.replay(answers, trust_ngram=1, **common)
    # A sure adapter that never agrees keeps the copies out unless the match is trusted; copies then land.
    assert tau_untrusted == 1.0 and tau_trusted > 2.0


def test_tree_rounds_replay_keeps_the_better_branch_and_the_second_choice():
    quoted = [11, 12, 13, 14, 15, 16, 17, 18]
    answers = [_answer(prompt=[1, *quoted, 2], answer=[3, *quoted, 4], top=0, confidence=0.9)]
    common = dict(threshold=0.6, max_drafts=3, lookup_tokens=4, max_ngram=3, trust_ngram=0)
    chain_tau, _ = replay_drafting.replay(answers, **common)
    tree_tau, tree_rows = replay_drafting.replay(answers, tree_rounds=True, **common)
    # The sure, wrong adapter keeps chain rounds from copying; a tree round verifies the copy beside the chain.
    assert chain_tau == 1.0 and tree_tau > 2.0 and tree_rows > 4

    # No context match; the adapter's second choice is the base's token at every position.
    answer = list(range(20, 30))
    hesitant = _answer(prompt=[1, 2], answer=answer, top=0, confidence=0.5)
    hesitant.runners_up = [[(token, 0.3), (0, 0.1)] for token in answer]
    without, _ = replay_drafting.replay([hesitant], tree_rounds=True, **common)
    with_second, rows = replay_drafting.replay([hesitant], tree_rounds=True, second_choice_threshold=0.2, **common)
    above, _ = replay_drafting.replay([hesitant], tree_rounds=True, second_choice_threshold=0.4, **common)
    assert without == above == 1.0 and with_second > 1.5 and rows > 2
