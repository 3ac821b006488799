"""Speculation statistics of one `generate()` call."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

# Each Kangaroo `generate()` call writes its statistics' summary here at INFO level (a server: one line per request).
STATS_LOGGER = "kangaroo_hf.stats"


@dataclass
class KangarooStats:
    """Speculation statistics of one `generate()` call (`model.last_generate_stats`).

    A verification step is one forward of the full model (the prefill included); each yields the accepted drafts
    plus one token of the base's own, so `new_tokens == verify_steps + accepted_drafts`. The position lists start at
    `max_draft_tokens` entries and grow as needed, so the benchmark counts other speculative methods (and sums over
    prompts, `add`) with the same class. A tree round counts the drafts of the branch it kept (`lookup_rounds`: the
    rounds that kept the context's copy), and a batched call sums its rows (each row's own in `rows`).
    """

    max_draft_tokens: int = 0
    new_tokens: int = 0
    verify_steps: int = 0
    drafted_tokens: int = 0
    accepted_drafts: int = 0
    lookup_rounds: int = 0  # rounds whose drafts were copied from the context (prompt lookup)
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    # A batched call's per-row statistics (the fields above are their totals); empty for one sequence.
    rows: list[KangarooStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.drafted_by_position = self.drafted_by_position or [0] * self.max_draft_tokens
        self.accepted_by_position = self.accepted_by_position or [0] * self.max_draft_tokens

    def record_step(self, drafted: int, accepted: int) -> None:
        """Count one verification step that checked `drafted` drafts and kept the first `accepted` of them."""
        self._grow(drafted)
        self.verify_steps += 1
        self.new_tokens += accepted + 1
        self.drafted_tokens += drafted
        self.accepted_drafts += accepted
        for position in range(drafted):
            self.drafted_by_position[position] += 1
        for position in range(accepted):
            self.accepted_by_position[position] += 1

    def add(self, other: KangarooStats) -> None:
        """Add another call's statistics to these."""
        self._grow(len(other.drafted_by_position))
        for name in ("new_tokens", "verify_steps", "drafted_tokens", "accepted_drafts", "lookup_rounds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for position, (drafted, accepted) in enumerate(
            zip(other.drafted_by_position, other.accepted_by_position, strict=True)
        ):
            self.drafted_by_position[position] += drafted
            self.accepted_by_position[position] += accepted

    def _grow(self, length: int) -> None:
        missing = length - len(self.drafted_by_position)
        if missing > 0:
            self.drafted_by_position += [0] * missing
            self.accepted_by_position += [0] * missing

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens gained per verification step (tau in the paper): `new_tokens / verify_steps`."""
        return self.new_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def acceptance_rate_by_position(self) -> list[float]:
        """Fraction of drafts accepted at each draft position (1-based position i at index i-1)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position, strict=True)]

    def summary(self) -> str:
        """One line for logs: tokens, verification steps, tau, drafts accepted, rounds that copied the context."""
        rate = self.accepted_drafts / self.drafted_tokens if self.drafted_tokens else 0.0
        rows = f", {len(self.rows)} rows" if self.rows else ""
        tau = self.mean_accepted_tokens
        return (
            f"{self.new_tokens} new tokens in {self.verify_steps} verification steps (tau {tau:.2f}), "
            f"{self.accepted_drafts}/{self.drafted_tokens} drafts accepted ({rate:.0%}), "
            f"{self.lookup_rounds} rounds copied the context{rows}"
        )

    def log(self) -> None:
        """Write `summary()` to the `kangaroo_hf.stats` logger at INFO level."""
        logging.getLogger(STATS_LOGGER).info("Kangaroo: %s", self.summary())

    def to_dict(self) -> dict[str, Any]:
        """Every count and rate as plain JSON values (per-row statistics under `rows` for a batch)."""
        return {
            "new_tokens": self.new_tokens,
            "verify_steps": self.verify_steps,
            "drafted_tokens": self.drafted_tokens,
            "accepted_drafts": self.accepted_drafts,
            "lookup_rounds": self.lookup_rounds,
            "mean_accepted_tokens": self.mean_accepted_tokens,
            "drafted_by_position": list(self.drafted_by_position),
            "accepted_by_position": list(self.accepted_by_position),
            "acceptance_rate_by_position": self.acceptance_rate_by_position,
            **({"rows": [row.to_dict() for row in self.rows]} if self.rows else {}),
        }
