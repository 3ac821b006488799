"""Configuration of a Kangaroo model: which base, where the draft exits, and when drafting stops.

Reference: Liu et al., "Kangaroo: Lossless Self-Speculative Decoding via Double Early Exiting", arXiv 2404.18911.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from .compat import SubConfigSpec
from .version import __version__

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
    "KangarooConfig",
    "check_settings",
    "kangaroo_settings",
    "setting_help",
    "setting_summary",
    "validate_draft_settings",
    "validate_lookup",
    "validate_tree",
]
