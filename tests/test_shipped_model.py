"""The shipped SmolLM2 adapter: small, documented, and lossless on the real embedded base."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from kangaroo_hf import default_model
from kangaroo_hf.default_model import SHIPPED_ADAPTER

PROMPTS = ["Write a short note inviting a colleague to lunch.", "What is 17 times 23? Explain step by step."]


def test_shipped_checkpoint_is_small_and_records_its_training():
    weights = SHIPPED_ADAPTER / "kangaroo_adapter.safetensors"
    assert weights.stat().st_size <= 8 * 1024 * 1024
    training = json.loads((SHIPPED_ADAPTER / "training_args.json").read_text())
    config = json.loads((SHIPPED_ADAPTER / "config.json").read_text())
    assert training["exit_layer"] == config["exit_layer"]
    assert (
        training["adapter_mlp"] == config["adapter_mlp"] and training["adapter_context"] == config["adapter_context"]
    )
    metrics = json.loads((SHIPPED_ADAPTER / "kangaroo_metrics.json").read_text())
    validation = metrics["training"]["epochs"][-1]["validation"]
    assert 0.0 < validation["top1_agreement"] <= 1.0
    measured = metrics["measured"]["spec_bench_float32"]  # the benchmark's numbers travel with the checkpoint
    assert measured["lossless"] and measured["identical_fraction"] == 1.0
    assert set(measured["mean_accepted_tokens_by_category"]) >= {"writing", "coding", "rag"}


@pytest.mark.compat
@pytest.mark.smollm2
def test_shipped_model_greedy_output_is_the_bases():
    if importlib.util.find_spec(default_model.GGUF_PACKAGE) is None:
        pytest.skip(f"needs the embedded model: {default_model.INSTALL_HINT}")
    from kangaroo_hf.loading import chat_input_ids

    model, tokenizer = default_model.load_default_model(dtype=torch.float32)
    base = model.get_base_model()
    drafted = 0
    for prompt in PROMPTS:
        input_ids = chat_input_ids(tokenizer, prompt)
        expected = base.generate(input_ids, do_sample=False, max_new_tokens=40)
        assert model.generate(input_ids, do_sample=False, max_new_tokens=40).tolist() == expected.tolist()
        stats = model.last_generate_stats
        assert stats.new_tokens == expected.shape[1] - input_ids.shape[1]
        drafted += stats.drafted_tokens
    assert drafted > 0


def test_conversion_cache_published_once_when_two_processes_convert(tmp_path):
    # Two processes dequantizing the GGUF at once: the first complete folder wins, the other's is dropped.
    target = tmp_path / "embedded" / "model"
    target.parent.mkdir()
    for writer in ("first", "second"):
        partial = tmp_path / "embedded" / f"model.partial-{writer}"
        partial.mkdir()
        (partial / "config.json").write_text(writer)
        default_model.publish_folder(partial, target)
        assert not partial.exists()
    assert (target / "config.json").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["model"]
