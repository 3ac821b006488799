"""Batched Kangaroo decoding (B > 1, left-padded prompts): every row equals the base's own batched generate()."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StoppingCriteriaList, pipeline

from conftest import VOCAB, make_kangaroo, tiny_tokenizer
from kangaroo_hf import CpuKernels, KangarooForCausalLM
from kangaroo_hf.core import batched
from kangaroo_hf.core.batched import BatchedKangarooDecoder
from kangaroo_hf.core.slots import SlotTable
from test_transformers_integration import StopAfterToken

LENGTHS = (5, 11, 1, 20)  # a one-token prompt, and prompts longer than Mistral's sliding window (12)


def batch(lengths=LENGTHS, seed: int = 0, repeat: bool = False) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-padded prompts of `lengths` (pad id 0) and their attention mask; `repeat` makes each prompt a phrase
    said twice, for prompt lookup to find."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens = torch.randint(2, VOCAB, (length,), generator=generator)
        if repeat:
            tokens = tokens[: (length + 1) // 2].repeat(2)[:length]
        input_ids[row, width - length :] = tokens
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def assert_same_as_base(model, input_ids, attention_mask, **kwargs):
    kwargs = {"do_sample": False, "max_new_tokens": 24, "pad_token_id": 0, **kwargs}
    expected = model.get_base_model().generate(input_ids, attention_mask=attention_mask, **kwargs)
    actual = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    if isinstance(expected, torch.Tensor):
        assert actual.tolist() == expected.tolist()
    else:
        assert actual.sequences.tolist() == expected.sequences.tolist()
    return actual, expected


@pytest.mark.compat
@pytest.mark.parametrize("agreement", ["mixed", "random"])
def test_every_row_equals_the_base_batched_generate(arch, agreement):
    model = make_kangaroo(arch, agreement=agreement, draft_threshold=0.3)
    for seed in range(2):
        assert_same_as_base(model, *batch(seed=seed))
    stats = model.last_generate_stats
    assert len(stats.rows) == len(LENGTHS)
    assert stats.new_tokens == sum(row.new_tokens for row in stats.rows) == 24 * len(LENGTHS)
    if agreement == "mixed":
        assert stats.accepted_drafts > 0
        assert len({row.accepted_drafts for row in stats.rows}) > 1  # rows accepted different numbers of drafts


def test_rows_accept_like_they_do_alone():
    """Greedy drafting does not depend on the batch: each row drafts and accepts what it does at batch 1."""
    model = make_kangaroo("llama", draft_threshold=0.3)
    input_ids, attention_mask = batch()
    model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=24, pad_token_id=0)
    rows = model.last_generate_stats.rows
    for row, length in enumerate(LENGTHS):
        model.generate(input_ids[row : row + 1, -length:], do_sample=False, max_new_tokens=24, pad_token_id=0)
        alone = model.last_generate_stats
        assert (rows[row].verify_steps, rows[row].accepted_drafts) == (alone.verify_steps, alone.accepted_drafts)


@pytest.mark.parametrize(
    "settings",
    [
        dict(lookup_num_tokens=3),
        dict(lookup_num_tokens=2, lookup_max_tokens=8, lookup_trust_ngram=2),
        dict(lookup_num_tokens=3, lookup_hit_rate_decay=0.7, first_draft_threshold=0.4),
        dict(adapter_context="final"),
        dict(adapter_mlp=True, adapter_num_layers=2),
        dict(max_draft_tokens=1),
    ],
)
def test_drafting_options_stay_lossless(arch, settings):
    model = make_kangaroo(arch, draft_threshold=0.2, **settings)
    assert_same_as_base(model, *batch(seed=3, repeat=True), max_new_tokens=30)
    if settings.get("lookup_num_tokens"):
        assert model.last_generate_stats.lookup_rounds > 0


def test_reduced_draft_vocabulary_and_processors():
    model = make_kangaroo("qwen2", draft_threshold=0.2)
    model.set_draft_vocab(list(range(0, VOCAB, 2)))
    assert_same_as_base(model, *batch(seed=4), repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=10)


@pytest.mark.parametrize(
    "kernels",
    [CpuKernels(few_row_matmul=True, packed_weights=False), CpuKernels(few_row_matmul=False, packed_weights=True)],
)
def test_cpu_kernels(kernels):
    model = make_kangaroo("mistral", draft_threshold=0.2)
    input_ids, attention_mask = batch(seed=5)
    expected = model.get_base_model().generate(
        input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=20, pad_token_id=0
    )
    actual = model.generate(
        input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=20,
        pad_token_id=0,
        cpu_kernels=kernels,
    )
    assert actual.tolist() == expected.tolist()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_base():
    pytest.importorskip("peft")
    from test_peft import tiny_lora

    lora = tiny_lora("llama")
    model = KangarooForCausalLM.from_base(lora, exit_layer=2, draft_threshold=0.0, max_draft_tokens=3).eval()
    input_ids, attention_mask = batch(seed=6)
    kwargs = dict(attention_mask=attention_mask, do_sample=False, max_new_tokens=16, pad_token_id=0)
    expected = lora.generate(input_ids=input_ids, **kwargs)
    assert model.generate(input_ids, **kwargs).tolist() == expected.tolist()


def _free_run(model, input_ids, attention_mask, max_new_tokens=30) -> torch.LongTensor:
    return model.get_base_model().generate(
        input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0
    )[:, input_ids.shape[1] :]


def test_rows_finish_at_their_own_eos_and_are_padded():
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=6)
    input_ids, attention_mask = batch(seed=7)
    free_run = _free_run(model, input_ids, attention_mask)
    # A token that row 0 reaches mid-continuation; other rows reach it elsewhere or never.
    eos = next(int(t) for i, t in enumerate(free_run[0]) if i >= 7 and t not in free_run[0, :i])
    out, _ = assert_same_as_base(model, input_ids, attention_mask, max_new_tokens=30, eos_token_id=eos)
    assert (out == 0).sum() > (input_ids == 0).sum()  # some row was padded after its EOS
    assert model.last_generate_stats.rows[0].new_tokens == free_run[0].tolist().index(eos) + 1


def test_stop_strings_per_row():
    tokenizer = tiny_tokenizer()
    model = make_kangaroo("qwen2", draft_threshold=0.0, max_draft_tokens=6)
    input_ids, attention_mask = batch(seed=8)
    free_run = _free_run(model, input_ids, attention_mask)
    tokens = tokenizer.convert_ids_to_tokens(free_run[1].tolist())
    stop = tokens[8] + tokens[9]
    kwargs = dict(max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer, eos_token_id=VOCAB - 1)
    out, _ = assert_same_as_base(model, input_ids, attention_mask, **kwargs)
    assert "".join(tokenizer.convert_ids_to_tokens(out[1, input_ids.shape[1] :].tolist())).count(stop) == 1


def test_finished_rows_keep_decoding_without_an_eos_criterion_as_transformers_does():
    """transformers pads finished rows only for EOS criteria; with a custom criterion alone they keep decoding."""
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=6)
    input_ids, attention_mask = batch(seed=9)
    free_run = _free_run(model, input_ids, attention_mask)
    token = next(int(t) for i, t in enumerate(free_run[2]) if i >= 5 and t not in free_run[2, :i])
    assert_same_as_base(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=30,
        stopping_criteria=StoppingCriteriaList([StopAfterToken(token)]),
    )


def test_max_new_tokens_reached_mid_draft():
    model = make_kangaroo("mistral", draft_threshold=0.0, max_draft_tokens=6)
    for max_new_tokens in (1, 2, 5, 13):
        assert_same_as_base(model, *batch(seed=10), max_new_tokens=max_new_tokens)


def test_return_dict_with_scores_and_logits():
    model = make_kangaroo("llama", draft_threshold=0.1, max_draft_tokens=4)
    input_ids, attention_mask = batch(seed=11)
    kwargs = dict(max_new_tokens=12, return_dict_in_generate=True, output_scores=True, output_logits=True)
    actual, expected = assert_same_as_base(model, input_ids, attention_mask, repetition_penalty=1.2, **kwargs)
    assert len(actual.scores) == len(expected.scores) == len(actual.logits) == 12
    for ours, theirs in zip(actual.scores + actual.logits, expected.scores + expected.logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_streamer_is_refused_for_a_batch():
    from test_transformers_integration import RecordingStreamer

    model = make_kangaroo("llama")
    input_ids, attention_mask = batch()
    for prompts, extra in ((input_ids, {}), (input_ids[:1, -5:], {"num_return_sequences": 2, "do_sample": True})):
        streamer = RecordingStreamer()
        with pytest.raises(ValueError, match="Streamers handle one sequence"):
            model.generate(prompts, max_new_tokens=4, pad_token_id=0, streamer=streamer, **extra)
        assert streamer.chunks == [] or len(streamer.chunks) == 1  # nothing decoded was streamed


def test_right_padding_is_refused_with_the_fix():
    model = make_kangaroo("llama")
    input_ids, attention_mask = batch()
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        model.generate(input_ids.flip(1), attention_mask=attention_mask.flip(1), max_new_tokens=4, pad_token_id=0)


def test_pipeline_with_batch_size_uses_batched_kangaroo():
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token, tokenizer.padding_side = "<unk>", "left"
    model = make_kangaroo("llama", draft_threshold=0.2, max_draft_tokens=4)
    prompts = ["hello kangaroo", "a", "the quick brown fox", "jumps over", "lazy dogs sleep"]
    kwargs = dict(max_new_tokens=12, do_sample=False, batch_size=4)
    seen = []
    original = BatchedKangarooDecoder.decode

    def spy(self, input_ids, attention_mask):
        seen.append(input_ids.shape[0])
        return original(self, input_ids, attention_mask)

    BatchedKangarooDecoder.decode = spy
    try:
        ours = pipeline("text-generation", model=model, tokenizer=tokenizer)(prompts, **kwargs)
    finally:
        BatchedKangarooDecoder.decode = original
    theirs = pipeline("text-generation", model=model.get_base_model(), tokenizer=tokenizer)(prompts, **kwargs)
    assert seen == [4]  # the fifth prompt is a batch of one, in transformers' assisted loop
    assert ours == theirs


@pytest.mark.parametrize("tree", [False, True, "second_choice"])
def test_caches_hold_exactly_each_row_verified_tokens_and_verification_skips_the_shallow_layers(monkeypatch, tree):
    """After every round each row's caches equal a fresh forward over its verified tokens: the base's at once, the
    adapter's but for the accepted slots it has not seen, which wait in its backlog with their exact exit states and
    are written at its next step (then it holds every verified token). The shallow layers never run during a
    verification, which reuses the exit states drafting computed, once per slot; the adapter runs in drafting steps
    only (once per draft-head call, besides the prefill)."""
    settings = dict(lookup_num_tokens=3, tree_rounds=True) if tree else {}
    if tree == "second_choice":  # three branches: the copy, the chain and the adapter's second-choice first draft
        settings["tree_second_choice_threshold"] = 0.02
    model = make_kangaroo(
        "mistral",
        draft_threshold=0.05 if tree else 0.2,
        max_draft_tokens=5,
        adapter_num_layers=2,  # the second layer's keys depend on the first's attention over the cache
        adapter_mlp=True,
        **settings,
    )
    input_ids, attention_mask = batch(seed=12, repeat=tree)
    phase = {"verifying": False, "shallow_in_verification": 0, "verifications": 0}
    original_verify = BatchedKangarooDecoder._verify

    def verify(self, round_):
        phase["verifying"], phase["verifications"] = True, phase["verifications"] + 1
        try:
            return original_verify(self, round_)
        finally:
            phase["verifying"] = False

    monkeypatch.setattr(BatchedKangarooDecoder, "_verify", verify)

    slots = {"appended": input_ids.numel(), "through_shallow": 0, "reference": 0}  # the prompt's, then each round's
    original_append = SlotTable.append

    def append(self, positions, parents=None):
        slots["appended"] += positions.numel()
        return original_append(self, positions, parents)

    monkeypatch.setattr(SlotTable, "append", append)

    def count_shallow(module, args, kwargs):
        phase["shallow_in_verification"] += phase["verifying"]
        slots["through_shallow"] += args[0].shape[0] * args[0].shape[1]

    calls = {"adapter": 0, "draft_head": 0, "in_reference": False}

    def count_adapter(module, args, kwargs):
        calls["adapter"] += not calls["in_reference"]

    hooks = [
        model.parts.layers[0].register_forward_pre_hook(count_shallow, with_kwargs=True),
        model.adapter.register_forward_pre_hook(count_adapter, with_kwargs=True),
    ]
    original_scores = batched.DraftHead.scores

    def scores(self, *args, **kwargs):
        calls["draft_head"] += 1
        return original_scores(self, *args, **kwargs)

    monkeypatch.setattr(batched.DraftHead, "scores", scores)

    def fresh(decoder, index, row):
        """Caches and exit states of a fresh forward over row `row`'s verified tokens (all but its last)."""
        real = decoder.table.positions[index] >= 0
        tokens = decoder.sequences[row][
            :,
            attention_mask[row].bool().tolist() + [True] * (decoder.sequences[row].shape[1] - attention_mask.shape[1]),
        ]
        cache, adapter_cache = DynamicCache(), DynamicCache()
        slots["reference"] += tokens.shape[1] - 1
        calls["in_reference"] = True
        with torch.no_grad():
            out = model(tokens[:, :-1], cache=cache, output_exit_hidden_states=True)
            positions = torch.arange(tokens.shape[1] - 1)[None]
            model.adapter_forward(out.exit_hidden_states, positions, adapter_cache)
        calls["in_reference"] = False
        return real, cache, adapter_cache, out.exit_hidden_states[0]

    def assert_slots(ours, theirs, index, ours_selected, theirs_selected):
        for layer, reference in zip(ours.layers, theirs.layers, strict=True):
            for mine, expected in ((layer.keys, reference.keys), (layer.values, reference.values)):
                torch.testing.assert_close(
                    mine[index][:, ours_selected], expected[0][:, theirs_selected], rtol=1e-4, atol=1e-5
                )

    checked, written = [], {"waiting": 0, "checked_after_write": 0}
    original_keep = BatchedKangarooDecoder._keep

    def keep_and_check(self, paths, round_=None):
        original_keep(self, paths, round_)
        backlog = self.adapter_backlog
        for index, row in enumerate(self.rows.tolist()):
            real, cache, adapter_cache, exit_states = fresh(self, index, row)
            assert_slots(self.cache, cache, index, real, slice(None))
            waiting = torch.zeros_like(real)
            if backlog is not None:
                waiting[backlog.first :] = backlog.unseen[index]
                torch.testing.assert_close(backlog.states[index][backlog.unseen[index]], exit_states[waiting[real]])
            written["waiting"] += int(waiting.sum())
            assert_slots(self.adapter_cache, adapter_cache, index, real & ~waiting, ~waiting[real])
            checked.append(row)

    original_step = BatchedKangarooDecoder._adapter_step

    def step_and_check(self, exit_states, fed):
        had_backlog = self.adapter_backlog is not None
        hidden = original_step(self, exit_states, fed)
        if had_backlog:  # every verified slot is now in the adapter's cache
            start = self.table.round_start
            for index, row in enumerate(self.rows.tolist()):
                real, _, adapter_cache, _ = fresh(self, index, row)
                real[start:] = False
                assert_slots(self.adapter_cache, adapter_cache, index, real, slice(None))
            written["checked_after_write"] += 1
        return hidden

    monkeypatch.setattr(BatchedKangarooDecoder, "_keep", keep_and_check)
    monkeypatch.setattr(BatchedKangarooDecoder, "_adapter_step", step_and_check)
    try:
        model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=20, pad_token_id=0)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(set(checked)) == len(LENGTHS) and len(checked) > 3 * len(LENGTHS)
    assert written["waiting"] > 0 and written["checked_after_write"] > 0
    assert calls["adapter"] == calls["draft_head"] + 1  # the prefill's, then one per drafting step
    assert phase["verifications"] > 3 and phase["shallow_in_verification"] == 0
    # Each slot went through the shallow layers exactly once, when it was written (minus the fresh reference
    # forwards above, which run every layer once per checked token).
    assert slots["through_shallow"] - slots["reference"] == slots["appended"]
    assert model.last_generate_stats.accepted_drafts > 0


def test_the_shared_loop_pieces_are_the_batch_one_pieces():
    """The batched loop drafts through the same DraftHead and PromptLookup as batch 1 (no copies)."""
    from kangaroo_hf.core import drafting

    assert batched.DraftHead is drafting.DraftHead
    assert batched.PromptLookup is drafting.PromptLookup
