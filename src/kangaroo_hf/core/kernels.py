"""CPU products for Kangaroo's few-row forwards: a few-row float32 kernel and weights packed once for oneDNN.

Machine choices, not model facts: `KangarooForCausalLM.generate` picks them per dtype and device at run time.
"""

from __future__ import annotations

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


__all__ = [
    "FEW_ROWS",
    "FLOAT32_PACKED_MIN_ROWS",
    "CpuKernels",
    "cpu_linear",
    "few_row_linear",
    "few_row_matmul",
    "pack_weight",
    "packed_linear",
    "packed_matmul",
    "packed_weights_supported",
    "release_packed_weights",
]
