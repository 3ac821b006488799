"""Kangaroo on LoRA-tuned (PEFT) bases: lossless, shallow reuse includes the LoRA layers, tuning recorded."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import VOCAB, tiny_base
from kangaroo_hf import KangarooForCausalLM
from kangaroo_hf.peft_support import peft_fingerprint, warn_if_peft_differs

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
    with caplog.at_level(logging.WARNING, logger="kangaroo_hf.peft_support"):
        assert warn_if_peft_differs("org/lora", recorded, other) is True
    assert "org/lora" in caplog.text and recorded[:12] in caplog.text and peft_fingerprint(other)[:12] in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kangaroo_hf.peft_support"):
        assert warn_if_peft_differs("org/lora", recorded, tiny_base("llama")) is True
    assert "no PEFT adapter" in caplog.text
    assert warn_if_peft_differs("org/lora", recorded, tuned) is False
