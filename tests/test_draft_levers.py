"""Speed levers stay lossless: a reduced draft vocabulary, drafts copied from the context (prompt lookup), skipped
unsure rounds, the few-row matrix-product kernel (float32) and packed weights (bfloat16)."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from conftest import VOCAB, make_kangaroo, spy_product_rows
from kangaroo_hf import CpuKernels, KangarooCandidateGenerator, KangarooConfig, KangarooForCausalLM
from kangaroo_hf.core import draft_head as generation
from kangaroo_hf.core import kernels as backbone
from kangaroo_hf.core.drafting import DraftSettings
from kangaroo_hf.core.kernels import few_row_linear, packed_linear
from kangaroo_hf.core.lookup import PromptLookup


def _prompt(length: int, seed: int) -> torch.LongTensor:
    return torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _repetitive_prompt(seed: int) -> torch.LongTensor:
    """A prompt that repeats a phrase, so the continuation is often found earlier in the context."""
    phrase = _prompt(6, seed)
    return torch.cat([phrase, _prompt(3, seed + 100), phrase, _prompt(2, seed + 200), phrase[:, :3]], dim=1)


def _spy_drafts(monkeypatch) -> list[list[int]]:
    drafted: list[list[int]] = []
    original = KangarooCandidateGenerator._draft

    def spy(self, input_ids, cache, model_kwargs, *args):
        candidate_ids, scores, states = original(self, input_ids, cache, model_kwargs, *args)
        drafted.append(candidate_ids[0, input_ids.shape[1] :].tolist())
        return candidate_ids, scores, states

    monkeypatch.setattr(KangarooCandidateGenerator, "_draft", spy)
    return drafted


def test_reduced_draft_vocabulary_is_lossless_and_only_drafts_from_the_subset(arch, monkeypatch):
    drafted = _spy_drafts(monkeypatch)
    model = make_kangaroo(arch, draft_threshold=0.0, max_draft_tokens=4)
    subset = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:40]
    model.set_draft_vocab(subset)
    assert model.config.draft_vocab_size == 40
    for seed in range(3):
        input_ids = _prompt(5 + seed, seed)
        expected = model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=25)
        assert model.generate(input_ids, do_sample=False, max_new_tokens=25).tolist() == expected.tolist()
    proposed = {token for round_drafts in drafted for token in round_drafts}
    assert proposed and proposed <= set(subset.tolist())
    assert model.last_generate_stats.accepted_drafts > 0


def test_reduced_draft_vocabulary_with_logits_processors():
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=3)
    model.set_draft_vocab(list(range(0, VOCAB, 2)))
    input_ids = _prompt(7, 4)
    kwargs = dict(do_sample=False, max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=3)
    expected = model.get_base_model().generate(input_ids, **kwargs)
    assert model.generate(input_ids, **kwargs).tolist() == expected.tolist()


def test_set_draft_vocab_rejects_ids_outside_the_vocabulary():
    model = make_kangaroo("llama")
    with pytest.raises(ValueError, match=rf"must lie in \[0, {VOCAB}\), got 3..{VOCAB}"):
        model.set_draft_vocab([3, VOCAB])
    model.set_draft_vocab(None)
    assert model.config.draft_vocab_size == 0 and model.draft_head()[2] is None


def test_prompt_lookup_drafts_are_lossless_and_used(arch):
    model = make_kangaroo(arch, agreement="random", draft_threshold=0.5, max_draft_tokens=3, lookup_num_tokens=5)
    lookup_rounds = 0
    for seed in range(4):
        input_ids = _repetitive_prompt(seed)
        expected = model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=30)
        assert model.generate(input_ids, do_sample=False, max_new_tokens=30).tolist() == expected.tolist()
        lookup_rounds += model.last_generate_stats.lookup_rounds
    assert lookup_rounds > 0


def test_prompt_lookup_per_call_override_and_edge_cases():
    model = make_kangaroo("llama", draft_threshold=0.0, max_draft_tokens=2, lookup_num_tokens=6)
    input_ids = _repetitive_prompt(9)
    base = model.get_base_model()
    for max_new_tokens in (1, 2, 3, 7):  # the length budget cuts copied drafts
        expected = base.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens)
        assert model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens).tolist() == expected.tolist()
    model.generate(input_ids, do_sample=False, max_new_tokens=20, lookup_num_tokens=0)
    assert model.last_generate_stats.lookup_rounds == 0
    one_token = torch.tensor([[5]])
    expected = base.generate(one_token, do_sample=False, max_new_tokens=12)
    assert model.generate(one_token, do_sample=False, max_new_tokens=12).tolist() == expected.tolist()


def test_lookup_length_grows_while_copies_land_and_resets_on_a_rejection():
    lookup = PromptLookup(num_tokens=2, max_ngram=3, max_tokens=7)
    lengths = []
    rounds = [
        (2, 2, True),
        (4, 4, True),
        (3, 3, False),
        (7, 7, True),
        (7, 3, True),
        (7, 0, True),
        (2, 1, True),
        (3, 3, True),
    ]
    for proposed, accepted, copied in rounds:
        lookup.record_round(None, 0, copied, proposed, accepted)
        lengths.append(lookup.length)
    # doubled after full copies (capped at 7), untouched by adapter rounds, kept after a partly accepted copy, back
    # to 2 after a copy rejected at its first token; a full copy shorter than the length (cut by the budget) keeps it
    assert lengths == [4, 7, 7, 7, 7, 2, 2, 2]
    with pytest.raises(
        ValueError, match=r"lookup_max_tokens must be 0 \(fixed length\) or an int >= lookup_num_tokens \(4\)"
    ):
        make_kangaroo("llama", lookup_num_tokens=4, lookup_max_tokens=3)


def test_lookup_proposes_the_continuation_of_the_longest_latest_match():
    lookup = PromptLookup(num_tokens=3, max_ngram=3)
    tokens, match = lookup.propose(torch.tensor([2, 3, 9, 2, 3, 8, 7, 5, 2, 3]))
    assert tokens.tolist() == [8, 7, 5] and match == 2  # no "5 2 3" before; the latest earlier "2 3"
    tokens, match = lookup.propose(torch.tensor([1, 2, 3, 9, 2, 3, 8, 1, 2, 3]))
    assert tokens.tolist() == [9, 2, 3] and match == 3  # the longest match wins over a later shorter one
    tokens, match = lookup.propose(torch.tensor([4, 5, 6]))
    assert tokens.numel() == 0 and match == 0
    assert lookup.trusts(3) is False and PromptLookup(3, 3, trust_ngram=2).trusts(2) is True
    # Copy when the adapter agrees, is unsure, or is less sure than the context's recent hit rate.
    assert lookup.prefers_copy(5, adapter_token=5, confidence=0.9, draft_threshold=0.5)
    assert lookup.prefers_copy(5, adapter_token=6, confidence=0.4, draft_threshold=0.5)
    assert not lookup.prefers_copy(5, adapter_token=6, confidence=0.9, draft_threshold=0.5)
    lookup.hit_rate = 0.95
    assert lookup.prefers_copy(5, adapter_token=6, confidence=0.9, draft_threshold=0.5)


def test_growing_lookup_is_lossless_and_copies_longer_runs(arch, monkeypatch):
    copied = []
    original = KangarooCandidateGenerator._copy_drafts

    def spy(self, tokens, input_ids, *args):
        candidate_ids, scores, exit_states = original(self, tokens, input_ids, *args)
        copied.append(candidate_ids.shape[1] - input_ids.shape[1])  # copies proposed, within the length budget
        return candidate_ids, scores, exit_states

    monkeypatch.setattr(KangarooCandidateGenerator, "_copy_drafts", spy)
    model = make_kangaroo(arch, agreement="random", draft_threshold=0.5, max_draft_tokens=2, lookup_num_tokens=2)
    model.config.lookup_max_tokens = 8
    base = model.get_base_model()
    for seed in range(4):
        input_ids = _repetitive_prompt(seed)
        expected = base.generate(input_ids, do_sample=False, max_new_tokens=40)
        assert model.generate(input_ids, do_sample=False, max_new_tokens=40).tolist() == expected.tolist()
        # a per-call length above the growth cap stays fixed
        assert model.generate(input_ids, do_sample=False, max_new_tokens=40, lookup_num_tokens=9).tolist() == (
            expected.tolist()
        )
    assert copied and max(copied) > 2


def test_first_draft_threshold_skips_unsure_rounds_losslessly(arch):
    model = make_kangaroo(arch, draft_threshold=0.0, max_draft_tokens=3)
    base = model.get_base_model()
    input_ids = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    expected = base.generate(input_ids, do_sample=False, max_new_tokens=24)
    drafted = {}
    for threshold in (0.0, 0.3, 1.0):
        out = model.generate(input_ids, do_sample=False, max_new_tokens=24, first_draft_threshold=threshold)
        assert out.tolist() == expected.tolist()
        stats = model.last_generate_stats
        assert stats.new_tokens == stats.verify_steps + stats.accepted_drafts
        drafted[threshold] = stats.drafted_tokens
    assert drafted[1.0] == 0  # no first draft reaches probability 1: every round is a plain step
    assert drafted[0.0] > 0
    assert drafted[0.0] >= drafted[0.3]


def test_first_draft_threshold_in_config_and_sampling():
    model = make_kangaroo("qwen2", first_draft_threshold=0.2, draft_threshold=0.0, max_draft_tokens=2)
    assert model.config.first_draft_threshold == 0.2
    input_ids = torch.randint(2, VOCAB, (1, 5), generator=torch.Generator().manual_seed(8))
    torch.manual_seed(0)
    out = model.generate(input_ids, do_sample=True, max_new_tokens=10)
    assert out.shape[1] == input_ids.shape[1] + 10
    with pytest.raises(ValueError, match="first_draft_threshold must be in \\[0, 1\\], got 1.5"):
        KangarooConfig(base_config=model.config.base_config, first_draft_threshold=1.5)
    with pytest.raises(ValueError, match="first_draft_threshold must be in \\[0, 1\\], got -0.1"):
        model.generate(input_ids, first_draft_threshold=-0.1, max_new_tokens=2)


# -- few-row matrix-product kernel (cpu_few_row_matmul) -------------------------------------------------------------


class _MarkedLinear(torch.nn.Linear):
    """A Linear subclass (as quantized or LoRA layers are): few_row_linear must leave it alone."""


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_few_row_linear_matches_f_linear_and_restores_the_modules(rows):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8, bias=False), _MarkedLinear(8, 8))
    hooked = torch.nn.Linear(8, 8)
    hooked.forward = lambda x: torch.zeros(x.shape[:-1] + (8,))  # as accelerate's hooks replace forward
    x = torch.randn(1, rows, 16)
    expected = block(x)
    used = []
    original = backbone.few_row_matmul
    with mock.patch.object(backbone, "few_row_matmul", lambda inp, w, b=None: used.append(w) or original(inp, w, b)):
        with few_row_linear([block, hooked, block[0]]):  # a module reached twice is replaced once
            assert "forward" in block[0].__dict__ and "forward" not in block[2].__dict__
            actual = block(x)
            assert torch.equal(hooked(x[..., :8]), torch.zeros(1, rows, 8))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # The two plain Linears, not the subclass; more than FEW_ROWS rows keep F.linear.
    assert len(used) == (2 if rows <= backbone.FEW_ROWS else 0)
    assert "forward" not in block[0].__dict__ and "forward" not in block[1].__dict__  # restored
    with pytest.raises(RuntimeError, match="boom"), few_row_linear([block]):
        raise RuntimeError("boom")
    assert "forward" not in block[0].__dict__


@pytest.mark.parametrize("shape", [(1, 1, 16), (2, 16), (1, 3, 16), (4, 16), (1, 8, 16), (1, 9, 16), (0, 16)])
def test_few_row_matmul_equals_f_linear(shape):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(24, 16), torch.randn(24), torch.randn(*shape)
    for b in (bias, None):
        actual = backbone.few_row_matmul(x, weight, b)
        assert actual.shape == shape[:-1] + (24,)
        torch.testing.assert_close(actual, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_cpu_few_row_matmul_serves_the_float32_decoding_loop_losslessly(arch, monkeypatch):
    original = backbone.few_row_matmul
    rows_seen = spy_product_rows(monkeypatch, "few_row_matmul")
    head_products: list[tuple[int, ...]] = []  # the draft head calls the kernel directly, not through a Linear
    monkeypatch.setattr(
        generation, "few_row_matmul", lambda x, w, b=None: head_products.append(tuple(w.shape)) or original(x, w, b)
    )
    # The few-row kernel alone (with packed weights it takes only 1-2 rows; next test).
    model = make_kangaroo(arch, draft_threshold=0.0, max_draft_tokens=3)
    model.cpu_kernels = CpuKernels(packed_weights=False)
    prompt = _prompt(12, seed=4)
    expected = model.generate(prompt, do_sample=False, max_new_tokens=20, use_kangaroo=False)
    assert rows_seen == []  # plain decoding keeps F.linear
    assert torch.equal(model.generate(prompt, do_sample=False, max_new_tokens=20), expected)
    # Drafting steps (1 row: shallow layers, adapter, draft head) and verifications (1 + drafts rows) go through it;
    # the prefill's 12 rows (more than FEW_ROWS) keep F.linear.
    assert {1, 4} <= set(rows_seen) and max(rows_seen) <= backbone.FEW_ROWS
    assert not any("forward" in module.__dict__ for module in model.modules())  # every Linear restored
    assert head_products and set(head_products) == {tuple(model.draft_head()[0].shape)}
    rows_seen.clear()
    head_products.clear()
    # Off for one call, then off for the model: neither uses it.
    assert torch.equal(model.generate(prompt, do_sample=False, max_new_tokens=20, cpu_kernels=False), expected)
    model.cpu_kernels = CpuKernels(few_row_matmul=False, packed_weights=False)
    assert torch.equal(model.generate(prompt, do_sample=False, max_new_tokens=20), expected)
    assert rows_seen == [] and head_products == []
    model.cpu_kernels = CpuKernels(packed_weights=False)
    model.to(torch.bfloat16)  # float32 only: other dtypes keep F.linear
    model.generate(prompt, do_sample=False, max_new_tokens=8)
    assert rows_seen == []


def test_cpu_kernel_switches_must_be_bools():
    with pytest.raises(ValueError, match="CpuKernels.few_row_matmul must be a bool, got 'yes'"):
        CpuKernels(few_row_matmul="yes")
    with pytest.raises(ValueError, match="CpuKernels.packed_weights must be a bool, got 1"):
        CpuKernels(packed_weights=1)
    with pytest.raises(ValueError, match="cpu_kernels must be a CpuKernels, True, False or None, got 'off'"):
        make_kangaroo("llama").generate(torch.tensor([[3, 4]]), max_new_tokens=2, cpu_kernels="off")


def test_cpu_kernel_switches_are_runtime_options_never_saved(tmp_path):
    model = make_kangaroo("llama", base_model_name_or_path="tiny-org/tiny-llama")
    model.cpu_kernels = CpuKernels(few_row_matmul=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"cpu_few_row_matmul", "cpu_packed_weights"} & set(saved)
    # A checkpoint written before they became runtime options still loads; the keys are dropped.
    saved.update(cpu_few_row_matmul=False, cpu_packed_weights=True)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = KangarooForCausalLM.from_pretrained(tmp_path, base_model=model.get_base_model())
    assert loaded.cpu_kernels == CpuKernels() and not hasattr(loaded.config, "cpu_few_row_matmul")


# -- packed weights (cpu_packed_weights) ---------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 9, 40])
def test_packed_linear_is_bit_identical_and_restores_the_modules(rows):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8, bias=False), _MarkedLinear(8, 8))
    block = block.to(torch.bfloat16)
    float64_linear = torch.nn.Linear(8, 8).double()  # other dtypes keep F.linear
    x = torch.randn(1, rows, 16, dtype=torch.bfloat16)
    expected = block(x)
    with packed_linear([block, block[0], float64_linear]):  # a module reached twice is packed once
        assert "forward" in vars(block[0]) and "forward" in vars(block[1]) and "forward" not in vars(block[2])
        assert float64_linear(torch.ones(1, 8, dtype=torch.float64)).dtype == torch.float64
        block[0].weight.data.zero_()  # packed on entry: a change inside the block is not seen
        with torch.no_grad():  # as in generate()
            actual = block(x)
        with torch.enable_grad():  # autograd gets F.linear (the packed product has no backward)
            x_grad = x.clone().requires_grad_()
            block[1](torch.randn(1, rows, 24, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
            assert block[0](x_grad).requires_grad
    assert torch.equal(actual, expected)  # bit-identical, not merely close
    assert block[1].weight.grad is not None
    assert not any("forward" in vars(module) for module in block)
    with pytest.raises(RuntimeError, match="boom"), packed_linear([block]):
        raise RuntimeError("boom")
    assert "forward" not in vars(block[0])


@needs_onednn
def test_kept_packed_weights_are_packed_once_and_again_only_for_a_changed_weight(monkeypatch):
    packs = []
    original = backbone.pack_weight
    monkeypatch.setattr(backbone, "pack_weight", lambda weight: packs.append(weight.shape) or original(weight))
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8)).to(torch.bfloat16)
    x = torch.randn(1, 5, 16, dtype=torch.bfloat16)

    def run(keep=True):
        with torch.no_grad(), backbone.cpu_linear([block], pack=True, keep_packed=keep):
            return block(x)

    first = run()
    assert len(packs) == 2 and torch.equal(run(), first) and len(packs) == 2  # the second block packs nothing
    with torch.no_grad():
        block[1].weight.mul_(2)  # changed in place: packed again, and the result follows the new weight
    assert torch.equal(run(), block(x)) and len(packs) == 3
    block[0].weight = torch.nn.Parameter(torch.randn(24, 16, dtype=torch.bfloat16))  # replaced: packed again
    assert torch.equal(run(), block(x)) and len(packs) == 4
    block[0].weight.data += 1  # through .data (as PEFT merges LoRA weights): no version bump, seen by the sample
    assert torch.equal(run(), block(x)) and len(packs) == 5
    run(keep=False)  # without keeping: packed on every entry, and nothing kept is touched
    assert len(packs) == 7 and run() is not None and len(packs) == 7
    backbone.release_packed_weights([block])
    run()
    assert len(packs) == 9
    model = make_kangaroo("llama").to(torch.bfloat16)
    model.generate(_prompt(6, seed=1), do_sample=False, max_new_tokens=4)  # generate() keeps them by default
    count = len(packs)
    model.generate(_prompt(6, seed=2), do_sample=False, max_new_tokens=4)
    assert len(packs) == count  # every layer's packed weight was kept
    model.cpu_kernels = CpuKernels(keep_packed_weights=False)
    model.generate(_prompt(6, seed=2), do_sample=False, max_new_tokens=4)
    assert len(packs) > count + 10


@needs_onednn
def test_cpu_packed_weights_serve_the_bfloat16_decoding_loop_bit_identically(arch, monkeypatch):
    products = spy_product_rows(monkeypatch, "packed_matmul", generation)  # the draft head calls it directly
    model = make_kangaroo(arch, draft_threshold=0.0, max_draft_tokens=3).to(torch.bfloat16)
    prompt = _prompt(12, seed=4)
    model.generate(prompt, do_sample=False, max_new_tokens=20, use_kangaroo=False)
    assert products == []  # plain decoding keeps F.linear
    packed_output = model.generate(prompt, do_sample=False, max_new_tokens=20)
    packed_stats = model.last_generate_stats
    # Every product of the loop went through it: the prefill (12 rows), drafting steps, verifications.
    assert {1, 12} <= set(products) and max(products) == 12
    assert not any("forward" in vars(module) for module in model.modules())  # every Linear restored
    products.clear()
    model.cpu_kernels = CpuKernels(packed_weights=False)
    assert torch.equal(model.generate(prompt, do_sample=False, max_new_tokens=20), packed_output) and not products
    # Bit-identical products: the same drafts, the same verifications, round for round.
    assert model.last_generate_stats.drafted_by_position == packed_stats.drafted_by_position
    assert model.last_generate_stats.accepted_by_position == packed_stats.accepted_by_position
    model.cpu_kernels = CpuKernels()
    model.to(torch.float32)  # float32: packed weights from 3 rows on, the few-row kernel below
    model.generate(prompt, do_sample=False, max_new_tokens=8)
    assert products and min(products) >= backbone.FLOAT32_PACKED_MIN_ROWS


@needs_onednn
def test_float32_splits_products_between_the_few_row_kernel_and_packed_weights(arch, monkeypatch):
    few_row_rows = spy_product_rows(monkeypatch, "few_row_matmul")
    packed_rows = spy_product_rows(monkeypatch, "packed_matmul")
    model = make_kangaroo(arch, draft_threshold=0.0, max_draft_tokens=3)  # both switches on by default
    prompt = _prompt(12, seed=4)
    expected = model.generate(prompt, do_sample=False, max_new_tokens=20, use_kangaroo=False)
    assert few_row_rows == packed_rows == []  # plain decoding keeps F.linear
    assert torch.equal(model.generate(prompt, do_sample=False, max_new_tokens=20), expected)
    # Drafting steps (1 row) take the few-row kernel; the prefill (12 rows) and 4-row verifications packed weights.
    assert set(few_row_rows) <= {1, 2} and 1 in few_row_rows
    assert {4, 12} <= set(packed_rows) and min(packed_rows) >= backbone.FLOAT32_PACKED_MIN_ROWS
    assert not any("forward" in vars(module) for module in model.modules())
    # Plain decoding through the kernels that pay for it (bench's vanilla_few_row): the few-row kernel alone.
    few_row_rows.clear()
    packed_rows.clear()
    with model.decoding_kernels([model.get_base_model()], plain_decoding=True):
        assert torch.equal(model.get_base_model().generate(prompt, do_sample=False, max_new_tokens=20), expected)
    assert few_row_rows and packed_rows == []


def _lookup_rounds_by_setting(arch: str, field: str, values: tuple, max_new_tokens: int) -> dict:
    """Copied rounds on repetitive prompts for each value of a lookup setting, checking every output is the base's.
    Threshold 0: the adapter always counts as sure, so only agreement or the setting under test makes it copy."""
    model = make_kangaroo(arch, agreement="random", draft_threshold=0.0, max_draft_tokens=2, lookup_num_tokens=4)
    rounds = {}
    for value in values:
        setattr(model.config, field, value)
        rounds[value] = 0
        for seed in range(3):
            input_ids = _repetitive_prompt(seed)
            expected = model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens)
            output = model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens)
            assert output.tolist() == expected.tolist()
            rounds[value] += model.last_generate_stats.lookup_rounds
    return rounds


def test_trusted_lookup_matches_overrule_a_sure_adapter_and_stay_lossless(arch):
    rounds = _lookup_rounds_by_setting(arch, "lookup_trust_ngram", (0, 1), max_new_tokens=24)
    assert rounds[1] > rounds[0]


def test_lookup_hit_rate_learns_whether_the_context_predicted_the_emitted_token():
    lookup = PromptLookup(num_tokens=2, max_ngram=3, hit_rate_decay=0.5)
    rates = []
    # (first token the context proposed, or None: no match; the token the base emitted)
    for proposed, emitted in [(7, 7), (8, 8), (4, 9), (None, 10), (10, 10)]:
        lookup.record_round(proposed, emitted, copied=False, proposed=0, accepted=0)
        rates.append(lookup.hit_rate)
    # hit, hit, miss, (no match: unchanged), hit; averaged with decay 0.5 from 0
    assert rates == [0.5, 0.75, 0.375, 0.375, 0.6875]


def test_lookup_hit_rate_copies_over_a_sure_adapter_and_stays_lossless(arch):
    rounds = _lookup_rounds_by_setting(arch, "lookup_hit_rate_decay", (0.0, 0.5), max_new_tokens=48)
    assert rounds[0.5] > rounds[0.0]  # tiny random bases fall into loops within 48 tokens: the context predicts them


@pytest.mark.parametrize("decay", [1.0, -0.1, True, "0.5"])
def test_lookup_hit_rate_decay_must_be_in_zero_one(decay):
    with pytest.raises(ValueError, match=r"lookup_hit_rate_decay must be a number in \[0, 1\) \(0 = off\)"):
        make_kangaroo("llama", lookup_num_tokens=3, lookup_hit_rate_decay=decay)
    with pytest.raises(ValueError, match="lookup_hit_rate_decay"):
        DraftSettings(0.5, 3, lookup_num_tokens=3, lookup_hit_rate_decay=decay)


def test_trusted_lookup_rounds_skip_the_adapter(arch, monkeypatch):
    """A trusted match is copied whatever the adapter drafts, so its round runs no drafting step: the shallow layers
    take the last accepted token and the copies in one call; other rounds still draft."""
    model = make_kangaroo(arch, agreement="random", draft_threshold=0.0, max_draft_tokens=2, lookup_num_tokens=4)
    model.config.lookup_trust_ngram = 1
    rounds: list[dict] = []
    original_propose = PromptLookup.propose
    original_scores = KangarooCandidateGenerator._draft_scores
    original_shallow = type(model).shallow_forward

    def propose(self, sequence):
        proposal, match_length = original_propose(self, sequence)
        rounds.append({"trusted": match_length >= 1, "head_calls": 0, "shallow": []})
        return proposal, match_length

    def draft_scores(self, hidden, candidate_ids):
        rounds[-1]["head_calls"] += 1
        return original_scores(self, hidden, candidate_ids)

    def shallow_forward(self, input_ids, *args, **kwargs):
        if rounds:
            rounds[-1]["shallow"].append(input_ids.shape[1])
        return original_shallow(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(PromptLookup, "propose", propose)
    monkeypatch.setattr(KangarooCandidateGenerator, "_draft_scores", draft_scores)
    monkeypatch.setattr(type(model), "shallow_forward", shallow_forward)
    input_ids = _repetitive_prompt(0)
    expected = model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=24)
    assert model.generate(input_ids, do_sample=False, max_new_tokens=24).tolist() == expected.tolist()
    trusted = [r for r in rounds if r["trusted"]]
    assert trusted and len(trusted) < len(rounds)
    assert all(r["head_calls"] == 0 and len(r["shallow"]) == 1 for r in trusted)
    assert sum(r["shallow"][0] for r in trusted) > len(trusted)  # last token and copies together
    # (the last round has no budget left to draft)
    assert all(r["head_calls"] >= 1 for r in rounds[:-1] if not r["trusted"])


def test_trusted_lookup_length_must_be_reachable():
    with pytest.raises(ValueError, match=r"lookup_trust_ngram must be 0 \(off\) or an int in \[1, lookup_max_ngram\]"):
        make_kangaroo("llama", lookup_num_tokens=3, lookup_max_ngram=2, lookup_trust_ngram=3)
    with pytest.raises(ValueError, match="lookup_trust_ngram"):
        DraftSettings(0.5, 3, lookup_num_tokens=3, lookup_trust_ngram=-1)
    assert make_kangaroo("llama", lookup_num_tokens=3, lookup_trust_ngram=3).config.lookup_trust_ngram == 3
