"""Tiny randomly initialised LLaMA-family bases (Llama, Mistral, Qwen2) and Kangaroo models around them."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kangaroo_hf import KangarooForCausalLM

VOCAB = 96
ARCHS = ("llama", "mistral", "qwen2")

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=512,
    # Peaked logits: a random model at the default 0.02 has near-ties that rounding could flip.
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=None,
    pad_token_id=None,
)


def tiny_base(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random base: GQA (Llama, Mistral), small sliding window (Mistral), bias + tied embeddings (Qwen2)."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(**{**_COMMON, "num_key_value_heads": 2, **overrides})
        model = LlamaForCausalLM(config)
    elif arch == "mistral":
        config = MistralConfig(**{**_COMMON, "num_key_value_heads": 1, "sliding_window": 12, **overrides})
        model = MistralForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(**{**_COMMON, "num_key_value_heads": 2, "tie_word_embeddings": True, **overrides})
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(arch)
    return model.eval()


def weaken_deep_layers(base: torch.nn.Module, exit_layer: int, scale: float) -> None:
    """Shrink what layers >= exit_layer add to the residual stream, so an early exit agrees with the base often."""
    with torch.no_grad():
        for layer in base.model.layers[exit_layer:]:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)


def mimic_early_exit(model: KangarooForCausalLM) -> None:
    """Make the adapter an identity followed by the base's final norm: the draft becomes a plain early exit."""
    with torch.no_grad():
        for block in model.adapter.layers:
            block.self_attn.o_proj.weight.zero_()
            if block.self_attn.o_proj.bias is not None:
                block.self_attn.o_proj.bias.zero_()
            if block.mlp is not None:
                block.mlp.down_proj.weight.zero_()
        model.adapter.norm.weight.copy_(model.parts.norm.weight)


def make_kangaroo(
    arch: str = "llama",
    exit_layer: int = 2,
    agreement: str = "mixed",
    seed: int = 0,
    **kangaroo_kwargs,
) -> KangarooForCausalLM:
    """A Kangaroo model whose drafts the base accepts `mixed` (often, not always), or at `random` (rarely)."""
    base = tiny_base(arch, seed=seed)
    if agreement == "mixed":
        weaken_deep_layers(base, exit_layer, scale=0.25)
    model = KangarooForCausalLM.from_base(base, exit_layer=exit_layer, **kangaroo_kwargs).eval()
    if agreement == "mixed":
        mimic_early_exit(model)
    return model


def spy_product_rows(monkeypatch, name: str, *modules) -> list[int]:
    """Replace the product `kangaroo_hf.core.kernels.<name>` (`few_row_matmul`, `packed_matmul`; also where `modules`
    imported it) by a spy that records the row count of every call, and return that record."""
    from kangaroo_hf.core import kernels as backbone

    rows: list[int] = []
    original = getattr(backbone, name)

    def spy(input, weight, bias=None):
        rows.append(input.numel() // input.shape[-1])
        return original(input, weight, bias)

    for module in (backbone, *modules):
        monkeypatch.setattr(module, name, spy)
    return rows


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: special tokens, then letters, digits, letter pairs."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>"] + list(string.ascii_lowercase) + list(string.digits)
    pairs = (a + b for a in "aeiou" for b in string.ascii_lowercase)
    while len(words) < VOCAB:
        words.append(next(pairs))
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # text is read char by char
    backend.decoder = decoders.Fuse()  # decoding concatenates tokens
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")
