"""adapter_mlp=True: the adapter block becomes a full decoder layer (the base's MLP after its attention)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import VOCAB, make_kangaroo
from kangaroo_hf import KangarooConfig, KangarooForCausalLM


def _full_layer_model(arch: str, **kwargs) -> KangarooForCausalLM:
    model = make_kangaroo(arch, adapter_mlp=True, **kwargs)
    with torch.no_grad():  # a small but non-zero MLP: drafts differ from the plain early exit
        for block in model.adapter.layers:
            block.mlp.down_proj.weight.normal_(0, 0.02)
    return model


def _prompt(length: int, seed: int) -> torch.LongTensor:
    return torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def test_the_block_uses_the_bases_mlp_class(arch):
    model = _full_layer_model(arch)
    block = model.adapter.layers[0]
    assert type(block.mlp) is type(model.parts.layers[0].mlp)
    assert block.post_attention_layernorm is not None
    plain = make_kangaroo(arch)
    assert plain.adapter.layers[0].mlp is None
    assert not any("mlp" in name for name in plain.adapter_state_dict())


@pytest.mark.parametrize("context", ["exit", "final"])
def test_full_layer_adapter_is_lossless(arch, context):
    model = _full_layer_model(arch, adapter_context=context, draft_threshold=0.0, max_draft_tokens=4)
    for seed in range(2):
        input_ids = _prompt(5 + 4 * seed, seed)
        expected = model.get_base_model().generate(input_ids, do_sample=False, max_new_tokens=24)
        assert model.generate(input_ids, do_sample=False, max_new_tokens=24).tolist() == expected.tolist()
    stats = model.last_generate_stats
    assert 0 < stats.accepted_drafts < stats.drafted_tokens


def test_mlp_changes_the_drafts():
    model = _full_layer_model("llama")
    states = torch.randn(1, 5, model.config.base_config.hidden_size)
    positions = torch.arange(5).view(1, -1)
    with torch.no_grad():
        with_mlp = model.adapter_forward(states, positions, None)
        model.adapter.layers[0].mlp.down_proj.weight.zero_()
        without = model.adapter_forward(states, positions, None)
    assert not torch.allclose(with_mlp, without)


@pytest.mark.parametrize("depth", [0, 2])
def test_final_context_training_form_matches_drafting_with_mlp(depth):
    model = _full_layer_model("qwen2", adapter_context="final")
    sequence = _prompt(10, 3)
    with torch.no_grad():
        out = model(sequence, output_exit_hidden_states=True, use_cache=False)
        positions = torch.arange(10).view(1, -1)
        trained = model.adapter_forward(
            out.exit_hidden_states, positions, None, context_states=out.final_hidden_states, draft_depth=depth
        )
        for t in range(depth, 10):
            cache, first = DynamicCache(), t - depth
            if first:
                model.adapter_add_context(out.final_hidden_states[:, :first], positions[:, :first], cache)
            hidden = model.adapter_forward(
                out.exit_hidden_states[:, first : t + 1], positions[:, first : t + 1], cache
            )
            torch.testing.assert_close(trained[:, t], hidden[:, -1], rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_keeps_the_mlp(tmp_path):
    model = _full_layer_model("mistral")
    model.save_pretrained(tmp_path / "full")
    loaded = KangarooForCausalLM.from_pretrained(tmp_path / "full", base_model=model.get_base_model())
    assert loaded.config.adapter_mlp is True
    torch.testing.assert_close(loaded.adapter_state_dict(), model.adapter_state_dict())


def test_mlp_weights_into_an_attention_only_adapter_are_refused():
    full, plain = _full_layer_model("llama"), make_kangaroo("llama")
    with pytest.raises(ValueError, match=r"adapter_mlp=False.*unexpected \['adapter\.layers\.0\.mlp"):
        plain.load_adapter_state_dict(full.adapter_state_dict())


def test_adapter_mlp_must_be_a_bool():
    config = make_kangaroo("llama").config.base_config
    with pytest.raises(ValueError, match="adapter_mlp must be a bool, got 'yes'"):
        KangarooConfig(base_config=config, adapter_mlp="yes")
