"""Kangaroo on LoRA-tuned (PEFT) bases: lossless, shallow reuse includes the LoRA layers, tuning recorded."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import VOCAB, tiny_base
from kangaroo_hf import KangarooForCausalLM
from kangaroo_hf.core.peft import peft_fingerprint, warn_if_peft_differs

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def tiny_lora(arch: str = "llama", seed: int = 0):
    """A tiny random base with a random (non-zero) LoRA on attention and MLP projections."""
    torch.manual_seed(seed + 1)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    return peft.get_peft_model(tiny_base(arch, seed=seed), config).eval()


def _prompt(seed: int) -> torch.LongTensor:
    return torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_unmerged_lora_base_is_lossless(arch):
    peft_model = tiny_lora(arch)
    model = KangarooForCausalLM.from_base(
        peft_model, exit_layer=2, draft_threshold=0.0, max_draft_tokens=3, peft_adapter_name_or_path="org/lora"
    )
    assert model.get_base_model() is peft_model
    for seed in range(3):
        expected = peft_model.generate(input_ids=_prompt(seed), do_sample=False, max_new_tokens=20)
        assert model.generate(_prompt(seed), do_sample=False, max_new_tokens=20).tolist() == expected.tolist()
    assert model.config.peft_adapter_name_or_path == "org/lora"
    assert model.config.peft_adapter_fingerprint == peft_fingerprint(peft_model)


def test_lora_changes_the_output_so_the_test_above_means_something():
    peft_model = tiny_lora("llama")
    with peft_model.disable_adapter():
        plain = peft_model.generate(input_ids=_prompt(0), do_sample=False, max_new_tokens=20)
    tuned = peft_model.generate(input_ids=_prompt(0), do_sample=False, max_new_tokens=20)
    assert plain.tolist() != tuned.tolist()


def test_merged_lora_base_is_lossless():
    peft_model = tiny_lora("qwen2")
    expected = peft_model.generate(input_ids=_prompt(5), do_sample=False, max_new_tokens=20)
    merged = peft_model.merge_and_unload()
    model = KangarooForCausalLM.from_base(merged, exit_layer=1, draft_threshold=0.0)
    assert model.generate(_prompt(5), do_sample=False, max_new_tokens=20).tolist() == expected.tolist()
    assert model.config.peft_adapter_fingerprint is None


def test_lora_layers_inside_the_shallow_slice_run_once_per_token():
    peft_model = tiny_lora("llama")
    model = KangarooForCausalLM.from_base(peft_model, exit_layer=2, draft_threshold=0.0, max_draft_tokens=3)
    lora_q = model.parts.layers[0].self_attn.q_proj
    assert type(lora_q).__module__.startswith("peft")  # the shallow slice holds the LoRA-wrapped modules
    seen = []
    handle = lora_q.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    try:
        model.generate(_prompt(3), do_sample=False, max_new_tokens=16)
    finally:
        handle.remove()
    stats = model.last_generate_stats
    assert sum(seen) == 7 + stats.drafted_tokens + stats.verify_steps - 1


def test_warning_names_both_adapters_when_the_tuning_differs(caplog):
    tuned = tiny_lora("llama", seed=0)
    recorded = peft_fingerprint(tuned)
    other = tiny_lora("llama", seed=0)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    with caplog.at_level(logging.WARNING, logger="kangaroo_hf.core.peft"):
        assert warn_if_peft_differs("org/lora", recorded, other) is True
    assert "org/lora" in caplog.text and recorded[:12] in caplog.text and peft_fingerprint(other)[:12] in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kangaroo_hf.core.peft"):
        assert warn_if_peft_differs("org/lora", recorded, tiny_base("llama")) is True
    assert "no PEFT adapter" in caplog.text
    assert warn_if_peft_differs("org/lora", recorded, tuned) is False


def test_training_on_a_lora_base_records_the_tuning(tmp_path):
    """The same training API works on a PEFT base: the teacher is the tuned model, the checkpoint names the LoRA."""
    import json

    from conftest import tiny_tokenizer
    from kangaroo_hf.training import TrainingArguments, train_adapter

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '9' + message['role'][0] + message['content'] + '8' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '9a' }}{% endif %}"
    )
    rows = [
        {"messages": [{"role": "user", "content": "abcd"[: 1 + i % 4] * 3}, {"role": "assistant", "content": "bcde"}]}
        for i in range(24)
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    peft_model = tiny_lora("llama")
    lora_folder = tmp_path / "lora"
    peft_model.save_pretrained(lora_folder)
    model = KangarooForCausalLM.from_base(peft_model, exit_layer=2, peft_adapter_name_or_path=str(lora_folder))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        num_epochs=1,
        max_length=32,
        batch_tokens=128,
        validation_size=4,
        extraction_dtype="float32",
    )
    result = train_adapter(model, [data], args, tokenizer)
    assert not any(p.requires_grad for name, p in peft_model.named_parameters())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["peft_adapter_name_or_path"] == str(lora_folder)
    assert saved["peft_adapter_fingerprint"] == peft_fingerprint(peft_model)
    assert result.global_step > 0


def test_merging_and_unmerging_lora_between_calls_is_seen_by_the_kept_packed_weights():
    """PEFT merges LoRA weights in place through `.data` (no version bump); the CPU kernels' kept packed copies of the
    base layers must not serve the weights from before the merge, nor after an unmerge."""
    peft_model = tiny_lora("llama")
    model = KangarooForCausalLM.from_base(peft_model, exit_layer=2, draft_threshold=0.0, max_draft_tokens=3)
    expected = peft_model.generate(input_ids=_prompt(1), do_sample=False, max_new_tokens=20).tolist()
    with peft_model.disable_adapter():
        plain = peft_model.generate(input_ids=_prompt(1), do_sample=False, max_new_tokens=20).tolist()
    assert plain != expected  # the merge below changes what the base layers compute
    assert model.generate(_prompt(1), do_sample=False, max_new_tokens=20).tolist() == expected
    peft_model.merge_adapter()
    assert model.generate(_prompt(1), do_sample=False, max_new_tokens=20).tolist() == expected
    with peft_model.disable_adapter():  # a merged layer with its adapter off unmerges inside its forward
        assert model.generate(_prompt(1), do_sample=False, max_new_tokens=20).tolist() == plain
    peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    assert model.generate(_prompt(1), do_sample=False, max_new_tokens=20).tolist() == expected
