"""The methods `kangaroo-hf bench` compares: a registry of runners, and their draft/accept counts.

A runner answers one prompt: `runner(model, input_ids, gen_kwargs) -> (new tokens, KangarooStats | None)`, where
`model` is the `KangarooForCausalLM` and `gen_kwargs` are the shared generation arguments plus the method's own
options (`DEFAULT_METHOD_OPTIONS`). Add a method by adding a runner to `METHODS`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.compat import observe_candidate_generators
from ..core.stats import KangarooStats

REFERENCE_METHOD = "vanilla"
# Prompt lookup decoding: 10 proposed tokens (as in Spec-Bench's PLD runs), transformers' default n-gram size of 2;
# `pld_cpu_kernels` is the same method through Kangaroo's CPU kernels, so it takes the same options.
PLD_OPTIONS: dict[str, Any] = {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 2}
DEFAULT_METHOD_OPTIONS: dict[str, dict[str, Any]] = {"pld": PLD_OPTIONS, "pld_cpu_kernels": PLD_OPTIONS}


# A runner generates for one prompt and returns the new tokens, plus its speculation counts (None if it drafts
# nothing). It must do nothing costly besides `generate()`: the benchmark times the whole call.
MethodRunner = Callable[[Any, torch.LongTensor, dict[str, Any]], tuple[list[int], KangarooStats | None]]


@dataclass(frozen=True)
class Question:
    """One Spec-Bench question; only the first turn is benchmarked."""

    question_id: int
    category: str
    turns: tuple[str, ...]


@dataclass
class MethodRun:
    """One method's answer to one prompt."""

    tokens: list[int]
    time_s: float
    counts: KangarooStats | None
    identical: bool | None = None  # equal to the reference's output (greedy only)


@dataclass
class PromptRecord:
    """Every method's run on one question."""

    question: Question
    prompt_tokens: int
    runs: dict[str, MethodRun] = field(default_factory=dict)


def _new_tokens(output: torch.LongTensor, input_ids: torch.LongTensor) -> list[int]:
    return output[0, input_ids.shape[1] :].tolist()


@contextlib.contextmanager
def _record_candidate_steps(base: torch.nn.Module) -> Iterator[KangarooStats]:
    """Count draft/accept per verification step of the base's assisted loop during one `generate()` call.

    transformers does not expose these counts; its loop calls `update_candidate_strategy(input_ids, new_logits,
    n_matches)` once per verification step, where `new_logits` (1, candidates + 1, V) cover every candidate plus the
    bonus token and `n_matches` is the accepted count after EOS / length trimming. Only this model instance is patched,
    and only for the duration of the call.
    """
    counts = KangarooStats()

    def record(generator: Any) -> None:
        update = generator.update_candidate_strategy

        def recording_update(input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
            counts.record_step(drafted=scores.shape[1] - 1, accepted=int(num_matches))
            update(input_ids, scores, num_matches)

        generator.update_candidate_strategy = recording_update

    with observe_candidate_generators(base, record):
        yield counts


@contextlib.contextmanager
def _scoped_generation_config(model: torch.nn.Module, **values: Any) -> Iterator[None]:
    """Set fields of `model.generation_config` for one call, restoring them whatever happens."""
    config = model.generation_config
    previous = {name: getattr(config, name) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(config, name, value)


def _assistant_settings(config: Any) -> dict[str, Any]:
    """Kangaroo's draft stop rule in transformers' assistant terms (read from the assistant's generation config): the
    draft threshold as confidence threshold, `max_draft_tokens` drafts at most, a constant schedule."""
    return {
        "assistant_confidence_threshold": config.draft_threshold,
        "num_assistant_tokens": config.max_draft_tokens,
        "num_assistant_tokens_schedule": "constant",
    }


def run_vanilla(model: Any, input_ids: torch.LongTensor, gen_kwargs: dict[str, Any]) -> tuple[list[int], None]:
    """The base's plain `generate()`: the reference every speedup and output is measured against."""
    return _new_tokens(model.get_base_model().generate(input_ids, **gen_kwargs), input_ids), None


def run_pld(model: Any, input_ids: torch.LongTensor, gen_kwargs: dict[str, Any]) -> tuple[list[int], KangarooStats]:
    """Prompt lookup decoding on the base (`gen_kwargs` carry `prompt_lookup_num_tokens`)."""
    if not gen_kwargs.get("prompt_lookup_num_tokens"):
        raise ValueError(f"prompt lookup needs prompt_lookup_num_tokens > 0 in its options, got {gen_kwargs}.")
    base = model.get_base_model()
    with _record_candidate_steps(base) as counts:
        output = base.generate(input_ids, **gen_kwargs)
    return _new_tokens(output, input_ids), counts


def run_early_exit(
    model: Any, input_ids: torch.LongTensor, gen_kwargs: dict[str, Any]
) -> tuple[list[int], KangarooStats]:
    """transformers' self-speculative early exit on the base, with Kangaroo's exit layer and draft stop rule.

    `EarlyExitCandidateGenerator` reads its draft length and confidence threshold from the assistant's own
    `generation_config` (here the base's), not from `generate()` arguments, so they are set there for the call.
    A constant schedule keeps the draft cap fixed, as in Kangaroo.
    """
    base = model.get_base_model()
    settings = _assistant_settings(model.config)
    with _scoped_generation_config(base, **settings), _record_candidate_steps(base) as counts:
        output = base.generate(input_ids, assistant_early_exit=model.config.exit_layer, **gen_kwargs)
    return _new_tokens(output, input_ids), counts


def run_vanilla_cpu_kernels(
    model: Any, input_ids: torch.LongTensor, gen_kwargs: dict[str, Any]
) -> tuple[list[int], None]:
    """`run_vanilla` through the CPU kernels that pay for plain decoding (float32: the few-row kernel; bfloat16:
    packed weights; `model.decoding_kernels(plain_decoding=True)`): their share of Kangaroo's speed-up, apart."""
    with model.decoding_kernels([model.get_base_model()], plain_decoding=True):
        return run_vanilla(model, input_ids, gen_kwargs)


def run_pld_cpu_kernels(
    model: Any, input_ids: torch.LongTensor, gen_kwargs: dict[str, Any]
) -> tuple[list[int], KangarooStats]:
    """`run_pld` through Kangaroo's CPU kernels (its verifications are multi-row, like Kangaroo's): prompt lookup on
    equal terms with Kangaroo."""
    with model.decoding_kernels([model.get_base_model()]):
        return run_pld(model, input_ids, gen_kwargs)


def run_kangaroo(
    model: Any, input_ids: torch.LongTensor, gen_kwargs: dict[str, Any]
) -> tuple[list[int], KangarooStats]:
    """Kangaroo decoding; counts come from `model.last_generate_stats`."""
    output = model.generate(input_ids, use_kangaroo=True, **gen_kwargs)
    return _new_tokens(output, input_ids), model.last_generate_stats


def run_kangaroo_tree(
    model: Any, input_ids: torch.LongTensor, gen_kwargs: dict[str, Any]
) -> tuple[list[int], KangarooStats]:
    """Kangaroo decoding with tree rounds (`tree_rounds=True`: the context's copy and the adapter's chain verified
    together; needs the model's prompt lookup)."""
    output = model.generate(input_ids, use_kangaroo=True, tree_rounds=True, **gen_kwargs)
    return _new_tokens(output, input_ids), model.last_generate_stats


# The drafter each model exports, made once per model (the warm-up makes it, outside the timed calls).
_EXPORTED_DRAFTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def exported_drafter(model: Any) -> torch.nn.Module:
    """`hub.export.export_drafter(model)`, cached per model."""
    if model not in _EXPORTED_DRAFTERS:
        from ..hub.export import export_drafter

        _EXPORTED_DRAFTERS[model] = export_drafter(model).to(model.get_base_model().device)
    return _EXPORTED_DRAFTERS[model]


def run_kangaroo_assisted(
    model: Any, input_ids: torch.LongTensor, gen_kwargs: dict[str, Any]
) -> tuple[list[int], KangarooStats]:
    """transformers' assisted generation with the exported drafter (`kangaroo-hf export`) as `assistant_model`: its
    confidence threshold the adapter's `draft_threshold`, `max_draft_tokens` drafts at most, a constant schedule.
    What an engine with draft-model speculation makes of a Kangaroo adapter: the shallow layers run twice, the
    drafter scores the full vocabulary, and there is no prompt lookup."""
    draft, base = exported_drafter(model), model.get_base_model()
    with (
        _scoped_generation_config(draft, **_assistant_settings(model.config)),
        _record_candidate_steps(base) as counts,
    ):
        output = base.generate(input_ids, assistant_model=draft, **gen_kwargs)
    return _new_tokens(output, input_ids), counts


METHODS: dict[str, MethodRunner] = {
    "vanilla": run_vanilla,
    "pld": run_pld,
    "early_exit": run_early_exit,
    "kangaroo": run_kangaroo,
    "kangaroo_tree": run_kangaroo_tree,
    "kangaroo_assisted": run_kangaroo_assisted,
    "vanilla_cpu_kernels": run_vanilla_cpu_kernels,
    "pld_cpu_kernels": run_pld_cpu_kernels,
}
# Earlier names of methods, still accepted (the kernels are not only the few-row one any more).
METHOD_ALIASES = {"vanilla_few_row": "vanilla_cpu_kernels", "pld_few_row": "pld_cpu_kernels"}
# What `kangaroo-hf bench` runs unless told otherwise: the reference and the speculative methods.
DEFAULT_METHODS: tuple[str, ...] = ("vanilla", "pld", "early_exit", "kangaroo")


def resolve_method(name: str) -> str:
    """The method `name` stands for (an earlier name is accepted for its new one)."""
    return METHOD_ALIASES.get(name, name)


def method_kernels(name: str, model: Any) -> str:
    """Which products the method's linear layers ran through, for the report."""
    if name in ("kangaroo", "kangaroo_tree", "pld_cpu_kernels"):
        few_row, packed = model.uses_few_row_matmul(), model.uses_packed_weights()
    elif name == "vanilla_cpu_kernels":  # what pays for one-token steps: no packing in float32
        few_row = model.uses_few_row_matmul()
        packed = model.uses_packed_weights() and not few_row
    else:
        return "F.linear"
    if few_row and packed:
        return "few-row kernel (1-2 rows) + packed weights (3+ rows)"
    return "few-row kernel (up to 8 rows)" if few_row else "packed weights" if packed else "F.linear"


__all__ = [
    "MethodRun",
    "PromptRecord",
    "Question",
    "DEFAULT_METHODS",
    "DEFAULT_METHOD_OPTIONS",
    "METHODS",
    "METHOD_ALIASES",
    "method_kernels",
    "resolve_method",
    "REFERENCE_METHOD",
    "MethodRunner",
    "exported_drafter",
    "run_early_exit",
    "run_kangaroo",
    "run_kangaroo_assisted",
    "run_kangaroo_tree",
    "run_pld",
    "run_pld_cpu_kernels",
    "run_vanilla",
    "run_vanilla_cpu_kernels",
]
