"""Where a Kangaroo round spends its time, as fractions of one plain forward of the base.

`profile_generation` times one `generate()` call with the pieces wrapped: shallow layers, adapter, draft head
(+ logits processors), verification (deep layers + LM head) and everything else (the assisted loop's bookkeeping).
The speed-up follows from these numbers:

    speedup ~= tau * T_plain_step / T_round,   T_round = k * (shallow + adapter + head) + T_verify + overhead

where tau is the mean accepted tokens per verification step and k the mean drafts per round. Where Kangaroo decoding
uses a CPU kernel (`CpuKernels`: few-row kernel in float32, packed weights in bfloat16), the plain step is also timed
with that kernel, so the speed-up splits into what the kernel alone would give plain decoding and what speculation
adds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from ..core.drafting import KangarooCandidateGenerator
from ..core.modeling import KangarooForCausalLM

PIECES = ("shallow", "adapter", "draft_head", "verify", "prefill")


@dataclass
class RoundProfile:
    """Seconds per piece summed over one `generate()` call, plus what is needed to express them per round."""

    total_s: float
    plain_step_s: float
    rounds: int
    new_tokens: int
    drafted_tokens: int
    mean_accepted_tokens: float
    seconds: dict[str, float] = field(default_factory=dict)
    kernel_plain_step_s: float | None = None  # the plain step through `decoding_kernels`, where Kangaroo uses one

    @property
    def overhead_s(self) -> float:
        return self.total_s - sum(self.seconds.values())

    def per_round_fraction(self) -> dict[str, float]:
        """Each piece's time per round (prefill excluded) as a fraction of one plain forward."""
        scale = 1.0 / (self.rounds * self.plain_step_s) if self.rounds else 0.0
        fractions = {name: self.seconds.get(name, 0.0) * scale for name in PIECES if name != "prefill"}
        fractions["overhead"] = self.overhead_s * scale
        return fractions

    def predicted_speedup(self, plain_step_s: float | None = None) -> float:
        """tau * T_plain / T_round from the measured pieces (prefill excluded on both sides); `plain_step_s` replaces
        the plain step (e.g. `kernel_plain_step_s`)."""
        round_s = (self.total_s - self.seconds.get("prefill", 0.0)) / max(self.rounds, 1)
        tokens_per_round = (self.new_tokens - 1) / max(self.rounds, 1)
        return tokens_per_round * (plain_step_s or self.plain_step_s) / round_s

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            overhead_s=self.overhead_s,
            per_round_fraction_of_plain_forward=self.per_round_fraction(),
            mean_drafts_per_round=self.drafted_tokens / max(self.rounds, 1),
            predicted_speedup=self.predicted_speedup(),
        )
        if self.kernel_plain_step_s:
            out["predicted_speedup_over_kernel_plain_step"] = self.predicted_speedup(self.kernel_plain_step_s)
        return out


class _Stopwatch:
    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # keeps the signature: generate() inspects forward's parameters
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


@contextlib.contextmanager
def _instrumented(model: KangarooForCausalLM, watch: _Stopwatch) -> Iterator[None]:
    """Wrap the pieces on this model instance (and the generator class) for one call; always unwrapped after."""
    original_forward = model.forward

    @functools.wraps(original_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        name = "verify" if kwargs.get("exit_hidden_states") is not None else "prefill"
        return watch.wrap(name, original_forward)(*args, **kwargs)

    patches = {
        "shallow_forward": watch.wrap("shallow", model.shallow_forward),
        "adapter_forward": watch.wrap("adapter", model.adapter_forward),
        # adapter_context="final": writing the verified tokens' final states into the adapter cache is adapter work.
        "adapter_add_context": watch.wrap("adapter", model.adapter_add_context),
        "forward": forward,
    }
    original_scores = KangarooCandidateGenerator._draft_scores
    try:
        for name, fn in patches.items():
            setattr(model, name, fn)
        KangarooCandidateGenerator._draft_scores = watch.wrap("draft_head", original_scores)
        yield
    finally:
        for name in patches:
            delattr(model, name)
        KangarooCandidateGenerator._draft_scores = original_scores


@torch.no_grad()
def plain_step_seconds(
    model: KangarooForCausalLM, context_length: int, repeats: int = 9, kernel: bool = False
) -> float:
    """Median time of one plain decoding step of the base (one new token, `context_length` cached); with `kernel`,
    its Linears go through the CPU kernel Kangaroo decoding uses (`model.decoding_kernels`)."""
    if kernel:
        with model.decoding_kernels([model.get_base_model()], plain_decoding=True):
            return plain_step_seconds(model, context_length, repeats)
    base = model.get_base_model()
    device = model.device
    ids = torch.randint(0, model.parts.lm_head.out_features, (1, context_length + 1), device=device)
    cache = DynamicCache(config=model.parts.config)
    base(ids[:, :-1], cache=cache, use_cache=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        base(ids[:, -1:], cache=cache, use_cache=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cache.crop(-1)
    return statistics.median(times)


def profile_generation(
    model: KangarooForCausalLM, input_ids: torch.LongTensor, **generate_kwargs: Any
) -> RoundProfile:
    """Time one Kangaroo `generate()` call piece by piece."""
    watch = _Stopwatch(model.device)
    with _instrumented(model, watch):
        start = time.perf_counter()
        output = model.generate(input_ids, **generate_kwargs)
        total = time.perf_counter() - start
    stats = model.last_generate_stats
    mean_context = input_ids.shape[1] + (output.shape[1] - input_ids.shape[1]) // 2
    kernel = model.uses_few_row_matmul() or model.uses_packed_weights()
    return RoundProfile(
        kernel_plain_step_s=plain_step_seconds(model, mean_context, kernel=True) if kernel else None,
        total_s=total,
        plain_step_s=plain_step_seconds(model, mean_context),
        rounds=stats.verify_steps - 1,
        new_tokens=stats.new_tokens,
        drafted_tokens=stats.drafted_tokens,
        mean_accepted_tokens=stats.mean_accepted_tokens,
        seconds=dict(watch.seconds),
    )


def format_profile(profile: RoundProfile) -> str:
    """A short table: per-round time of each piece as a fraction of one plain forward."""
    lines = [
        f"rounds {profile.rounds}, tau {profile.mean_accepted_tokens:.2f}, "
        f"drafts/round {profile.drafted_tokens / max(profile.rounds, 1):.2f}, "
        f"plain forward {profile.plain_step_s * 1000:.1f} ms",
        "piece        per round (x plain forward)",
    ]
    for name, fraction in profile.per_round_fraction().items():
        lines.append(f"  {name:<10} {fraction:6.3f}")
    lines.append(f"predicted speedup (tau x plain / round): {profile.predicted_speedup():.2f}x")
    if profile.kernel_plain_step_s:
        lines.append(
            f"plain forward through Kangaroo's CPU kernel {profile.kernel_plain_step_s * 1000:.1f} ms: "
            f"the kernel alone "
            f"{profile.plain_step_s / profile.kernel_plain_step_s:.2f}x, speculation over it "
            f"{profile.predicted_speedup(profile.kernel_plain_step_s):.2f}x"
        )
    return "\n".join(lines)


def _run_profile(args: argparse.Namespace) -> int:
    from ..loading import chat_input_ids, load_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    input_ids = chat_input_ids(tokenizer, args.prompt).to(model.device)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.generate(input_ids, **{**kwargs, "max_new_tokens": 8})  # warm-up
    profile = profile_generation(model, input_ids, **kwargs)
    print(format_profile(profile))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(profile.to_dict(), handle, indent=2)
    return 0


def add_profile(subparsers: Any) -> None:
    from ..loading import DEFAULT_PROMPT, DTYPES

    parser = subparsers.add_parser("profile", help="time each piece of a Kangaroo round against a plain forward")
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    parser.add_argument("--model", default=None, help="Kangaroo folder or repo id (default: shipped SmolLM2 model)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the profile as JSON here")
    parser.set_defaults(handler=_run_profile)


__all__ = ["RoundProfile", "format_profile", "profile_generation"]
