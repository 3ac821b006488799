"""Shallow KV reuse and cache bookkeeping: no token passes through the shallow layers twice."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import VOCAB, make_kangaroo
from kangaroo_hf import KangarooCandidateGenerator


class LayerTokenCounter:
    """Forward hooks recording the query length of every call to every decoder layer."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.calls: list[list[int]] = [[] for _ in layers]
        self.handles = [
            layer.register_forward_hook(self._hook(index), with_kwargs=True) for index, layer in enumerate(layers)
        ]

    def _hook(self, index: int):
        def record(module, args, kwargs, output):
            hidden_states = args[0] if args else kwargs["hidden_states"]
            self.calls[index].append(hidden_states.shape[1])

        return record

    def tokens(self, index: int) -> int:
        return sum(self.calls[index])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_each_shallow_token_is_processed_once(arch, exit_layer, threshold):
    model = make_kangaroo(arch, exit_layer=exit_layer, draft_threshold=threshold, max_draft_tokens=4)
    prompt_len = 9
    input_ids = torch.randint(2, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(exit_layer))
    counter = LayerTokenCounter(model.parts.layers)
    try:
        model.generate(input_ids, do_sample=False, max_new_tokens=33)
    finally:
        counter.remove()
    stats = model.last_generate_stats
    # Each round after the prefill starts from one token the shallow layers have not seen (the previous bonus).
    bonus_tokens = stats.verify_steps - 1
    expected = prompt_len + stats.drafted_tokens + bonus_tokens
    for index in range(model.parts.num_layers):
        assert counter.tokens(index) == expected, f"layer {index}"
    for index in range(exit_layer):
        # the prefill, then one token per call while drafting
        assert counter.calls[index][0] == prompt_len
        assert set(counter.calls[index][1:]) <= {1}
        assert len(counter.calls[index]) == 1 + bonus_tokens + stats.drafted_tokens
    for index in range(exit_layer, model.parts.num_layers):
        # verification: one call per full forward, never during drafting
        assert len(counter.calls[index]) == stats.verify_steps
    # Plain decoding, for scale: every layer sees prompt + new tokens - 1.
    assert stats.new_tokens == 33


def test_verification_logits_match_a_cache_free_forward_after_rejection():
    """After a round with a rejected draft, the cropped cache continues exactly like a fresh full forward."""
    model = make_kangaroo("mistral", exit_layer=2)
    base = model.get_base_model()
    sequence = torch.randint(2, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.parts.config)
    cache.activate_past_recording()
    with torch.no_grad():
        model(sequence[:, :10], cache=cache, output_exit_hidden_states=True, use_cache=True)
        # Draft 4 tokens (the last three will be "rejected").
        drafted = torch.randint(2, VOCAB, (1, 4), generator=torch.Generator().manual_seed(1))
        states = [
            model.shallow_forward(token.view(1, 1), torch.tensor([[10 + i]]), cache)
            for i, token in enumerate(torch.cat([sequence[:, 10:11], drafted[:, 1:]], dim=1)[0])
        ]
        assert [cache.get_seq_length(i) for i in range(4)] == [14, 14, 10, 10]
        model(
            torch.cat([sequence[:, 10:11], drafted[:, 1:]], dim=1),
            cache=cache,
            exit_hidden_states=torch.cat(states, dim=1),
            position_ids=torch.arange(10, 14).view(1, -1),
        )
        assert [cache.get_seq_length(i) for i in range(4)] == [14, 14, 14, 14]
        cache.crop(-3)  # keep only the first token of the round
        assert [cache.get_seq_length(i) for i in range(4)] == [11, 11, 11, 11]
        continued = model(sequence[:, 11:20], cache=cache, output_exit_hidden_states=True).logits
        fresh = base(sequence).logits[:, 11:20]
    torch.testing.assert_close(continued, fresh, rtol=1e-4, atol=1e-4)


def _record_adapter_cache_at_round_start(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Snapshot (accepted ids, adapter keys) at the start of every drafting round."""
    snapshots = []
    original = KangarooCandidateGenerator._draft

    def spy(self, input_ids, cache, model_kwargs, *args):
        assert self.adapter_cache.get_seq_length() == cache.get_seq_length(self.model.config.exit_layer)
        snapshots.append((input_ids.clone(), self.adapter_cache.layers[0].keys.clone()))
        return original(self, input_ids, cache, model_kwargs, *args)

    monkeypatch.setattr(KangarooCandidateGenerator, "_draft", spy)
    return snapshots


def _assert_adapter_cache_holds_the_verified_context(model, snapshots) -> None:
    """The adapter keys at each round start equal a fresh adapter pass over every accepted token but the last."""
    with torch.no_grad():
        for input_ids, keys in snapshots:
            context = input_ids[:, :-1]
            positions = torch.arange(context.shape[1]).view(1, -1)
            fresh_cache = DynamicCache()
            model.adapter_forward(model.shallow_forward(context, positions, None), positions, fresh_cache)
            torch.testing.assert_close(keys, fresh_cache.layers[0].keys, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("agreement", ["mixed", "random"])
def test_adapter_cache_is_synchronised_after_every_round(monkeypatch, agreement):
    snapshots = _record_adapter_cache_at_round_start(monkeypatch)
    model = make_kangaroo("qwen2", agreement=agreement, draft_threshold=0.0, max_draft_tokens=3)
    input_ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    model.generate(input_ids, do_sample=False, max_new_tokens=30)
    assert len(snapshots) == model.last_generate_stats.verify_steps - 1
    _assert_adapter_cache_holds_the_verified_context(model, snapshots)


def test_rounds_that_copy_a_trusted_match_skip_the_adapter_and_it_catches_up(monkeypatch):
    """Copying a trusted context match needs no drafting step; the adapter is fed every verified token it missed
    before it next drafts, so its cache then equals a fresh pass over the verified context."""
    snapshots = _record_adapter_cache_at_round_start(monkeypatch)
    fed_rows = []
    original_feed = KangarooCandidateGenerator._feed_adapter

    def feed(self, model_kwargs):
        fed_rows.append(0 if self._unfed_states is None else self._unfed_states.shape[1])
        original_feed(self, model_kwargs)

    monkeypatch.setattr(KangarooCandidateGenerator, "_feed_adapter", feed)
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=3, lookup_num_tokens=4, lookup_trust_ngram=1)
    phrase = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    input_ids = torch.cat([phrase, phrase[:, :3] + 1, phrase, phrase[:, :2]], dim=1)
    output = model.generate(input_ids, do_sample=False, max_new_tokens=30)
    assert output.tolist() == model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=30).tolist()
    skipped = model.last_generate_stats.verify_steps - 1 - len(snapshots)
    assert skipped > 0 and len(fed_rows) == len(snapshots)
    # After a skipped round the adapter takes several rounds' tokens at once; otherwise it takes one round's.
    assert max(fed_rows) > model.config.max_draft_tokens + 1
    _assert_adapter_cache_holds_the_verified_context(model, snapshots)


def test_all_accepted_round_feeds_the_last_draft_to_the_adapter(monkeypatch):
    """With a perfect draft every round is all-accepted; the adapter must then catch up on the last draft."""
    snapshots = _record_adapter_cache_at_round_start(monkeypatch)
    model = make_kangaroo("llama", exit_layer=2, draft_threshold=0.0, max_draft_tokens=3)
    with torch.no_grad():  # deep layers add nothing: the early exit is the base, so every draft is accepted
        for layer in model.parts.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    input_ids = torch.randint(2, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(input_ids, do_sample=False, max_new_tokens=21)
    _assert_adapter_cache_holds_the_verified_context(model, snapshots)
    assert out.tolist() == model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=21).tolist()
    stats = model.last_generate_stats
    assert stats.accepted_drafts == stats.drafted_tokens  # every round all-accepted
    assert stats.mean_accepted_tokens == pytest.approx(21 / 6)  # prefill + 5 rounds of 3 drafts + bonus
