"""Run slices of a LLaMA-family decoder: the shallow layers for drafting, the deep ones for verification.

The base is never copied or forked: `DecoderParts` holds references to the base's own modules and runs
`layers[start:end]` the way `LlamaModel.forward` runs `layers[: num_hidden_layers]`. The two slices share one
`transformers` cache; while their lengths differ, masks are sized per slice (`layer_idx=` of `create_causal_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache, GenerationConfig, PreTrainedConfig, PreTrainedModel

from .compat import create_causal_mask, create_sliding_window_causal_mask

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
_REQUIRED_PARTS = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")


def unwrap_causal_lm(base: nn.Module) -> PreTrainedModel:
    """The causal LM inside `base`: `base` itself, or the tuned model inside a `peft.PeftModel` (LoRA in place)."""
    get_base_model = getattr(base, "get_base_model", None)
    if callable(get_base_model) and hasattr(base, "peft_config"):
        return get_base_model()
    return base


def _lookup(module: nn.Module, dotted: str) -> nn.Module | None:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def layer_types(config: PreTrainedConfig) -> list[str]:
    """Attention type of every layer, read from the config as the base's own model code reads it."""
    if getattr(config, "layer_types", None) is not None:
        return list(config.layer_types)
    # Mistral-style configs: one sliding window for every layer, or none.
    kind = SLIDING_ATTENTION if getattr(config, "sliding_window", None) is not None else FULL_ATTENTION
    return [kind] * config.num_hidden_layers


@dataclass
class DecoderParts:
    """References to the parts of a LLaMA-shaped causal LM that Kangaroo drives one slice at a time."""

    config: PreTrainedConfig
    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Linear

    @classmethod
    def from_base(cls, base: nn.Module) -> DecoderParts:
        """Find the parts in `base` (a `*ForCausalLM` or a PEFT model around one); name whatever is missing."""
        causal_lm = unwrap_causal_lm(base)
        missing = [name for name in _REQUIRED_PARTS if _lookup(causal_lm, name) is None]
        if missing:
            raise ValueError(
                f"{type(causal_lm).__name__} is not a LLaMA-family causal LM: Kangaroo needs "
                f"{', '.join(_REQUIRED_PARTS)}, but {', '.join(missing)} is missing."
            )
        parts = cls(
            config=causal_lm.config,
            embed_tokens=causal_lm.model.embed_tokens,
            layers=causal_lm.model.layers,
            norm=causal_lm.model.norm,
            rotary_emb=causal_lm.model.rotary_emb,
            lm_head=causal_lm.lm_head,
        )
        if not hasattr(parts.layers[0], "self_attn"):
            raise ValueError(f"{type(parts.layers[0]).__name__} has no `self_attn`: not a LLaMA-shaped decoder layer.")
        return parts

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def run_layers(
        self,
        hidden_states: torch.Tensor,
        start: int,
        end: int,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | dict[str, torch.Tensor] | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """Run `layers[start:end]` on `hidden_states` (B, T, D) at `position_ids` (B, T), updating `cache`."""
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        masks = slice_masks(self.config, hidden_states, attention_mask, cache, position_ids, start, end)
        types = layer_types(self.config)
        for layer_idx in range(start, end):
            hidden_states = self.layers[layer_idx](
                hidden_states,
                attention_mask=masks[types[layer_idx]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
            )
        return hidden_states


def slice_masks(
    config: PreTrainedConfig,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | dict[str, torch.Tensor] | None,
    cache: Cache | None,
    position_ids: torch.LongTensor,
    start: int,
    end: int,
) -> dict[str, torch.Tensor | None]:
    """One attention mask per attention type used in `layers[start:end]`, sized against that slice's cache.

    `attention_mask` is a 2D padding mask (B, K), or a dict of prepared 4D masks per attention type, used as given
    (the batched loop builds its own, `slots.SlotTable.masks`)."""
    types = layer_types(config)
    if isinstance(attention_mask, dict):
        return {types[layer_idx]: attention_mask[types[layer_idx]] for layer_idx in range(start, end)}
    masks: dict[str, torch.Tensor | None] = {}
    for layer_idx in range(start, end):
        kind = types[layer_idx]
        if kind in masks:
            continue
        make_mask = create_sliding_window_causal_mask if kind == SLIDING_ATTENTION else create_causal_mask
        masks[kind] = make_mask(
            config=config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=layer_idx if cache is not None else None,
        )
    return masks


def unwrap_generation_config(base: nn.Module) -> GenerationConfig:
    """The generation defaults of the base (or of the model inside a PEFT wrapper)."""
    generation_config = getattr(base, "generation_config", None)
    if generation_config is None:
        generation_config = getattr(DecoderParts.from_base(base), "generation_config", None) or GenerationConfig()
    return generation_config


__all__ = ["DecoderParts", "layer_types", "slice_masks", "unwrap_causal_lm", "unwrap_generation_config"]
