# GENERATED FILE, DO NOT EDIT. `python -m kangaroo_hf.hub.remote_code` built it from the sources of
# kangaroo_hf 0.1.0: kangaroo_hf/core/version.py, kangaroo_hf/core/compat.py, kangaroo_hf/core/configuration.py. Edit those and regenerate.
# ruff: noqa
"""Kangaroo self-speculative decoding (arXiv 2404.18911), `configuration_kangaroo.py` for loading with
`trust_remote_code=True` where the `kangaroo_hf` package is not installed."""

from __future__ import annotations


# ------------------------------------------------------------------------------
# kangaroo_hf/core/version.py
# ------------------------------------------------------------------------------

__version__ = "0.1.0"


# ------------------------------------------------------------------------------
# kangaroo_hf/core/compat.py
# ------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------
# kangaroo_hf/core/configuration.py
# ------------------------------------------------------------------------------

import dataclasses
import difflib
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig


ADAPTER_CONTEXTS = ("exit", "final")
# Config keys of earlier versions that describe the machine, not the model: read from old checkpoints, never written.
RUNTIME_KEYS = ("cpu_few_row_matmul", "cpu_packed_weights")


@strict
class KangarooConfig(PreTrainedConfig):
    r"""
    Configuration of [`KangarooForCausalLM`].

    Args:
        base_config (`PreTrainedConfig` or `dict`):
            Config of the wrapped LLaMA-family causal LM (Llama, Mistral, Qwen2, SmolLM, ...).
        base_model_name_or_path (`str`, *optional*):
            Hub id or local folder the base weights are loaded from when a Kangaroo checkpoint is loaded.
        base_model_revision (`str`, *optional*):
            Revision (branch, tag or commit) of `base_model_name_or_path`.
        exit_layer (`int`, *optional*, defaults to 2):
            Shallow base layers shared by the draft. Paper: 2 of 32 for Vicuna-7B. The draft is
            `layers[:exit_layer]` + adapter + the base's LM head; verification runs `layers[exit_layer:]` only.
        draft_threshold (`float`, *optional*, defaults to 0.6):
            Stop drafting after a draft with top-1 probability below this. Draft early exit (paper: 0.6): the unsure
            draft is still verified. 0 always drafts `max_draft_tokens`; 1 stops after the first draft.
        first_draft_threshold (`float`, *optional*, defaults to 0.0):
            Propose a round's first draft only at this confidence. Below it the round verifies the last accepted
            token alone (a plain decoding step). 0 always proposes it (the paper). Pays
            where verifying two tokens costs much more than one (e.g. float32 on CPUs).
        max_draft_tokens (`int`, *optional*, defaults to 6):
            Most drafts per verification step. Paper: 6.
        adapter_num_layers (`int`, *optional*, defaults to 1):
            Blocks in the adapter. Attention blocks, or full decoder layers with `adapter_mlp=True`; 1 is the paper's
            adapter.
        adapter_context (`str`, *optional*, defaults to `"exit"`):
            What the adapter attends to for verified tokens. `"exit"` (the paper): their exit-layer states.
            `"final"`: the base's final (post-norm) states, which every verification computes anyway (as EAGLE's
            features); tokens drafted in the current round still use their exit-layer states. Needs
            `adapter_num_layers=1`.
        adapter_mlp (`bool`, *optional*, defaults to `False`):
            Make each adapter block a full decoder layer (attention + the base's MLP class). As EAGLE's draft layer;
            `False` is the paper's attention-only adapter.
        draft_vocab_size (`int`, *optional*, defaults to 0):
            Score drafts over this many frequent tokens only (0: all). They are stored with the adapter as
            `draft_vocab_ids`. Verification always uses the full LM head, so output stays lossless.
        lookup_num_tokens (`int`, *optional*, defaults to 0):
            Tokens a round may copy from the context (prompt lookup; 0: off). A round proposes them instead of the
            adapter's drafts when the context's n-gram continuation starts with the adapter's top choice, or the
            adapter is unsure. Helps copy-heavy tasks (summarization, RAG). 0 disables it.
        lookup_max_ngram (`int`, *optional*, defaults to 3):
            Longest context n-gram matched. The n-gram ends at the last token.
        lookup_max_tokens (`int`, *optional*, defaults to 0):
            Lookup length doubles while copies land, up to this. After a round whose `L` copied tokens were all
            accepted, the next lookup proposes up to `2 * L` (at most `lookup_max_tokens`); a copy rejected at its
            first token brings it back to `lookup_num_tokens`, one accepted in part keeps it. Long verbatim runs, and
            text that follows the context between one-token edits, then cost few verifications while short
            proposals keep each verification cheap. 0 (or `lookup_num_tokens`) keeps the length fixed.
        lookup_trust_ngram (`int`, *optional*, defaults to 0):
            Copy context matches this long even over a sure adapter, without drafting. A match of at least this many
            tokens (at most `lookup_max_ngram`; 0: off) is copied even when the adapter is sure of another first
            token, and such a round runs no drafting step; shorter matches are copied only as `lookup_num_tokens`
            says. 0 never overrules a sure adapter.
        lookup_hit_rate_decay (`float`, *optional*, defaults to 0.0):
            Copy when the context's recent hit rate beats the adapter's confidence (0: off). Each `generate()` call
            keeps a running rate of how often the context's continuation had the right first token (an exponential
            moving average over the rounds that found a match, with this decay, starting at 0), and copies whenever
            that rate exceeds the adapter's confidence in its own first draft.
            Copy-heavy answers (extraction, quoting) then copy even where a sure adapter disagrees, while answers whose
            matches miss keep the adapter's drafts. The rate is checked against the token the base actually emits,
            whatever was proposed. 0 turns this off; must be in [0, 1).
        tree_rounds (`bool`, *optional*, defaults to `False`):
            Verify the context's copy and the adapter's chain together, as one token tree. Each round puts the
            prompt-lookup continuation and the adapter's drafts side by side below the round's first token, verifies
            both in one forward (a tree attention mask, per-node positions) and keeps the branch the base accepts
            further, so a round gains at least what the better of the two would. Needs `lookup_num_tokens > 0`.
            Decodes in Kangaroo's own loop (batch 1 included). A match of `lookup_trust_ngram` tokens is still
            copied alone without a drafting step; `lookup_hit_rate_decay` chooses between copy and chain, which a
            tree round does not need, so it does not apply.
        tree_max_nodes (`int`, *optional*, defaults to 16):
            Most drafted tokens a tree round verifies per sequence. The adapter's chain takes up to
            `max_draft_tokens`, the second choice (when on) one, the copy branch the rest; must exceed the other two.
        tree_second_choice_threshold (`float`, *optional*, defaults to 1.0):
            Also verify the adapter's second-choice first draft, as a one-token branch, when its draft probability is
            at least this (tree rounds only). Where the adapter hesitates between two first tokens, the round then
            lands on either at the cost of one more verified token. The branch is the adapter's most likely first
            token other than its chain's first draft and the copy's first token (a one-hot proposal when sampling).
            1 turns it off (a second choice is never above 0.5); must be in (0, 1].
        peft_adapter_name_or_path (`str`, *optional*):
            The PEFT (e.g. LoRA) adapter the base was tuned with when the Kangaroo adapter was trained.
        peft_adapter_revision (`str`, *optional*):
            Revision of `peft_adapter_name_or_path`.
        peft_adapter_fingerprint (`str`, *optional*):
            SHA-256 of the PEFT adapter's weights, to warn when a differently tuned base is used.
        kangaroo_hf_version (`str`, *optional*):
            Version of `kangaroo_hf` that wrote the config.

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from kangaroo_hf import KangarooConfig
    >>> config = KangarooConfig(base_config=LlamaConfig(num_hidden_layers=4), exit_layer=1)
    >>> config.exit_layer
    1
    ```
    """

    model_type = "kangaroo"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    # The wrapped model's config; the cache, masks and generation defaults all come from it.
    base_config: dict | PreTrainedConfig | None = None
    # Where `from_pretrained` finds the base weights; the Kangaroo checkpoint itself holds only the adapter.
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    # Layer early exit: the draft shares the first `exit_layer` layers (and their KV cache) with the base.
    exit_layer: int = 2
    # Draft early exit: stop drafting when the draft's own top-1 probability drops below this.
    draft_threshold: float = 0.6
    # An unsure first draft costs a two-token verification for little expected gain: skip the round's drafting.
    first_draft_threshold: float = 0.0
    # Hard cap on the draft length, bounding wasted work when the draft is confidently wrong.
    max_draft_tokens: int = 6
    # Paper's adapter is a single attention block; more blocks trade draft cost for draft quality.
    adapter_num_layers: int = 1
    # Richer context for the adapter: the verified tokens' final states come free with each verification.
    adapter_context: str = "exit"
    # A full decoder layer (attention + MLP) mixes the context non-linearly; the paper's block has no MLP.
    adapter_mlp: bool = False
    # The draft's LM head is a large part of a draft step on small models; a frequent-token subset is much cheaper.
    draft_vocab_size: int = 0
    # Prompt lookup inside Kangaroo rounds: copy-heavy prompts get long, cheap drafts.
    lookup_num_tokens: int = 0
    lookup_max_ngram: int = 3
    lookup_max_tokens: int = 0
    lookup_trust_ngram: int = 0
    lookup_hit_rate_decay: float = 0.0
    # Tree rounds: the copy and the chain verified together, so a round never has to guess which one lands.
    tree_rounds: bool = False
    tree_max_nodes: int = 16
    tree_second_choice_threshold: float = 1.0
    # The PEFT adapter of a LoRA-tuned base, so loading rebuilds the same tuned model.
    peft_adapter_name_or_path: str | None = None
    peft_adapter_revision: str | None = None
    peft_adapter_fingerprint: str | None = None
    # Written on save so a checkpoint tells which release produced it.
    kangaroo_hf_version: str = __version__
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        # Saved by earlier versions; the CPU kernels are runtime options now (`KangarooForCausalLM.cpu_kernels`).
        for key in RUNTIME_KEYS:
            kwargs.pop(key, None)
        for key in kwargs:
            nearest = nearest_setting(key)
            if nearest is not None:
                raise ValueError(f"KangarooConfig got an unknown setting {key!r}; did you mean {nearest!r}?")
        super().__post_init__(**kwargs)
        self.kangaroo_hf_version = __version__
        self.validate_kangaroo()

    def validate_kangaroo(self) -> None:
        """Raise `ValueError` naming the bad value when a Kangaroo setting is impossible for the base."""
        num_layers = self.base_config.num_hidden_layers
        if not _is_int(self.exit_layer) or not 1 <= self.exit_layer < num_layers:
            raise ValueError(
                f"exit_layer must be an int in [1, {num_layers - 1}] for a base with {num_layers} layers "
                f"(the draft needs at least one shallow layer and verification at least one deep layer), "
                f"got {self.exit_layer!r}."
            )
        validate_draft_settings(self.draft_threshold, self.max_draft_tokens, self.first_draft_threshold)
        if not _is_int(self.adapter_num_layers) or self.adapter_num_layers < 1:
            raise ValueError(f"adapter_num_layers must be an int >= 1, got {self.adapter_num_layers!r}.")
        if not isinstance(self.adapter_mlp, bool):
            raise ValueError(f"adapter_mlp must be a bool, got {self.adapter_mlp!r}.")
        if self.adapter_context not in ADAPTER_CONTEXTS:
            raise ValueError(f"adapter_context must be one of {ADAPTER_CONTEXTS}, got {self.adapter_context!r}.")
        if self.adapter_context == "final" and self.adapter_num_layers != 1:
            raise ValueError(f"adapter_context='final' needs adapter_num_layers=1, got {self.adapter_num_layers}.")
        vocab_size = self.base_config.vocab_size
        if not _is_int(self.draft_vocab_size) or not 0 <= self.draft_vocab_size <= vocab_size:
            raise ValueError(
                f"draft_vocab_size must be an int in [0, {vocab_size}] (0 = full vocabulary), "
                f"got {self.draft_vocab_size!r}."
            )
        validate_lookup(*(getattr(self, name) for name in LOOKUP_FIELDS))
        validate_tree(*(getattr(self, name) for name in TREE_FIELDS))

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """The base's config: caches, masks and generation are sized by the wrapped model."""
        return self.base_config


def setting_help(name: str) -> str:
    """The description of setting `name`, as the `KangarooConfig` docstring gives it (its one source)."""
    lines = (KangarooConfig.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith(f"{name} (")), None)
    if start is None:
        raise KeyError(f"KangarooConfig documents no setting {name!r}.")
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line.strip())
    return " ".join(part for part in body if part)


def setting_summary(name: str) -> str:
    """The first sentence of `setting_help(name)`: the one-line description tables show."""
    text = setting_help(name)
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _is_int(value: Any) -> bool:
    """An int that is not a bool (`True` is an int to Python, but never a layer index or a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def kangaroo_settings() -> tuple[str, ...]:
    """The settings `KangarooConfig` adds to transformers' `PreTrainedConfig` (what `from_base` accepts)."""
    inherited = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    return tuple(field.name for field in dataclasses.fields(KangarooConfig) if field.name not in inherited)


def nearest_setting(name: str, cutoff: float = 0.8) -> str | None:
    """The Kangaroo setting `name` most resembles (`difflib` similarity at least `cutoff`), unless it is one."""
    settings = kangaroo_settings()
    if name in settings:
        return None
    matches = difflib.get_close_matches(name, settings, n=1, cutoff=cutoff)
    return matches[0] if matches else None


def check_settings(names: Any, caller: str) -> None:
    """Raise `ValueError` for any of `names` that is not a Kangaroo setting, naming the nearest valid one."""
    settings = kangaroo_settings()
    hints = [
        f"{name!r} (did you mean {nearest!r}?)" if (nearest := nearest_setting(name, cutoff=0.6)) else repr(name)
        for name in names
        if name not in settings
    ]
    if hints:
        raise ValueError(
            f"{caller} got unknown Kangaroo settings: {', '.join(hints)}. Valid settings: {', '.join(settings)}."
        )


def validate_draft_settings(draft_threshold: float, max_draft_tokens: int, first_draft_threshold: float = 0.0) -> None:
    """Raise `ValueError` for a (first-)draft threshold outside [0, 1] or a draft length below 1."""
    for name, value in (("draft_threshold", draft_threshold), ("first_draft_threshold", first_draft_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}.")
    if isinstance(max_draft_tokens, bool) or not isinstance(max_draft_tokens, int) or max_draft_tokens < 1:
        raise ValueError(f"max_draft_tokens must be an int >= 1, got {max_draft_tokens!r}.")


# The prompt-lookup settings, in `validate_lookup`'s order (config fields, and `DraftSettings` fields).
LOOKUP_FIELDS = (
    "lookup_num_tokens",
    "lookup_max_ngram",
    "lookup_max_tokens",
    "lookup_trust_ngram",
    "lookup_hit_rate_decay",
)


def validate_lookup(
    num_tokens: int, max_ngram: int, max_tokens: int = 0, trust_ngram: int = 0, hit_rate_decay: float = 0.0
) -> None:
    """Raise `ValueError` for a negative lookup length, an n-gram size below 1, a growth cap below the length, a
    trusted match length that no match can reach, or a hit-rate decay outside [0, 1)."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"lookup_num_tokens must be an int >= 0 (0 disables it), got {num_tokens!r}.")
    if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 1:
        raise ValueError(f"lookup_max_ngram must be an int >= 1, got {max_ngram!r}.")
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not (max_tokens == 0 or max_tokens >= num_tokens)
    ):
        raise ValueError(
            f"lookup_max_tokens must be 0 (fixed length) or an int >= lookup_num_tokens ({num_tokens}), "
            f"got {max_tokens!r}."
        )
    if isinstance(trust_ngram, bool) or not isinstance(trust_ngram, int) or not 0 <= trust_ngram <= max_ngram:
        raise ValueError(
            f"lookup_trust_ngram must be 0 (off) or an int in [1, lookup_max_ngram] ([1, {max_ngram}]), "
            f"got {trust_ngram!r}."
        )
    if isinstance(hit_rate_decay, bool) or not isinstance(hit_rate_decay, (int, float)) or not 0 <= hit_rate_decay < 1:
        raise ValueError(f"lookup_hit_rate_decay must be a number in [0, 1) (0 = off), got {hit_rate_decay!r}.")


# The settings `validate_tree` reads, in its order (config fields, and `DraftSettings` fields).
TREE_FIELDS = (
    "tree_rounds",
    "tree_max_nodes",
    "max_draft_tokens",
    "lookup_num_tokens",
    "tree_second_choice_threshold",
)


def validate_tree(
    tree_rounds: bool,
    tree_max_nodes: int,
    max_draft_tokens: int,
    lookup_num_tokens: int,
    second_choice_threshold: float = 1.0,
) -> None:
    """Raise `ValueError` for a non-bool switch, a node cap that leaves the copy branch no room, a second-choice
    threshold outside (0, 1], or tree rounds without prompt lookup (no copy branch to verify beside the chain)."""
    if not isinstance(tree_rounds, bool):
        raise ValueError(f"tree_rounds must be a bool, got {tree_rounds!r}.")
    if (
        isinstance(second_choice_threshold, bool)
        or not isinstance(second_choice_threshold, (int, float))
        or not 0 < second_choice_threshold <= 1
    ):
        raise ValueError(
            f"tree_second_choice_threshold must be a number in (0, 1] (1 = off), got {second_choice_threshold!r}."
        )
    others = max_draft_tokens + (second_choice_threshold < 1)  # the chain, and the second choice when it is on
    if not _is_int(tree_max_nodes) or tree_max_nodes <= others:
        what = "max_draft_tokens" + (" + 1 (the second choice)" if others > max_draft_tokens else "")
        raise ValueError(
            f"tree_max_nodes must be an int above {what} ({others}), so that the copy branch has room beside the "
            f"chain, got {tree_max_nodes!r}."
        )
    if tree_rounds and not lookup_num_tokens:
        raise ValueError(
            "tree_rounds verifies the context's copy beside the adapter's chain: set lookup_num_tokens > 0 "
            "(prompt lookup), or leave tree_rounds off."
        )


__all__ = [
    "CacheLayerTensors",
    "GenerationHooks",
    "KangarooConfig",
    "LoopCandidateGenerator",
    "PRIVATE_NAMES",
    "SUPPORTED_TRANSFORMERS",
    "SubConfigSpec",
    "attention_implementation",
    "cache_layer_tensors",
    "check_settings",
    "create_causal_mask",
    "create_sliding_window_causal_mask",
    "kangaroo_settings",
    "missing_private_names",
    "observe_candidate_generators",
    "overwriting_slots",
    "setting_help",
    "setting_summary",
    "transformers_supported",
    "validate_draft_settings",
    "validate_lookup",
    "validate_tree",
    "warn_if_unsupported_transformers",
]
