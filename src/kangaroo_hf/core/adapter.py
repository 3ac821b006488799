"""The Kangaroo adapter (paper section 3.1): attention block(s) between two RMSNorms, built from the base's classes."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache

from .layers import DecoderParts


class KangarooAdapterBlock(nn.Module):
    """`h + Attn(RMSNorm(h))`, with the attention class of the base (so GQA, biases and RoPE match it).

    With `mlp=True` it is a full decoder layer: `h + MLP(RMSNorm(h))` follows, with the base's MLP class.
    """

    def __init__(self, parts: DecoderParts, layer_idx: int, mlp: bool = False) -> None:
        super().__init__()
        config = parts.config
        self.input_layernorm = type(parts.norm)(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = type(parts.layers[0].self_attn)(config, layer_idx=layer_idx)
        if mlp:
            self.post_attention_layernorm = type(parts.norm)(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = type(parts.layers[0].mlp)(config)
        else:
            self.post_attention_layernorm = self.mlp = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
        )
        return self.feed_forward(hidden_states + attn_output)

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The MLP half of a full-layer block (identity for the paper's attention-only block)."""
        if self.mlp is None:
            return hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class KangarooAdapter(nn.Module):
    """The paper's adapter (section 3.1): attention block(s) between two RMSNorms, no MLP, its own KV cache."""

    def __init__(
        self,
        parts: DecoderParts,
        num_layers: int = 1,
        draft_vocab_size: int = 0,
        context: str = "exit",
        mlp: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList([KangarooAdapterBlock(parts, index, mlp) for index in range(num_layers)])
        self.norm = type(parts.norm)(parts.config.hidden_size, eps=parts.config.rms_norm_eps)
        # adapter_context="final": verified tokens enter the attention as the base's final states, normed here.
        self.context_norm = (
            type(parts.norm)(parts.config.hidden_size, eps=parts.config.rms_norm_eps) if context == "final" else None
        )
        # Vocabulary ids the draft head scores (empty: all). Saved with the adapter; set by `set_draft_vocab`.
        self.register_buffer("draft_vocab_ids", torch.arange(draft_vocab_size, dtype=torch.long), persistent=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """Map exit-layer states (B, T, D) to states (B, T, D) ready for the base's LM head."""
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, attention_mask, cache)
        return self.norm(hidden_states)

    def add_context(
        self,
        final_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache,
    ) -> None:
        """Write the keys/values of verified tokens, computed from their final states (B, T, D), into `cache`."""
        self.layers[0].self_attn(
            hidden_states=self.context_norm(final_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
        )


def context_training_mask(
    length: int,
    draft_depth: int | torch.LongTensor,
    attention_mask: torch.Tensor | None,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive mask (B, 1, 2T, 2T) over [final states ; exit states] for `KangarooForCausalLM._adapter_over_context`.

    Exit row t sees final-state columns s < t - depth(t) and exit-state columns t - depth(t) <= s <= t; final-state
    rows only see themselves (their outputs are discarded). Padding (`attention_mask` == 0) is hidden everywhere.
    """
    t = torch.arange(length, device=device)
    depth = torch.as_tensor(draft_depth, device=device).expand(length).clamp(min=0)
    first_drafted = (t - depth).clamp(min=0).view(-1, 1)  # (T, 1)
    s = t.view(1, -1)
    sees_final = s < first_drafted
    sees_exit = (s >= first_drafted) & (s <= t.view(-1, 1))
    allowed = torch.zeros(2 * length, 2 * length, dtype=torch.bool, device=device)
    allowed[:length, :length] = torch.eye(length, dtype=torch.bool, device=device)
    allowed[length:, :length] = sees_final
    allowed[length:, length:] = sees_exit
    allowed = allowed.expand(batch, 1, 2 * length, 2 * length)
    if attention_mask is not None:
        keep = attention_mask.bool().repeat(1, 2).view(batch, 1, 1, 2 * length)
        allowed = allowed & keep | torch.eye(2 * length, dtype=torch.bool, device=device)  # no empty rows
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
