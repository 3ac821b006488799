"""Every private transformers name kangaroo_hf relies on, and the transformers versions it is tested with.

Kangaroo runs inside transformers' assisted-decoding loop, which is private API that changes between minor releases
(5.25 started reading `candidate_generator.num_drafting_tokens`, for one). So every such name is used here and only
here, and `PRIVATE_NAMES` lists each with what it is relied on for: `missing_private_names()` (run by the test suite)
names whatever the installed transformers lacks, so that the next break is a clear test failure, not an
`AttributeError` deep inside `generate()`. The rest of the package uses the public names this module defines.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.configuration_utils import SubConfigSpec
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

# Oldest tested release (inclusive) and first untested one (exclusive); `pyproject.toml` pins the same range.
SUPPORTED_TRANSFORMERS = ("5.24", "5.26")

# (dotted name, what kangaroo_hf relies on it for). A `module:attribute` entry is looked up with getattr; the
# `source:` entries are names the assisted loop must read from a candidate generator (checked in its source).
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("transformers.generation.utils:GenerationMixin._sample", "generate() calls it for greedy search and sampling"),
    ("transformers.generation.utils:GenerationMixin._assisted_decoding", "the draft/verify loop Kangaroo runs in"),
    ("transformers.generation.utils:GenerationMixin._get_candidate_generator", "the loop asks it for the generator"),
    ("transformers.generation.utils:_speculative_sampling", "the loop's rule for sampled drafts (q = our scores)"),
    ("transformers.generation.candidate_generator:CandidateGenerator", "base class of Kangaroo's generator"),
    ("transformers.generation.candidate_generator:CandidateGenerator.requires_model_outputs", "flag of the loop"),
    ("source:GenerationMixin._assisted_decoding:requires_model_outputs", "loop passes the last model outputs"),
    ("source:GenerationMixin._assisted_decoding:model_kwargs_overrides", "loop merges them into its next forward"),
    ("transformers.cache_utils:DynamicCache.crop", "the loop crops every layer to the accepted length"),
    ("transformers.cache_utils:DynamicCache.activate_past_recording", "the loop calls it before its first round"),
    ("transformers.cache_utils:DynamicLayer.lazy_initialization", "batched loop: layers hold keys/values (B,H,S,d)"),
    ("transformers.cache_utils:DynamicLayer.update", "batched loop: the adapter's deferred slots written in place"),
    ("transformers.configuration_utils:SubConfigSpec", "declares KangarooConfig.base_config as a sub-config"),
    ("transformers.masking_utils:create_causal_mask", "masks for slices of layers (per-layer cache lengths)"),
    ("transformers.masking_utils:create_sliding_window_causal_mask", "the same, for sliding-window layers"),
    ("transformers.modeling_utils:PreTrainedModel._init_weights", "post_init() initialises the adapter with it"),
    ("transformers.configuration_utils:PreTrainedConfig._attn_implementation", "batches: kernels taking 4D masks"),
)

_warned_version: str | None = None


def _release(version: str) -> tuple[int, ...]:
    return Version(version).release  # "5.26.0.dev0" -> (5, 26, 0): a pre-release of 5.26 is 5.26


def transformers_supported(version: str | None = None) -> bool:
    """Whether `version` (default: the installed transformers) lies in `SUPPORTED_TRANSFORMERS`."""
    installed = _release(version or transformers.__version__)
    low, high = (_release(bound) for bound in SUPPORTED_TRANSFORMERS)
    return low <= installed < high


def warn_if_unsupported_transformers(version: str | None = None) -> bool:
    """Warn once per installed version when transformers is outside the tested range; True when it warned."""
    global _warned_version
    version = version or transformers.__version__
    if transformers_supported(version) or _warned_version == version:
        return False
    _warned_version = version
    low, high = SUPPORTED_TRANSFORMERS
    warnings.warn(
        f"kangaroo_hf is tested with transformers>={low},<{high}, but {version} is installed. Kangaroo hooks into "
        "transformers' private assisted-decoding loop, which changes between minor releases: generate() may fail or "
        f"misbehave. Install a supported version (pip install 'transformers>={low},<{high}').",
        UserWarning,
        stacklevel=2,
    )
    return True


def _resolve(name: str) -> bool:
    if name.startswith("source:"):
        _, owner, needle = name.split(":")
        target = _resolve_attribute("transformers.generation.utils", owner)
        return target is not None and needle in inspect.getsource(target)
    module_name, attribute = name.split(":")
    return _resolve_attribute(module_name, attribute) is not None


def _resolve_attribute(module_name: str, dotted: str) -> Any:
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in dotted.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def missing_private_names(names: tuple[tuple[str, str], ...] | None = None) -> list[str]:
    """The entries of `names` (default `PRIVATE_NAMES`) the installed transformers lacks, each with what it is relied
    on for."""
    return [f"{name} ({reason})" for name, reason in (names or PRIVATE_NAMES) if not _resolve(name)]


class LoopCandidateGenerator(CandidateGenerator):
    """A candidate generator that reads the loop's last model outputs and adds keyword arguments to its next
    forward: the protocol of transformers' assisted loop (`requires_model_outputs`, `model_kwargs_overrides`,
    `num_drafting_tokens`) behind public names. Subclasses set `max_drafting_tokens` and call
    `set_forward_overrides`."""

    requires_model_outputs = True
    max_drafting_tokens = 1

    def set_forward_overrides(self, overrides: dict[str, Any]) -> None:
        """Keyword arguments merged into the loop's next forward (and only that one)."""
        self.model_kwargs_overrides = overrides

    @property
    def num_drafting_tokens(self) -> int:
        """Most tokens one round proposes (the loop sizes recurrent-state recording with it; transformers >= 5.25)."""
        return self.max_drafting_tokens


class GenerationHooks:
    """Mixin placed before `GenerationMixin`: routes transformers' private decoding entry points to the model's own
    `candidate_generator_for`, so greedy search and sampling run in transformers' assisted loop with that generator,
    or in the plain loop when it returns None."""

    _active_candidate_generator: CandidateGenerator | None = None

    def candidate_generator_for(self, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs):
        raise NotImplementedError

    def own_decoder_for(self, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs):
        """A decoder with a `decode(input_ids, attention_mask)` method that replaces transformers' loops for this call
        (batches, tree rounds), or None."""
        return None

    # Relies on: generate() dispatching greedy search and sampling to `_sample` with these arguments.
    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        decoder = self.own_decoder_for(input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)
        if decoder is not None:
            with self.decoding_context(decoder):
                return decoder.decode(input_ids, model_kwargs.get("attention_mask"))
        generator = self.candidate_generator_for(
            input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs
        )
        if generator is None:
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs)
        with self.decoding_context(generator):
            self._active_candidate_generator = generator
            try:
                # Relies on: `_assisted_decoding` taking `_sample`'s arguments and asking `_get_candidate_generator`.
                return self._assisted_decoding(
                    input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs
                )
            finally:
                self._active_candidate_generator = None

    def decoding_context(self, generator: Any) -> contextlib.AbstractContextManager:
        """Entered around the assisted loop or the own decoder (e.g. CPU kernels); nothing by default."""
        return contextlib.nullcontext()

    # Relies on: the assisted loop getting its generator from `_get_candidate_generator` (once per call).
    def _get_candidate_generator(self, *args: Any, **kwargs: Any) -> CandidateGenerator:
        if self._active_candidate_generator is not None:
            return self._active_candidate_generator
        return super()._get_candidate_generator(*args, **kwargs)


class CacheLayerTensors:
    """The key and value tensors (B, H, S, d) of one initialised layer of a `DynamicCache`, to gather slots from and
    to replace (relies on: `DynamicCache.layers`, and each `DynamicLayer` keeping `keys` and `values`)."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def tensors(self) -> tuple[Any, Any]:
        return self.layer.keys, self.layer.values

    def set(self, keys: Any, values: Any) -> None:
        self.layer.keys, self.layer.values = keys, values


def attention_implementation(config: Any) -> str | None:
    """The attention kernel a model config selects ("sdpa", "eager", "flash_attention_2", ...)."""
    return config._attn_implementation


def cache_layer_tensors(cache: Any) -> list[CacheLayerTensors]:
    """The tensors of every initialised layer of `cache` (a `DynamicCache` without sliding-window layers)."""
    return [CacheLayerTensors(layer) for layer in cache.layers if layer.is_initialized and layer.keys.numel()]


@contextlib.contextmanager
def overwriting_slots(cache: Any, first: int, where: Any) -> Iterator[None]:
    """During the block, each layer of `cache` takes its next update of T new keys/values (B, H, T, d) as `n =
    where.shape[1]` slots to write over slots `[first, first + n)` (the cache's last `n`) where `where` (B, n) is
    True, keeping the cached ones elsewhere, followed by `T - n` slots to append; attention then reads the whole
    layer as usual. Relies on: each `DynamicLayer.update(keys, values, ...)` returning the layer's whole keys/values.
    """
    layers = [layer for layer in cache.layers if layer.is_initialized]
    count = where.shape[1]
    write = where[:, None, :, None]

    def overwrite(layer: Any) -> Callable[..., tuple[Any, Any]]:
        def update(key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if layer.keys.shape[-2] != first + count:
                raise RuntimeError(f"expected {first + count} cached slots to overwrite, found {layer.keys.shape[-2]}")
            merged = []
            for cached, new in ((layer.keys, key_states), (layer.values, value_states)):
                kept = cached[:, :, :first]
                written = cached[:, :, first:].where(~write, new[:, :, :count])
                merged.append(torch.cat([kept, written, new[:, :, count:]], dim=2))
            layer.keys, layer.values = merged
            del layer.update  # one update each: the instance attribute goes, the class's method shows through
            return layer.keys, layer.values

        return update

    for layer in layers:
        layer.update = overwrite(layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("update", None)


@contextlib.contextmanager
def observe_candidate_generators(model: Any, observe: Callable[[CandidateGenerator], None]) -> Iterator[None]:
    """Call `observe(generator)` on each candidate generator `model`'s assisted loop builds during the block (this
    instance only; transformers exposes no other way to reach the loop's generator)."""
    original = model._get_candidate_generator  # relies on: the assisted loop calling it once per generate()

    def observed(*args: Any, **kwargs: Any) -> CandidateGenerator:
        generator = original(*args, **kwargs)
        observe(generator)
        return generator

    model._get_candidate_generator = observed
    try:
        yield
    finally:
        del model._get_candidate_generator  # the instance attribute; the class's method shows through again


warn_if_unsupported_transformers()

__all__ = [
    "CacheLayerTensors",
    "GenerationHooks",
    "LoopCandidateGenerator",
    "PRIVATE_NAMES",
    "SUPPORTED_TRANSFORMERS",
    "SubConfigSpec",
    "attention_implementation",
    "cache_layer_tensors",
    "create_causal_mask",
    "create_sliding_window_causal_mask",
    "missing_private_names",
    "observe_candidate_generators",
    "overwriting_slots",
    "transformers_supported",
    "warn_if_unsupported_transformers",
]
