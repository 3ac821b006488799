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
