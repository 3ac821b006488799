"""Kangaroo decoding of a batch of left-padded prompts: every row drafts, is verified and accepts on its own.

transformers' assisted loop decodes one sequence and verifies one chain, so batches and tree rounds (the context's
copy and the adapter's chain verified together, `tree_rounds`) run in this loop of the project's own. It is built from
the same pieces as batch 1 (the model's shallow slice, adapter and deep slice; `DraftHead`; `PromptLookup`) and keeps
every cache in the slot layout of `slots.SlotTable`. A round:

1. **draft**, in lockstep over the rows: the shallow layers on each row's newest token (its KV goes into the shared
   cache), the adapter and the draft head on the exit states, until every row has stopped: its confidence fell below
   `draft_threshold`, it drafted `max_draft_tokens`, or the tokens it copies from its context ran out (a tree round
   may add the adapter's second-choice first draft as a one-token branch, `tree_second_choice_threshold`);
2. **verify**: the deep layers on every row's round tokens at once, reusing their exit states, and the LM head on the
   rows' real slots only;
3. **accept** per row (`acceptance.py`), with the logits processors and stopping criteria on the row's own sequence;
4. **keep**: every cache (shallow, deep, adapter) keeps each row's accepted slots; finished rows leave the batch.

The adapter sees a slot when a later drafting step of the same round needs it. The round's last drafts (and a round's
every slot when no row drafted) are not run through it after verification: their adapter slots stay empty, and the
accepted ones among them are written at the next round's first adapter step, in the same call
(`AdapterBacklog`), as transformers' assisted loop feeds the adapter only verified tokens, merged into its next step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .acceptance import accept_tree_greedy, accept_tree_sampled
from .compat import overwriting_slots
from .configuration import LOOKUP_FIELDS
from .draft_head import DraftHead, RowProcessors, one_hot_scores
from .drafting import DraftingModel, DraftSettings
from .layers import FULL_ATTENTION, layer_types
from .lookup import PromptLookup
from .slots import SlotTable, append_empty_slots, move_slots, reorder_slots, select_cache_rows
from .stats import KangarooStats


@dataclass
class DraftRound:
    """One round's proposals. `tokens` (B, R): the round's slots, slot 0 holding each row's newest token; the other
    slots hold drafts, in `branches[b]` (each branch the slot offsets of its drafts in order; a chain round has one
    branch, a tree round the context's copy, `copy_branch[b]`, the adapter's chain and its second-choice first
    draft), or nothing. `exit_states` (B, R, D) are the slots' exit states; for sampling, `draft_scores` (B, R, V) are
    the scores each slot's draft was drawn from (one-hot for copied drafts and the second choice)."""

    tokens: torch.LongTensor
    exit_states: torch.Tensor
    branches: list[list[list[int]]]
    copy_branch: list[int | None]
    draft_scores: torch.Tensor | None
    lookup_first_tokens: list[int | None]


@dataclass
class AdapterBacklog:
    """Accepted slots the adapter has not seen: its cache holds placeholders there. `states` (B, n, D) are the exit
    states of cache slots `[first, first + n)` (the cache's last n), and `unseen` (B, n) marks the slots to write;
    the others hold what the cache already has right (their states are not used)."""

    first: int
    states: torch.Tensor
    unseen: torch.Tensor

    def extended(self, other: AdapterBacklog) -> AdapterBacklog:
        """This backlog and a later one (`other`, whose slots end at or after this one's) as one."""
        first = min(self.first, other.first)
        end = other.first + other.states.shape[1]
        states = other.states.new_zeros(other.states.shape[0], end - first, other.states.shape[2])
        unseen = other.unseen.new_zeros(other.unseen.shape[0], end - first)
        for backlog in (self, other):
            start, width = backlog.first - first, min(backlog.states.shape[1], end - backlog.first)
            states[:, start : start + width] = torch.where(
                backlog.unseen[:, :width, None], backlog.states[:, :width], states[:, start : start + width]
            )
            unseen[:, start : start + width] |= backlog.unseen[:, :width]
        return AdapterBacklog(first, states, unseen)

    def select(self, rows: torch.LongTensor, length: int) -> AdapterBacklog | None:
        """The backlog of `rows` only, in a cache of `length` slots (None when nothing is left to write)."""
        width = length - self.first
        unseen = self.unseen[rows, :width]
        if width <= 0 or not unseen.any():
            return None
        return AdapterBacklog(self.first, self.states[rows, :width], unseen)


class BatchedKangarooDecoder:
    """Decodes a batch, or one sequence with tree rounds, with Kangaroo; `decode` returns what `generate()`
    returns."""

    def __init__(
        self,
        model: DraftingModel,
        settings: DraftSettings,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        batch_size: int,
        use_few_row_matmul: bool = False,
        use_packed_weights: bool = False,
        streamer: Any = None,
    ) -> None:
        self.streamer = streamer  # batch 1 only (`decoding.own_decoder_for` refuses it for batches)
        self.model = model
        self.settings = settings
        self.generation_config = generation_config
        self.do_sample = bool(generation_config.do_sample)
        self.processors = RowProcessors(logits_processor, batch_size)
        self.stopping_criteria = stopping_criteria
        self.head = DraftHead(model, self.processors, self.do_sample, use_few_row_matmul, use_packed_weights)
        base_config = model.parts.config
        self.layer_kinds = set(layer_types(base_config)) | {FULL_ATTENTION}  # the adapter attends fully
        self.sliding_window = getattr(base_config, "sliding_window", None)
        self.final_context = model.config.adapter_context == "final"
        # transformers pads the rows that an EOS criterion finished; without one, finished rows keep decoding.
        self.pads_finished_rows = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        eos = generation_config.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else eos or [])
        pad = generation_config.pad_token_id
        self.pad_token_id = pad if pad is not None else next(iter(sorted(self.eos_token_ids)), None)
        # The call's statistics (`model.last_generate_stats`): filled with the rows' totals, and each row's own in
        # `rows`, when `decode` returns.
        self.total_stats = KangarooStats(max_draft_tokens=settings.longest_draft)
        self.keep_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
        self.keep_logits = bool(generation_config.return_dict_in_generate and generation_config.output_logits)

    # -- the loop ------------------------------------------------------------------------------------------------

    def decode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> Any:
        """Decode every row of `input_ids` (B, T), left-padded as `attention_mask` (B, T) says."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._prefill(input_ids, attention_mask)
        while self.rows.numel():
            round_ = self._draft()
            target_logits = self._verify(round_)
            paths = [self._accept(index, round_, target_logits[index]) for index in range(self.rows.numel())]
            self._keep(paths, round_)
        return self._result(input_ids.shape[1])

    def _prefill(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> None:
        """All prompt tokens through every layer (and the adapter), and each row's first new token."""
        model, batch = self.model, input_ids.shape[0]
        self.device = device = input_ids.device
        self.cache, self.adapter_cache = DynamicCache(), DynamicCache()
        self.adapter_backlog: AdapterBacklog | None = None
        self.adapter_seen = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # per round slot
        self.table = SlotTable.from_attention_mask(attention_mask)
        self.rows = torch.arange(batch)  # original indices of the rows still decoding
        self.sequences = [input_ids[row : row + 1] for row in range(batch)]
        self.finish_lengths: list[int | None] = [None] * batch
        self.scores: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        self.raw_logits: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        self.stats = [KangarooStats(max_draft_tokens=self.settings.longest_draft) for _ in range(batch)]
        self.lookups = [self._new_lookup() for _ in range(batch)]
        positions = self.table.positions.clamp(min=0)
        masks = self._masks(0)
        exit_states = model.shallow_forward(input_ids, positions, self.cache, masks)
        final_states = model.deep_forward(exit_states, positions, self.cache, masks)
        self._feed_adapter(final_states if self.final_context else exit_states, positions, masks)
        logits = model.lm_head_logits(final_states[:, -1]).float()  # left padding: every row's last slot is real
        self.pending = torch.empty(batch, dtype=torch.long, device=device)
        for row in range(batch):
            scores = self._process([row], [self.sequences[row]], logits[row : row + 1])
            token = int(self.head.choose(scores, None)) if self.do_sample else int(scores.argmax())
            self._emit(row, [token], scores, logits[row : row + 1])
            if self.streamer is not None:
                self.streamer.put(torch.tensor([token]))
            self.stats[row].record_step(0, 0)
            self.pending[row] = token
        self._keep([[] for _ in range(batch)])

    def _draft(self) -> DraftRound:
        """Lockstep drafting (see the module docstring). Step 0 puts each row's newest token and its context's copy
        (known in advance) through the shallow layers in one call; the adapter's first draft then decides, per row,
        between the copy and the chain (a tree round keeps both); each later step adds one chain slot to every row."""
        model, table, settings, tree = self.model, self.table, self.settings, self.settings.tree_rounds
        table.start_round()
        first_position = table.next_positions
        budgets = torch.tensor([self._budget(int(row)) for row in self.rows], device=self.device)
        copy_tokens, copy_lengths, copying = self._proposals(budgets)  # trusted matches copy outright
        batch, rows = budgets.numel(), torch.arange(budgets.numel(), device=self.device)
        depths = torch.arange(int(copy_lengths.max()) + 1, device=self.device)
        first = torch.cat([self.pending[:, None], copy_tokens[:, : depths.numel() - 1]], dim=1)
        table.append((first_position[:, None] + depths).masked_fill(depths > copy_lengths[:, None], -1))
        positions = table.positions[:, table.round_start :].clamp(min=0)
        exits = [model.shallow_forward(first, positions, self.cache, self._masks(table.round_start))]
        tokens = [first]
        scores_by_slot = [self._one_hot(first[:, i]) for i in range(first.shape[1])] if self.do_sample else []
        chains: list[list[int]] = [[] for _ in range(batch)]
        proposing, counts = (budgets > 0) & ~copying, torch.zeros_like(budgets)
        last_slot, adapter_fed = torch.zeros_like(budgets), 0
        second_choices: list[list[int]] = [[] for _ in range(batch)]  # a tree round's second-choice branch
        for step in range(settings.max_draft_tokens):
            if not proposing.any():
                break
            states = torch.cat(exits, dim=1)
            # rows that stopped read a stale slot (clamped): their outputs are not used
            hidden = self._adapter_step(states, adapter_fed)[rows, (last_slot - adapter_fed).clamp(min=0)]
            adapter_fed = states.shape[1]
            scores, vocab_ids = self.head.scores(hidden, self.rows.tolist(), self._draft_sequences(chains, tokens))
            confidence, top = self.head.top1(scores, vocab_ids)
            if step == 0:
                if tree:  # both branches only where the adapter is sure of another first token than the copy's
                    copying |= proposing & self._agrees_or_unsure(copy_tokens, copy_lengths, top, confidence)
                else:
                    copying |= proposing & self._prefers_copy(copy_tokens, copy_lengths, top, confidence)
                proposing &= ~copying & (confidence >= settings.first_draft_threshold)
            drafts = torch.where(proposing, self.head.choose(scores, vocab_ids), self.pending)
            counts += proposing.long()
            offset = table.length - table.round_start
            new_tokens = drafts[:, None]
            table.append((first_position + counts).masked_fill(~proposing, -1)[:, None], last_slot[:, None])
            if self.do_sample:
                scores_by_slot.append(scores)
            if step == 0 and settings.second_choice:  # a one-token branch beside the chain's first draft
                second, branching = self._second_choices(scores, vocab_ids, drafts, copy_tokens, copy_lengths)
                branching &= proposing
                if branching.any():
                    new_tokens = torch.stack([drafts, second], dim=1)
                    table.append((first_position + 1).masked_fill(~branching, -1)[:, None], last_slot[:, None])
                    if self.do_sample:  # a deterministic proposal, as a copy
                        scores_by_slot.append(self._one_hot(second))
                    for index in branching.nonzero().view(-1).tolist():
                        second_choices[index] = [offset + 1]
            tokens.append(new_tokens)
            positions = table.positions[:, -new_tokens.shape[1] :].clamp(min=0)
            masks = self._masks(-new_tokens.shape[1])
            exits.append(model.shallow_forward(new_tokens, positions, self.cache, masks))
            last_slot = torch.where(proposing, offset, last_slot)
            for index in proposing.nonzero().view(-1).tolist():
                chains[index].append(offset)
            proposing &= (counts < settings.max_draft_tokens) & (counts < budgets) & ~self._is_eos(drafts)
            proposing &= confidence >= settings.draft_threshold  # draft early exit (paper section 3.2)
        if not tree:  # the copies of rows that chose the chain are not verified (a tree round keeps every copy)
            dropped = ~copying[:, None] & (
                torch.arange(table.length - table.round_start, device=self.device) < depths.numel()
            )
            dropped[:, 0] = False
            table.positions[:, table.round_start :].masked_fill_(dropped, -1)
        exit_states = torch.cat(exits, dim=1)
        if not self.final_context:  # the slots it has not seen wait in placeholders (`AdapterBacklog`)
            append_empty_slots(self.adapter_cache, exit_states.shape[1] - adapter_fed)
            self.adapter_seen = torch.arange(exit_states.shape[1], device=self.device).expand(batch, -1) < adapter_fed
        copies = [
            list(range(1, int(length) + 1)) if tree or copying[i] else [] for i, length in enumerate(copy_lengths)
        ]
        round_ = DraftRound(
            tokens=torch.cat(tokens, dim=1),
            exit_states=exit_states,
            branches=[
                [branch for branch in branches if branch]
                for branches in zip(copies, chains, second_choices, strict=True)
            ],
            copy_branch=[0 if copy else None for copy in copies],
            draft_scores=torch.stack(scores_by_slot, dim=1) if self.do_sample else None,
            lookup_first_tokens=[int(copy_tokens[i, 0]) if copy_lengths[i] else None for i in range(batch)],
        )
        return self._compact(round_)

    def _compact(self, round_: DraftRound) -> DraftRound:
        """Move each row's real round slots to the front (in order, so parents stay before children) and drop the
        columns no row uses, in the table, the shallow layers' and the adapter's caches and the round itself: the
        verification then runs on as few slots per row as the row with the most drafts needs."""
        table, start = self.table, self.table.round_start
        real = table.positions[:, start:] >= 0
        width = int(real.sum(dim=1).max())
        if width == real.shape[1]:
            return round_
        order = torch.sort((~real).long(), dim=1, stable=True).indices  # real slots first, in their order
        new_offset = order.argsort(dim=1)
        table.reorder_round(order, width)
        reorder_slots(self.cache, start, order, width)
        if self.final_context:  # its drafting entries are replaced after verification anyway
            self.adapter_cache.crop(start - self.adapter_cache.get_seq_length())
        else:
            reorder_slots(self.adapter_cache, start, order, width)
            self.adapter_seen = self.adapter_seen.gather(1, order[:, :width])
        gather = order[:, :width]
        remap = [new_offset[index].tolist() for index in range(order.shape[0])]
        return DraftRound(
            tokens=round_.tokens.gather(1, gather),
            exit_states=round_.exit_states.gather(1, gather[:, :, None].expand(-1, -1, round_.exit_states.shape[2])),
            branches=[
                [[remap[i][o] for o in branch] for branch in branches] for i, branches in enumerate(round_.branches)
            ],
            copy_branch=round_.copy_branch,
            draft_scores=None
            if round_.draft_scores is None
            else round_.draft_scores.gather(1, gather[:, :, None].expand(-1, -1, round_.draft_scores.shape[2])),
            lookup_first_tokens=round_.lookup_first_tokens,
        )

    def _verify(self, round_: DraftRound) -> torch.Tensor:
        """The deep layers over every row's round slots; the base's logits (B, R, V) at the real slots (zeros
        elsewhere: the LM head runs on real slots only)."""
        table = self.table
        positions = table.positions[:, table.round_start :].clamp(min=0)
        masks = self._masks(table.round_start)
        final_states = self.model.deep_forward(round_.exit_states, positions, self.cache, masks)
        if self.final_context:  # the adapter's context is the verified final states; the drafts' entries go
            self.adapter_cache.crop(table.round_start - self.adapter_cache.get_seq_length())
            self._feed_adapter(final_states, positions, masks)
        real = table.positions[:, table.round_start :] >= 0
        logits = self.model.lm_head_logits(final_states[real]).float()
        full = logits.new_zeros(*real.shape, logits.shape[-1])
        full[real] = logits
        return full

    def _accept(self, index: int, round_: DraftRound, logits: torch.Tensor) -> list[int]:
        """Accept row `index`'s drafts (the best branch), emit its tokens; returns the round slots its caches keep."""
        row, branches = int(self.rows[index]), round_.branches[index] or [[]]
        sequence = self.sequences[row]
        candidates = []
        for branch in branches:
            drafts = round_.tokens[index, branch]
            slots = [0, *branch]  # the base's scores at the root and after each draft
            scores = logits[slots]
            if len(self.processors):
                paths = [torch.cat([sequence, drafts[None, :i]], dim=1) for i in range(len(slots))]
                scores = self._process([row] * len(slots), paths, scores)
            sampled = round_.draft_scores[index, branch] if self.do_sample else None
            candidates.append((drafts, scores, logits[slots], sampled))
        if self.do_sample:
            chosen, accepted, token = accept_tree_sampled([(d, q, p) for d, p, _, q in candidates])
        else:
            chosen, accepted, token = accept_tree_greedy([(d, p) for d, p, _, _ in candidates])
        drafts, scores, raw, _ = candidates[chosen if chosen is not None else 0]
        emitted = self._emit(row, [*drafts[:accepted].tolist(), token], scores, raw)
        if self.streamer is not None:
            self.streamer.put(self.sequences[row][0, sequence.shape[1] :].cpu())
        copy_branch = round_.copy_branch[index]
        kept_copy = copy_branch is not None and chosen == copy_branch and accepted > 0
        self.stats[row].record_step(len(branches[chosen if chosen is not None else 0]), emitted - 1)
        self.stats[row].lookup_rounds += int(kept_copy)
        if self.lookups[row] is not None:
            # the copy's length learns only from rounds that relied on it: a copy verified alone, or the branch kept
            # (a copy beside a chain the base preferred says nothing about how long copies should be)
            copy = branches[copy_branch] if copy_branch is not None else []
            relied_on = bool(copy) and (len(branches) == 1 or chosen == copy_branch)
            emitted_first = int(self.sequences[row][0, sequence.shape[1]])
            first = round_.lookup_first_tokens[index]
            self.lookups[row].record_round(first, emitted_first, relied_on, len(copy), accepted if relied_on else 0)
        self.pending[index] = token
        branch = branches[chosen] if chosen is not None else []
        return [0, *branch[:accepted]]  # the round's first token and the accepted drafts

    def _keep(self, paths: list[list[int]], round_: DraftRound | None = None) -> None:
        """Every cache keeps each row's accepted slots (the adapter's backlog those it has not seen, with the round's
        exit states); rows that are done leave the batch."""
        start = self.table.round_start
        rows, sources, destinations, length = self.table.keep(paths)
        for cache in (self.cache, self.adapter_cache):
            move_slots(cache, rows, sources, destinations, length)
        if round_ is not None and not self.final_context:
            self._defer_unseen(round_.exit_states, rows, sources - start, destinations, length)
        staying = [index for index, row in enumerate(self.rows.tolist()) if not self._settled(row)]
        if len(staying) < self.rows.numel():
            staying_t = torch.tensor(staying, dtype=torch.long, device=self.device)
            length = self.table.select_rows(staying_t) if staying else 0
            for cache in (self.cache, self.adapter_cache):
                select_cache_rows(cache, staying_t, length)
            if self.adapter_backlog is not None:
                self.adapter_backlog = self.adapter_backlog.select(staying_t, length)
            self.rows, self.pending = self.rows[staying_t.cpu()], self.pending[staying_t]

    def _defer_unseen(
        self,
        exit_states: torch.Tensor,
        rows: torch.LongTensor,
        offsets: torch.LongTensor,
        destinations: torch.LongTensor,
        length: int,
    ) -> None:
        """Add the kept slots the adapter has not seen (row `rows[i]`'s round slot `offsets[i]`, now at slot
        `destinations[i]` of a cache `length` slots long) to its backlog, with their round exit states; the next
        adapter step writes them in place."""
        unseen = ~self.adapter_seen[rows, offsets]
        if not unseen.any():
            return
        rows, offsets, destinations = rows[unseen], offsets[unseen], destinations[unseen]
        first = int(destinations.min())
        states = exit_states.new_zeros(self.rows.numel(), length - first, exit_states.shape[2])
        states[rows, destinations - first] = exit_states[rows, offsets]
        flags = torch.zeros(states.shape[:2], dtype=torch.bool, device=self.device)
        flags[rows, destinations - first] = True
        backlog = AdapterBacklog(first, states, flags)
        previous = self.adapter_backlog  # set when the round ran no adapter step
        self.adapter_backlog = backlog if previous is None else previous.extended(backlog)

    # -- pieces ----------------------------------------------------------------------------------------------------

    def _masks(self, query_start: int, end: int | None = None) -> dict[str, torch.Tensor]:
        dtype = self.model.parts.lm_head.weight.dtype
        return self.table.masks(query_start, self.layer_kinds, self.sliding_window, dtype, end=end)

    def _adapter_step(self, exit_states: torch.Tensor, fed: int) -> torch.Tensor:
        """The adapter on this round's exit states (B, R, D) from slot `fed` on (those it has not seen), after the
        accepted slots of earlier rounds it has not seen (`adapter_backlog`, written in place in the same call); its
        outputs (B, R - fed, D) for this round's slots."""
        states = exit_states[:, fed:]
        start = self.table.round_start + fed
        end = start + states.shape[1]
        backlog, self.adapter_backlog = self.adapter_backlog, None
        if backlog is None:
            positions = self.table.positions[:, start:end].clamp(min=0)
            masks = self._masks(start, end)
            return self.model.adapter_forward(states, positions, self.adapter_cache, masks[FULL_ATTENTION])
        states = torch.cat([backlog.states, states], dim=1)
        positions = self.table.positions[:, backlog.first : end].clamp(min=0)
        masks = self._masks(backlog.first, end)
        with overwriting_slots(self.adapter_cache, backlog.first, backlog.unseen):
            hidden = self.model.adapter_forward(states, positions, self.adapter_cache, masks[FULL_ATTENTION])
        return hidden[:, backlog.states.shape[1] :]

    def _feed_adapter(self, states: torch.Tensor, positions: torch.LongTensor, masks: dict[str, torch.Tensor]) -> None:
        """Write verified tokens into the adapter's cache: their exit states, or their final states."""
        feed = self.model.adapter_add_context if self.final_context else self.model.adapter_forward
        feed(states, positions, self.adapter_cache, masks[FULL_ATTENTION])

    def _new_lookup(self) -> PromptLookup | None:
        settings = self.settings
        return (
            PromptLookup(*(getattr(settings, name) for name in LOOKUP_FIELDS)) if settings.lookup_num_tokens else None
        )

    def _proposals(self, budgets: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor, torch.Tensor]:
        """Each row's copy from its context: tokens (B, longest draft) padded with 0, lengths (B,) within the row's
        budget, and whether the match is long enough to copy without asking the adapter (B,)."""
        batch = self.rows.numel()
        tokens = torch.zeros(batch, self.settings.longest_draft + 1, dtype=torch.long, device=self.device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        trusted = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for index, row in enumerate(self.rows.tolist()):
            lookup = self.lookups[row]
            if lookup is None:
                continue
            proposal, match_length = lookup.propose(self.sequences[row][0])
            proposal = proposal[: max(min(int(budgets[index]), self.settings.longest_copy), 0)]
            tokens[index, : proposal.numel()] = proposal
            lengths[index] = proposal.numel()
            trusted[index] = proposal.numel() > 0 and lookup.trusts(match_length)
        return tokens, lengths, trusted

    def _prefers_copy(self, copy_tokens, copy_lengths, top, confidence) -> torch.Tensor:
        """Rows whose context proposal the lookup rules prefer to the adapter's first draft."""
        return torch.tensor(
            [
                bool(copy_lengths[index])
                and self.lookups[row].prefers_copy(
                    int(copy_tokens[index, 0]),
                    int(top[index]),
                    float(confidence[index]),
                    self.settings.draft_threshold,
                )
                for index, row in enumerate(self.rows.tolist())
            ],
            dtype=torch.bool,
            device=self.device,
        )

    def _agrees_or_unsure(self, copy_tokens, copy_lengths, top, confidence) -> torch.Tensor:
        """Rows whose copy starts with the adapter's first draft, or whose adapter is unsure of it: a tree round
        verifies the copy alone there (a chain beside it would repeat the copy's first token, or hardly land)."""
        has_copy = copy_lengths > 0
        return has_copy & ((copy_tokens[:, 0] == top) | (confidence < self.settings.draft_threshold))

    def _second_choices(
        self, scores, vocab_ids, drafts, copy_tokens, copy_lengths
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's second-choice first draft (B,): the adapter's most likely first token other than its chain's
        first draft `drafts` and the copy's first token, and whether its draft probability reaches
        `tree_second_choice_threshold` (B,)."""
        probabilities, indices = scores.softmax(dim=-1).topk(min(3, scores.shape[-1]), dim=-1)
        candidates = vocab_ids[indices] if vocab_ids is not None else indices  # (B, <= 3) token ids
        taken = (candidates == drafts[:, None]) | ((candidates == copy_tokens[:, :1]) & (copy_lengths > 0)[:, None])
        first_free = (~taken).long().argmax(dim=-1)
        rows = torch.arange(candidates.shape[0], device=candidates.device)
        sure = probabilities[rows, first_free] >= self.settings.tree_second_choice_threshold
        return candidates[rows, first_free], sure & (~taken).any(dim=-1)

    def _draft_sequences(self, chains: list[list[int]], tokens: list[torch.LongTensor]) -> list[torch.LongTensor]:
        """Each row's sequence with its chain's drafts so far, for the logits processors (none: not built)."""
        if not len(self.processors):
            return []
        slots = torch.cat(tokens, dim=1)
        return [
            torch.cat([self.sequences[row], slots[index : index + 1, chains[index]]], dim=1)
            for index, row in enumerate(self.rows.tolist())
        ]

    def _one_hot(self, tokens: torch.LongTensor) -> torch.Tensor:
        return one_hot_scores(tokens, self.model.parts.lm_head.out_features)

    def _is_eos(self, tokens: torch.LongTensor) -> torch.Tensor:
        return torch.tensor(
            [int(t) in self.eos_token_ids for t in tokens.tolist()], dtype=torch.bool, device=self.device
        )

    def _budget(self, row: int) -> int:
        """Drafts row `row` may propose: its emitted tokens (drafts + one) must fit in `max_length`."""
        return self.generation_config.max_length - self.sequences[row].shape[1] - 1

    def _process(self, rows: list[int], sequences: list[torch.LongTensor], logits: torch.Tensor) -> torch.Tensor:
        return self.processors(rows, sequences, logits) if len(self.processors) else logits

    def _emit(self, row: int, tokens: list[int], scores: torch.Tensor, logits: torch.Tensor) -> int:
        """Append `tokens` to row `row` one by one, checking the stopping criteria after each; returns how many were
        appended (all, unless the row finished first and transformers would pad it from there)."""
        for index, token in enumerate(tokens):
            sequence = torch.cat([self.sequences[row], torch.tensor([[token]], device=self.device)], dim=1)
            self.sequences[row] = sequence
            if self.keep_scores:
                self.scores[row].append(scores[index])
            if self.keep_logits:
                self.raw_logits[row].append(logits[index])
            if self.finish_lengths[row] is None and bool(self.stopping_criteria(sequence, None).any()):
                self.finish_lengths[row] = sequence.shape[1]
                if self.pads_finished_rows:
                    return index + 1
        return len(tokens)

    def _settled(self, row: int) -> bool:
        """Whether row `row` is done decoding. transformers pads the rows an EOS criterion finished; without one it
        keeps decoding finished rows until every row has finished, and returns every row at that length."""
        finished = self.finish_lengths[row]
        if finished is None:
            return False
        if self.pads_finished_rows or self.sequences[row].shape[1] >= self.generation_config.max_length:
            return True
        return None not in self.finish_lengths and self.sequences[row].shape[1] >= max(self.finish_lengths)

    # -- the result ------------------------------------------------------------------------------------------------

    def _result(self, prompt_length: int) -> Any:
        if self.streamer is not None:
            self.streamer.end()
        for stats in self.stats:
            self.total_stats.add(stats)
        self.total_stats.rows = self.stats
        sequences = self.sequences
        if not self.pads_finished_rows and None not in self.finish_lengths:
            sequences = [sequence[:, : max(self.finish_lengths)] for sequence in sequences]
        longest = max(sequence.shape[1] for sequence in sequences)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        padded = torch.full((len(sequences), longest), pad, dtype=torch.long, device=self.device)
        for row, sequence in enumerate(sequences):
            padded[row, : sequence.shape[1]] = sequence[0]
        config = self.generation_config
        if not config.return_dict_in_generate:
            return padded
        steps = longest - prompt_length
        return GenerateDecoderOnlyOutput(
            sequences=padded,
            scores=self._per_step(self.scores, steps) if self.keep_scores else None,
            logits=self._per_step(self.raw_logits, steps) if self.keep_logits else None,
        )

    def _per_step(self, per_row: list[list[torch.Tensor]], steps: int) -> tuple[torch.Tensor, ...]:
        """Per-step (B, V) scores as transformers returns them; a row past its end scores its padding token."""
        vocab_size = self.model.parts.lm_head.out_features
        filler = torch.full((vocab_size,), float("-inf"), device=self.device)
        if self.pad_token_id is not None:
            filler[self.pad_token_id] = 0.0
        return tuple(
            torch.stack([rows[step] if step < len(rows) else filler for rows in per_row]) for step in range(steps)
        )


__all__ = ["AdapterBacklog", "BatchedKangarooDecoder", "DraftRound"]
