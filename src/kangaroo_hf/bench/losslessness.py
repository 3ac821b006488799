"""The one losslessness check: where an output first leaves the base's greedy output, and whether that is a
numerical tie (the base's logits of the two tokens within `default_tie_tolerance`) or a failure."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


class LosslessnessError(RuntimeError):
    """A greedy output differed from the base's by more than a numerical tie (raised with `strict=True`)."""


@dataclass
class Divergence:
    """Where a greedy output first differs from the base's, and how close the base's logits were there."""

    method: str
    question_id: int
    category: str
    position: int  # index in the new tokens
    reference_token: int | None  # None: the base's output ended here
    method_token: int | None  # None: the method's output ended here
    logit_gap: float | None  # |logit(reference token) - logit(method token)| from one forward of the base
    top2_gap: float | None  # top-1 minus top-2 logit at that step
    logit_gap_float32: float | None  # the same gap with a float32 copy of the base (reduced-precision runs only)
    tie: bool


def default_tie_tolerance(dtype: torch.dtype) -> float:
    """Largest gap between the base's logits of the two diverging tokens at which a divergence is a numerical tie.

    float32 / float64: 0, outputs must be identical. Reduced precision: one unit in the last place at logit magnitude
    32 to 64, `32 * eps` (0.25 for bfloat16, whose 8 significant bits space logits of 32-64 by 0.25 and of 16-32 by
    0.125; 0.03125 for float16). Batched verification and one-token decoding accumulate in different orders and round
    every layer's output to this grid, so two logits one step apart can swap; a larger gap is not rounding.
    """
    if dtype in (torch.float32, torch.float64):
        return 0.0
    return 32 * torch.finfo(dtype).eps


def first_divergence(reference: list[int], output: list[int]) -> int | None:
    """Index of the first differing token (or of the shorter output's end); None if the outputs are equal."""
    for position, (expected, got) in enumerate(zip(reference, output, strict=False)):
        if expected != got:
            return position
    return None if len(reference) == len(output) else min(len(reference), len(output))


def classify_divergence(logit_gap: float | None, tolerance: float) -> bool:
    """True (a numerical tie) when the base's logits of the two tokens are within `tolerance`; else a failure."""
    return logit_gap is not None and abs(logit_gap) <= tolerance


class GapProbe:
    """The base's logits at one step of the reference output: one forward over prompt + reference prefix."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.base = base
        self._float32_base: torch.nn.Module | None = None

    @torch.no_grad()
    def gaps(self, sequence: torch.LongTensor, reference_token: int, method_token: int) -> tuple[float, float]:
        """(|logit gap| between the two tokens, top-1 minus top-2 logit) after `sequence` (1, T)."""
        return self._gaps(self.base, sequence, reference_token, method_token)

    @torch.no_grad()
    def float32_gap(self, sequence: torch.LongTensor, reference_token: int, method_token: int) -> float | None:
        """The same gap from a float32 copy of the base (made once); None when the base already is float32."""
        if self.base.dtype in (torch.float32, torch.float64):
            return None
        if self._float32_base is None:
            self._float32_base = copy.deepcopy(self.base).float()
        return self._gaps(self._float32_base, sequence, reference_token, method_token)[0]

    @staticmethod
    def _gaps(base: torch.nn.Module, sequence: torch.LongTensor, reference_token: int, method_token: int):
        logits = base(input_ids=sequence, use_cache=False, logits_to_keep=1).logits[0, -1].float()  # (V,)
        top2 = logits.topk(2).values
        return abs(float(logits[reference_token] - logits[method_token])), float(top2[0] - top2[1])


def tie_gap(
    probe: GapProbe, input_ids: torch.LongTensor, reference: list[int], position: int, method_token: int
) -> tuple[float, float]:
    """(logit gap, top-2 gap) of the base where an output chose `method_token` after `reference[:position]`."""
    prefix = torch.tensor([reference[:position]], dtype=input_ids.dtype, device=input_ids.device)
    return probe.gaps(torch.cat([input_ids, prefix], dim=1), reference[position], method_token)


__all__ = [
    "Divergence",
    "GapProbe",
    "LosslessnessError",
    "classify_divergence",
    "default_tie_tolerance",
    "first_divergence",
    "tie_gap",
]
