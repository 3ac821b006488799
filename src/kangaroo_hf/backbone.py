"""Run slices of a LLaMA-family decoder: the shallow layers for drafting, the deep ones for verification.

The base is never copied or forked: `DecoderParts` holds references to the base's own modules and runs
`layers[start:end]` the way `LlamaModel.forward` runs `layers[: num_hidden_layers]`. The two slices share one
`transformers` cache; while their lengths differ, masks are sized per slice (`layer_idx=` of `create_causal_mask`).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, PreTrainedConfig, PreTrainedModel

from .compat import create_causal_mask, create_sliding_window_causal_mask

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
_REQUIRED_PARTS = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
# Most rows `few_row_matmul` computes as `weight @ input.T`. With PyTorch's CPU BLAS on a 2-thread AMD EPYC, float32
# products over few rows are slow through `F.linear`: one row goes through a matrix-vector routine that streams the
# weight at about a third of the speed of a 2-column matrix product, and 2-8 rows cost 1.4-2x one row. A whole
# SmolLM2-135M forward over 1 / 2 / 4 / 5 / 8 new tokens takes about 0.6 / 0.7 / 0.85 / 1.0 / 1.1-1.5 of one
# `F.linear` token this way, against 1.0 / 1.7 / 1.5 / 1.4 / 1.35-1.6; from ~11 rows the two are alike.
FEW_ROWS = 8
# With weights packed for oneDNN (`pack_weight`), float32 products of 3 or more rows are faster packed than through
# `few_row_matmul` (whole SmolLM2 forwards over 6 / 8 / 12 new tokens: 46 / 49 / 54 ms against 62 / 68 / 98 ms; 3-4
# rows level), 1-2 rows are not (44 / 54 ms against 35 / 41 ms).
FLOAT32_PACKED_MIN_ROWS = 3


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
        attention_mask: torch.Tensor | None,
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


def few_row_matmul(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(input, weight, bias)`, computed as `weight @ input.T` when `input` has 1 to `FEW_ROWS` rows.

    One row is computed as two (the row twice), so the product is a matrix product rather than a matrix-vector one.
    Results can differ from `F.linear` in the last bits, as between any two kernels.
    """
    rows = input.numel() // input.shape[-1] if input.shape[-1] else 0
    if not 1 <= rows <= FEW_ROWS:
        return F.linear(input, weight, bias)
    flat = input.reshape(rows, input.shape[-1]).contiguous()
    if rows == 1:
        flat = torch.cat([flat, flat])
    # Row-major in and out: a transposed view passed on to the next product makes BLAS take a slower path.
    output = torch.mm(weight, flat.T)[:, :rows].T.contiguous()
    if bias is not None:
        output = output + bias
    return output.reshape(*input.shape[:-1], weight.shape[0])


def packed_weights_supported(weight: torch.Tensor) -> bool:
    """Whether `pack_weight` applies: a float32 or bfloat16 weight on CPU, with PyTorch built with oneDNN."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A copy of a (out, in) CPU weight in oneDNN's blocked layout, for `packed_matmul`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_matmul(input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(input, weight, bias)` with the weight as `pack_weight` returned it (no autograd).

    In bfloat16 bit-identical to `F.linear`, which runs the same oneDNN product but reorders the weight into this
    layout on every call (for a few rows that costs about as much as the product itself). In float32 `F.linear`
    runs another library's product: results can differ in the last bits, as between any two kernels.
    """
    return torch.ops.mkldnn._linear_pointwise(input, packed, bias, "none", [], "")


def _cpu_linear_forward(
    few_rows: int, packed: torch.Tensor | None
) -> Callable[[nn.Linear, torch.Tensor], torch.Tensor]:
    def forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // input.shape[-1] if input.shape[-1] else 0
        if 1 <= rows <= few_rows:
            return few_row_matmul(input, self.weight, self.bias)
        if packed is None or (torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad)):
            return F.linear(input, self.weight, self.bias)  # the packed product has no backward
        return packed_matmul(input, packed, self.bias)

    return forward


def _plain_linears(modules: Iterable[nn.Module]) -> list[nn.Linear]:
    """Each plain `nn.Linear` under `modules` once; subclasses and instances with a replaced `forward` left out."""
    found: dict[int, nn.Linear] = {}
    for root in modules:
        for module in root.modules():
            if type(module) is nn.Linear and "forward" not in module.__dict__:
                found.setdefault(id(module), module)
    return list(found.values())


@contextmanager
def cpu_linear(modules: Iterable[nn.Module], few_rows: int = 0, pack: bool = False) -> Iterator[None]:
    """Within the block, the plain `nn.Linear`s in `modules` compute through faster CPU kernels.

    Products of 1 to `few_rows` rows (at most `FEW_ROWS`) go through `few_row_matmul`. With `pack`, every weight
    `packed_weights_supported` accepts is packed for oneDNN on entry (`pack_weight`) and the other products use it
    (`packed_matmul`; under autograd the original weight). The packed copies (as large as the weights) live until
    the block ends, so weights changed inside the block are not seen. Subclasses (quantized or LoRA layers; the plain
    `base_layer` inside a LoRA layer is included) and modules whose `forward` is already replaced on the instance
    (accelerate hooks) are left as they are. The replacement is on the module instances: another thread running the
    same modules meanwhile uses it too (same math).
    """
    if not 0 <= few_rows <= FEW_ROWS:
        raise ValueError(f"few_rows must be in [0, {FEW_ROWS}], got {few_rows}.")
    linears = _plain_linears(modules)
    packed = {
        id(module): pack_weight(module.weight)
        for module in linears
        if pack and packed_weights_supported(module.weight)
    }
    for module in linears:
        module.forward = types.MethodType(_cpu_linear_forward(few_rows, packed.get(id(module))), module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


def few_row_linear(modules: Iterable[nn.Module]) -> contextlib.AbstractContextManager:
    """Within the block, the plain `nn.Linear`s in `modules` compute 1 to `FEW_ROWS` rows with `few_row_matmul`.

    The same products as `F.linear` through another BLAS routine, which is much faster for so few rows in float32 on
    CPUs; results can differ in the last bits, as between any two kernels. `cpu_linear(modules, FEW_ROWS)`.
    """
    return cpu_linear(modules, few_rows=FEW_ROWS)


def packed_linear(modules: Iterable[nn.Module]) -> contextlib.AbstractContextManager:
    """Within the block, the plain float32 / bfloat16 CPU `nn.Linear`s in `modules` compute with weights packed for
    oneDNN on entry: in bfloat16 bit-identical to `F.linear` and faster for few rows. `cpu_linear(modules, pack=True)`.
    """
    return cpu_linear(modules, pack=True)


def slice_masks(
    config: PreTrainedConfig,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.LongTensor,
    start: int,
    end: int,
) -> dict[str, torch.Tensor | None]:
    """One attention mask per attention type used in `layers[start:end]`, sized against that slice's cache."""
    types = layer_types(config)
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


__all__ = [
    "FEW_ROWS",
    "FLOAT32_PACKED_MIN_ROWS",
    "DecoderParts",
    "cpu_linear",
    "few_row_linear",
    "few_row_matmul",
    "pack_weight",
    "packed_linear",
    "packed_matmul",
    "packed_weights_supported",
    "layer_types",
    "slice_masks",
    "unwrap_causal_lm",
]
