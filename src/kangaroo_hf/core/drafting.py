"""Kangaroo drafting inside transformers' assisted-decoding loop.

The loop (`GenerationMixin._assisted_decoding`) owns verification, acceptance, EOS / length handling, streamers and
cache cropping. This module only proposes candidates: the shallow layers plus the adapter draft tokens one by one,
writing the shallow layers' KV into the base's own cache, and hand the exit-layer hidden states of the drafted tokens
to the verification forward (`model_kwargs_overrides`), so the shallow layers never see a token twice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import Cache, DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import GenerationMode

from .compat import LoopCandidateGenerator
from .configuration import LOOKUP_FIELDS, TREE_FIELDS, validate_draft_settings, validate_lookup, validate_tree
from .draft_head import DraftHead, RowProcessors, one_hot_scores
from .lookup import PromptLookup
from .stats import KangarooStats


class DraftingModel(Protocol):
    """What a drafting round needs of its model (`KangarooForCausalLM` is one)."""

    config: Any  # a KangarooConfig
    parts: Any  # the base's DecoderParts

    def shallow_forward(self, input_ids, position_ids, cache, attention_mask=None) -> torch.Tensor: ...

    def adapter_forward(self, exit_states, position_ids, adapter_cache, attention_mask=None) -> torch.Tensor: ...

    def adapter_add_context(self, final_states, position_ids, adapter_cache, attention_mask=None) -> None: ...

    def draft_head(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]: ...


# The config fields a drafting round reads (`DraftSettings` has one field for each).
DRAFT_SETTINGS = (
    "draft_threshold",
    "max_draft_tokens",
    "first_draft_threshold",
    *LOOKUP_FIELDS,
    "tree_rounds",
    "tree_max_nodes",
    "tree_second_choice_threshold",
)

# The settings `generate()` (and `kangaroo-hf generate`) can override for one call.
PER_CALL_SETTINGS = (
    "draft_threshold",
    "max_draft_tokens",
    "first_draft_threshold",
    "lookup_num_tokens",
    "tree_rounds",
)


@dataclass(frozen=True)
class DraftSettings:
    """How one round drafts: stop at confidence below `draft_threshold` or after `max_draft_tokens`; optionally
    propose up to `lookup_num_tokens` tokens copied from the context (0 = never), growing up to `lookup_max_tokens`
    while copies are accepted in full, and copied whenever the context's recent hit rate (averaged with
    `lookup_hit_rate_decay`, 0 = off) beats the adapter's confidence."""

    draft_threshold: float
    max_draft_tokens: int
    lookup_num_tokens: int = 0
    lookup_max_ngram: int = 3
    first_draft_threshold: float = 0.0
    lookup_max_tokens: int = 0
    lookup_trust_ngram: int = 0
    lookup_hit_rate_decay: float = 0.0
    tree_rounds: bool = False
    tree_max_nodes: int = 16
    tree_second_choice_threshold: float = 1.0

    def __post_init__(self) -> None:
        validate_draft_settings(self.draft_threshold, self.max_draft_tokens, self.first_draft_threshold)
        validate_lookup(*(getattr(self, name) for name in LOOKUP_FIELDS))
        validate_tree(*(getattr(self, name) for name in TREE_FIELDS))

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> DraftSettings:
        """The settings of `config` (a `KangarooConfig`), with per-call `overrides` where they are not None."""
        values = {name: getattr(config, name) for name in DRAFT_SETTINGS}
        values.update({name: value for name, value in overrides.items() if value is not None})
        if values["lookup_num_tokens"] != config.lookup_num_tokens and not (
            isinstance(values["lookup_num_tokens"], int) and config.lookup_max_tokens >= values["lookup_num_tokens"]
        ):
            values["lookup_max_tokens"] = 0  # a per-call lookup length above the growth cap simply stays fixed
        return cls(**values)

    @property
    def longest_lookup(self) -> int:
        return max(self.lookup_num_tokens, self.lookup_max_tokens) if self.lookup_num_tokens else 0

    @property
    def longest_copy(self) -> int:
        """Most tokens a round copies from the context (in tree rounds, what the node cap leaves beside the chain)."""
        if self.tree_rounds:
            return min(self.longest_lookup, self.tree_max_nodes - self.max_draft_tokens - self.second_choice)
        return self.longest_lookup

    @property
    def second_choice(self) -> bool:
        """Whether tree rounds may verify the adapter's second-choice first draft as a branch of its own."""
        return self.tree_rounds and self.tree_second_choice_threshold < 1

    @property
    def longest_draft(self) -> int:
        return max(self.max_draft_tokens, self.longest_lookup)


# Generation-config fields that select a decoding mode other than greedy search or sampling.
_NON_KANGAROO_MODE_FIELDS = (
    "num_beams",
    "num_beam_groups",
    "penalty_alpha",
    "constraints",
    "force_words_ids",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "use_mtp",
    "dola_layers",
)


def check_decoding_mode(generation_config: GenerationConfig, kwargs: dict[str, Any]) -> None:
    """Refuse arguments that would make transformers decode without Kangaroo (beam search, another assistant,
    contrastive search, ...): Kangaroo runs greedy search and sampling only, and must not be switched off
    silently."""
    merged = copy.deepcopy(generation_config)
    merged.update(**{key: value for key, value in kwargs.items() if hasattr(merged, key)})
    assistant_model = kwargs.get("assistant_model")
    mode = merged.get_generation_mode(assistant_model)
    if mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return
    defaults = GenerationConfig()
    culprits = [
        f"{name}={getattr(merged, name)!r}"
        for name in _NON_KANGAROO_MODE_FIELDS
        if getattr(merged, name, None) != getattr(defaults, name, None)
    ]
    if assistant_model is not None:
        culprits.append(f"assistant_model={type(assistant_model).__name__}")
    raise ValueError(
        f"Kangaroo decoding runs greedy search and sampling only, but {', '.join(culprits) or 'this call'} "
        f"asks for {mode.value.replace('_', ' ')}. Drop {'them' if len(culprits) > 1 else 'it'}, or pass "
        "use_kangaroo=False to decode with the base alone."
    )


def _extend_mask(attention_mask: torch.Tensor | None, extra: int) -> torch.Tensor | None:
    """The 2D mask of the accepted tokens followed by `extra` drafted (never padded) tokens."""
    if attention_mask is None or extra == 0:
        return attention_mask
    return torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], extra))], dim=-1)


class KangarooCandidateGenerator(LoopCandidateGenerator):
    """Drafts with the shallow layers + adapter of a [`KangarooForCausalLM`] (double early exit).

    Round bookkeeping, with `N` accepted tokens of which the last, `x`, is not yet in any cache:
    shallow layers on `x` -> adapter -> head -> `d_1` (confidence `c_1`); shallow layers on `d_i`; stop if
    `i == max_draft_tokens` or `c_i < draft_threshold`, else adapter -> head -> `d_{i+1}`. The shallow cache then
    holds `N + k` tokens, the deep one `N - 1`; the loop's verification forward runs the deep layers on the `k + 1`
    exit states handed over in `model_kwargs_overrides`, and its crop brings every layer back to the accepted length.
    A round that copies `k` tokens from the context runs the shallow layers on them in one call; a trusted match
    (`lookup_trust_ngram`) skips the adapter, and `x` goes through the shallow layers with the copies. The adapter's
    own cache is cropped to the verified tokens at the start of the next round and fed the verified exit states it
    has not seen (collected over the rounds that skipped it) just before it next drafts.
    """

    def __init__(
        self,
        model: DraftingModel,
        settings: DraftSettings,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None,
        stopping_criteria: StoppingCriteriaList,
        use_few_row_matmul: bool = False,
        use_packed_weights: bool = False,
    ) -> None:
        self.model = model
        self.settings = settings
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.stopping_criteria = stopping_criteria
        self.adapter_cache = DynamicCache()
        self.stats = KangarooStats(max_draft_tokens=settings.longest_draft)
        self.max_drafting_tokens = settings.longest_draft
        processors = RowProcessors(self.logits_processor)
        self.head = DraftHead(model, processors, self.do_sample, use_few_row_matmul, use_packed_weights)
        # Kwargs merged into the loop's next forward: the prefill must return exit states, a verification reuses them.
        self.set_forward_overrides({"output_exit_hidden_states": True})
        self._first_verified_position = 0  # position of the first token of the last full forward
        self._drafted_this_round = 0
        self.lookup = (
            PromptLookup(*(getattr(settings, name) for name in LOOKUP_FIELDS)) if settings.lookup_num_tokens else None
        )
        self._copied_this_round = False
        self._lookup_first_token: int | None = None  # this round's lookup proposal's first token, if any
        self._round_start = 0  # index of this round's first new token in the sequence
        # Verified states the adapter has not seen yet (rounds that copy a trusted match skip the adapter).
        self._unfed_states: torch.Tensor | None = None
        self._final_context = model.config.adapter_context == "final"  # adapter context: verified final states

    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict[str, Any],
        model_outputs: Any = None,
        is_first_iteration: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Draft up to `max_draft_tokens` after `input_ids` (1, N); return (1, N + k) ids and (1, k, V) scores."""
        cache: Cache = model_kwargs["cache"]
        exit_layer = self.model.config.exit_layer
        if is_first_iteration:
            # The loop's first forward is the prefill: no drafts yet, it must return the prompt's exit states.
            self._first_verified_position = cache.get_seq_length(exit_layer)
            self._drafted_this_round = 0
            self.set_forward_overrides({"output_exit_hidden_states": True})
            return input_ids, None

        self._sync_adapter(model_outputs, cache, model_kwargs)
        self._first_verified_position = cache.get_seq_length(exit_layer)
        self._copied_this_round = False
        self._round_start = input_ids.shape[1]
        candidate_ids, draft_scores, exit_states = self._round(input_ids, cache, model_kwargs)
        self._drafted_this_round = candidate_ids.shape[1] - input_ids.shape[1]
        self.set_forward_overrides({"exit_hidden_states": exit_states})
        # Only sampling reads the draft distribution (speculative sampling); greedy compares tokens.
        candidate_logits = torch.stack(draft_scores, dim=1) if draft_scores and self.do_sample else None  # (1, k, V)
        return candidate_ids, candidate_logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        """Record how many of this round's drafts the base accepted (after the loop's EOS / length trimming).

        The prompt lookup learns from the round (`PromptLookup.record_round`); `input_ids` ends with this round's
        accepted tokens and the base's own.
        """
        accepted = int(num_matches)
        self.stats.record_step(self._drafted_this_round, accepted)
        if self.lookup is not None:
            emitted = int(input_ids[0, self._round_start])
            copied = self._copied_this_round
            self.lookup.record_round(self._lookup_first_token, emitted, copied, self._drafted_this_round, accepted)

    def _sync_adapter(self, model_outputs: Any, cache: Cache, model_kwargs: dict[str, Any]) -> None:
        """Bring the adapter up to the verified tokens: crop what is stale, and collect the states of what it has not
        seen in `_unfed_states` (fed by `_feed_adapter` before the adapter next drafts).

        The last full forward processed tokens from `_first_verified_position` on; its exit (and final) states are in
        `model_outputs`. With `adapter_context="exit"` the drafted tokens' entries stay valid once accepted: crop the
        rejected ones, and collect what the adapter never saw (the prompt after a prefill; the last draft after an
        all-accepted round; everything a round that copied a trusted match verified). With `"final"` every token of
        the last forward is re-entered from its final state.
        """
        verified = cache.get_seq_length(self.model.config.exit_layer)  # every accepted token but the last
        offset = self._first_verified_position
        fed = self.adapter_cache.get_seq_length()
        kept = min(fed, offset if self._final_context else verified)
        self.adapter_cache.crop(kept - fed)
        states = model_outputs.final_hidden_states if self._final_context else model_outputs.exit_hidden_states
        if self._unfed_states is not None:  # they hold tokens `kept .. offset - 1`, verified by earlier forwards
            self._unfed_states = torch.cat([self._unfed_states, states[:, : verified - offset]], dim=1)
        elif kept < verified:
            self._unfed_states = states[:, kept - offset : verified - offset]

    def _feed_adapter(self, model_kwargs: dict[str, Any]) -> None:
        """Feed the collected verified states to the adapter, so that its cache holds every verified token."""
        if self._unfed_states is None:
            return
        start = self.adapter_cache.get_seq_length()
        verified = start + self._unfed_states.shape[1]
        attention_mask = model_kwargs.get("attention_mask")
        feed = self.model.adapter_add_context if self._final_context else self.model.adapter_forward
        feed(
            self._unfed_states,
            position_ids=model_kwargs["position_ids"][:, start:verified],
            adapter_cache=self.adapter_cache,
            attention_mask=None if attention_mask is None else attention_mask[:, :verified],
        )
        self._unfed_states = None

    def _round(
        self, input_ids: torch.LongTensor, cache: Cache, model_kwargs: dict[str, Any]
    ) -> tuple[torch.LongTensor, list[torch.Tensor], torch.Tensor]:
        """One round's proposal: a trusted context match copied without drafting, or the adapter's drafting loop
        (which may still copy the context); returns candidate ids, per-draft scores and (1, k + 1, D) exit states."""
        lookup, match_length = self.lookup.propose(input_ids[0]) if self.lookup is not None else (None, 0)
        lookup = lookup if lookup is not None and lookup.numel() else None
        self._lookup_first_token = None if lookup is None else int(lookup[0])
        if lookup is not None and self.lookup.trusts(match_length):
            # A match long enough to trust is copied whatever the adapter would draft: no drafting step this round,
            # and the adapter's unseen context waits for the next round that drafts.
            return self._copy_drafts(lookup, input_ids, cache, model_kwargs)
        self._feed_adapter(model_kwargs)
        return self._draft(input_ids, cache, model_kwargs, lookup)

    def _draft(
        self,
        input_ids: torch.LongTensor,
        cache: Cache,
        model_kwargs: dict[str, Any],
        lookup: torch.LongTensor | None = None,
    ) -> tuple[torch.LongTensor, list[torch.Tensor], torch.Tensor]:
        """The adapter's drafting loop, which copies the context's continuation `lookup` instead when the rules say
        so; returns candidate ids, per-draft scores and (1, k + 1, D) exit states."""
        budget = self.max_length - input_ids.shape[1] - 1
        position = model_kwargs["position_ids"][:, -1:]  # (1, 1): position of the last accepted token
        attention_mask = model_kwargs.get("attention_mask")
        candidate_ids = input_ids
        exit_states = [self.model.shallow_forward(input_ids[:, -1:], position, cache, attention_mask)]
        draft_scores: list[torch.Tensor] = []
        while len(draft_scores) < min(budget, self.settings.max_draft_tokens):
            step = len(draft_scores)
            hidden = self.model.adapter_forward(
                exit_states[-1], position + step, self.adapter_cache, _extend_mask(attention_mask, step)
            )
            scores, vocab_ids = self._draft_scores(hidden[:, -1], candidate_ids)
            confidence, top_token = (value.item() for value in self.head.top1(scores, vocab_ids))
            if (
                step == 0
                and lookup is not None
                and self.lookup.prefers_copy(
                    self._lookup_first_token, top_token, confidence, self.settings.draft_threshold
                )
            ):
                return self._copy_drafts(lookup, input_ids, cache, model_kwargs, exit_states[0])
            if step == 0 and confidence < self.settings.first_draft_threshold:
                break  # an unsure first draft is not worth a two-token verification: a plain step this round
            token = self.head.choose(scores, vocab_ids).view(1, 1)
            extended = torch.cat([candidate_ids, token], dim=-1)
            # A draft that would end generation (EOS, stop string, max length) is left for the base to emit as its
            # own token: the loop checks stopping criteria only after a round, so a stop must fall on the round's end.
            if self.stopping_criteria(extended, None).any():
                break
            candidate_ids = extended
            draft_scores.append(scores)
            exit_states.append(
                self.model.shallow_forward(token, position + step + 1, cache, _extend_mask(attention_mask, step + 1))
            )
            # Draft early exit (paper section 3.2): an unsure draft ends the round; it is still verified.
            if confidence < self.settings.draft_threshold:
                break
        return candidate_ids, draft_scores, torch.cat(exit_states, dim=1)

    def _copy_drafts(
        self,
        tokens: torch.LongTensor,
        input_ids: torch.LongTensor,
        cache: Cache,
        model_kwargs: dict[str, Any],
        last_exit_state: torch.Tensor | None = None,
    ) -> tuple[torch.LongTensor, list[torch.Tensor], torch.Tensor]:
        """Propose `tokens` copied from the context (as many as the length budget allows): known in advance, so the
        shallow layers see them in one call (together with the last accepted token when its exit state,
        `last_exit_state`, is not computed yet)."""
        position = model_kwargs["position_ids"][:, -1:]  # (1, 1): position of the last accepted token
        attention_mask = model_kwargs.get("attention_mask")
        candidate_ids = input_ids
        for token in tokens[: self.max_length - input_ids.shape[1] - 1].view(-1, 1, 1):
            extended = torch.cat([candidate_ids, token], dim=-1)
            if self.stopping_criteria(extended, None).any():
                break
            candidate_ids = extended
        drafts = candidate_ids[:, input_ids.shape[1] :]  # (1, k)
        count = drafts.shape[1]
        mask = _extend_mask(attention_mask, count)
        if last_exit_state is None:  # the last accepted token goes through the shallow layers with the copies
            positions = position + torch.arange(count + 1, device=position.device)
            exit_states = self.model.shallow_forward(torch.cat([input_ids[:, -1:], drafts], 1), positions, cache, mask)
        elif count:
            positions = position + torch.arange(1, count + 1, device=position.device)
            exit_states = torch.cat([last_exit_state, self.model.shallow_forward(drafts, positions, cache, mask)], 1)
        else:
            exit_states = last_exit_state
        if count == 0:
            return input_ids, [], exit_states
        self.stats.lookup_rounds += 1
        self._copied_this_round = True
        one_hot = one_hot_scores(drafts[0], self.model.parts.lm_head.out_features)  # a copy is a one-hot proposal
        return candidate_ids, list(one_hot.unsqueeze(1)), exit_states

    def _draft_scores(
        self, hidden: torch.Tensor, candidate_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """Processed draft scores (1, V') from adapter states (1, D), and the vocabulary ids of their columns."""
        return self.head.scores(hidden, [0], [candidate_ids])


__all__ = ["DRAFT_SETTINGS", "PER_CALL_SETTINGS", "DraftSettings", "KangarooCandidateGenerator", "check_decoding_mode"]
