"""Train a Kangaroo adapter with the base frozen: self-distillation data, cached features, soft cross-entropy.

Recipe (paper section 3.1, Kangaroo arXiv 2404.18911): the draft is `layers[:exit_layer]` + adapter + the base's LM
head, and the adapter learns to map the base's exit-layer states to the base's own next-token distribution. Here:

1. conversations (JSONL `messages`, or any iterable of such dicts) are rendered with the base's chat template; the
   loss covers assistant tokens only. With `self_distill`, assistant turns are first replaced by the base's own greedy
   answers: drafts are verified against exactly those, so they are the right training text;
2. the frozen base runs once over all sequences and its exit-layer and (post-norm) last-layer states are cached on
   disk in half precision (`features.FeatureCache`), or, with `online_features`, recomputed every epoch on the
   accelerator (`features.OnlineFeatures`);
3. the adapter runs over whole sequences (causal attention over the exit states, positions 0..T-1); the loss is the
   soft cross-entropy between the draft distribution and `softmax(lm_head(last))`, masked to assistant tokens. With
   `targets="tokens"` it is the cross-entropy on the text's next token instead: for self-distilled answers that is
   the base's own greedy choice, and the base then only runs up to the exit layer (no last-layer states at all), which
   makes feature extraction about `num_layers / exit_layer` times cheaper (what makes training on a CPU practical);
4. validation reports top-1 agreement with the base, expected acceptance `sum_v min(p, q)` and the mean accepted
   tokens per verification step of greedy Kangaroo decoding replayed on the validation answers (`simulated_tau`).

The same code runs on CPU, one GPU, or several through `accelerate launch` (data parallel over the adapter).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..core.checkpoint import save_safetensors
from .data import SelfDistillArguments, encode_conversations, load_conversations, self_distill, split_validation
from .features import FeatureCache, OnlineFeatures
from .loss import (
    DistillStats,
    distill_loss_chunks,
    draft_states,
    draft_vocab_ids,
    evaluate_adapter,
    iter_planned,
    make_batch,
    plan_epoch,
    uses_final_context,
)
from .state import find_checkpoint, load_tensors_and_state, lr_lambda, save_tensors_and_state

logger = logging.getLogger(__name__)


@dataclass
class TrainingArguments:
    """Everything that decides a training run; saved as `training_args.json` next to the adapter."""

    output_dir: str = field(default="runs/kangaroo-adapter", metadata={"help": "adapter, checkpoints and metrics"})
    # -- the draft model (used when a plain base is given) --
    init_adapter: str | None = field(
        default=None,
        metadata={
            "help": "a saved Kangaroo adapter folder (save_pretrained) to train further instead of a fresh adapter; "
            "its exit layer, adapter shape and draft vocabulary apply"
        },
    )
    exit_layer: int = field(default=2, metadata={"help": "shallow base layers shared by the draft"})
    adapter_num_layers: int = field(
        default=1, metadata={"help": "adapter blocks (full layers with adapter_mlp; paper: 1)"}
    )
    adapter_context: str = field(
        default="exit",
        metadata={"help": "exit (paper) or final: the adapter also attends to verified tokens' final states"},
    )
    adapter_mlp: bool = field(
        default=False, metadata={"help": "full decoder layer: the base's MLP after the adapter's attention"}
    )
    init_from_early_exit: bool = field(
        default=True,
        metadata={"help": "start as a plain early exit: zero attention output, output norm = the base's final norm"},
    )
    # -- data --
    max_length: int = field(default=2048, metadata={"help": "tokens kept per conversation (long RAG prompts fit)"})
    max_examples: int | None = field(default=None, metadata={"help": "conversations kept after mixing all sources"})
    max_examples_per_source: int | None = field(default=None, metadata={"help": "cap per JSONL file, for balance"})
    draft_vocab_size: int = field(
        default=0,
        metadata={
            "help": "draft over the N most frequent answer tokens only (saved with the adapter); 0: all. An adapter "
            "trained further (init_adapter) keeps the draft vocabulary it has"
        },
    )
    loss_on: str = field(
        default="assistant", metadata={"help": "assistant (answer tokens only) or all (prompt and template too)"}
    )
    targets: str = field(
        default="distribution",
        metadata={
            "help": "distribution (soft cross-entropy against the base's next-token distribution) or tokens (the "
            "text's next token: the base's greedy choice on self-distilled answers; no full forward of the base)"
        },
    )
    validation_size: float = field(default=0.02, metadata={"help": "held-out conversations: a count, or a fraction"})
    self_distill: bool = field(
        default=False, metadata={"help": "answer the prompts with the base's own greedy outputs"}
    )
    distill_cache: str | None = field(default=None, metadata={"help": "JSONL of self-distilled conversations"})
    distill_max_new_tokens: int = field(default=256, metadata={"help": "answer length cap for self-distillation"})
    distill_batch_size: int = field(default=16, metadata={"help": "prompts generated together"})
    distill_dtype: str = field(default="bfloat16", metadata={"help": "dtype of the base while it generates answers"})
    # -- feature cache --
    online_features: bool = field(
        default=False,
        metadata={"help": "recompute the base's states every epoch instead of caching them on disk (fast on GPUs)"},
    )
    feature_cache_dir: str | None = field(default=None, metadata={"help": "default: <output_dir>/features"})
    feature_layers: list[int] | None = field(default=None, metadata={"help": "exit layers to cache (default: one)"})
    feature_dtype: str = field(default="float16", metadata={"help": "storage dtype of cached states"})
    extraction_dtype: str = field(default="bfloat16", metadata={"help": "autocast dtype of the base's forward"})
    extraction_batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per extraction forward"})
    shard_tokens: int = field(default=262_144, metadata={"help": "tokens per cache shard"})
    # -- optimisation --
    num_epochs: int = field(default=3, metadata={"help": "passes over the training sequences"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    batch_tokens: int = field(default=16384, metadata={"help": "padded tokens per micro-batch (B * T)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on norms)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps with linear warmup"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "decay after warmup: cosine or linear (to 0)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    loss_chunk_tokens: int = field(default=2048, metadata={"help": "tokens per LM-head chunk in the loss"})
    mixed_precision: str = field(
        default="no", metadata={"help": "no or bf16: LM-head matmuls of the loss in bfloat16"}
    )
    autocast_adapter: bool = field(
        default=False,
        metadata={"help": "with mixed_precision, also run the adapter under autocast (faster on bfloat16 CPUs)"},
    )
    seed: int = field(default=0, metadata={"help": "seeds data order, split and initialisation"})
    # -- bookkeeping --
    logging_steps: int = field(default=10, metadata={"help": "optimizer steps between log lines"})
    save_steps: int | None = field(default=None, metadata={"help": "checkpoint interval (also after every epoch)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint folder, or 'latest'"})
    eval_thresholds: list[float] = field(
        default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8], metadata={"help": "draft thresholds of simulated_tau"}
    )

    def __post_init__(self) -> None:
        if self.lr_scheduler not in ("cosine", "linear"):
            raise ValueError(f"lr_scheduler must be 'cosine' or 'linear', got {self.lr_scheduler!r}.")
        if self.loss_on not in ("assistant", "all"):
            raise ValueError(f"loss_on must be 'assistant' or 'all', got {self.loss_on!r}.")
        if self.targets not in ("distribution", "tokens"):
            raise ValueError(f"targets must be 'distribution' or 'tokens', got {self.targets!r}.")
        if self.targets == "tokens" and self.adapter_context == "final":
            raise ValueError(
                "adapter_context='final' attends to the base's last-layer states: use targets='distribution'."
            )
        if self.autocast_adapter and self.mixed_precision == "no":
            raise ValueError("autocast_adapter needs mixed_precision='bf16' (the autocast dtype).")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}.")
        for name in ("num_epochs", "batch_tokens", "gradient_accumulation_steps", "max_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.validation_size < 0:
            raise ValueError(f"validation_size must be >= 0, got {self.validation_size}.")

    @property
    def cached_layers(self) -> list[int]:
        return sorted(set(self.feature_layers or []) | {self.exit_layer})

    @property
    def needs_last_states(self) -> bool:
        """Whether training reads the base's last-layer states (distribution targets, or the final-state context)."""
        return self.targets == "distribution" or self.adapter_context == "final"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What `train_adapter` returns: the trained model (adapter in place) and its numbers."""

    model: nn.Module
    global_step: int
    metrics: list[dict[str, Any]]
    output_dir: Path
    train_loss: list[float] = field(default_factory=list)


class _AdapterModule(nn.Module):
    """What DDP wraps: the adapter's parameters only, called through the model's own `adapter_forward`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.adapter = model.adapter
        object.__setattr__(self, "kangaroo", model)  # not a submodule: the frozen base stays out of DDP

    def forward(self, exit_states, position_ids, adapter_cache, attention_mask, **context):
        return self.kangaroo.adapter_forward(exit_states, position_ids, adapter_cache, attention_mask, **context)


def prepare_model(model_or_base: nn.Module, args: TrainingArguments) -> nn.Module:
    """A `KangarooForCausalLM` with a fresh adapter (or the given model's, or the saved one `args.init_adapter`
    names), base frozen, adapter trainable."""
    from ..core.modeling import KangarooForCausalLM

    if args.init_adapter is not None:
        if isinstance(model_or_base, KangarooForCausalLM):
            raise ValueError("init_adapter needs a plain base: this model already has an adapter to train.")
        model_or_base = KangarooForCausalLM.from_pretrained(args.init_adapter, base_model=model_or_base)
    if isinstance(model_or_base, KangarooForCausalLM):
        model = model_or_base
        # The model's own adapter is trained further: its shape, not the arguments', is what gets recorded; so is
        # the draft vocabulary it was trained on, when it has one (0, the full vocabulary, may still be narrowed).
        names = ["exit_layer", "adapter_num_layers", "adapter_context", "adapter_mlp"]
        names += ["draft_vocab_size"] if model.config.draft_vocab_size else []
        for name in names:
            value = getattr(model.config, name)
            if getattr(args, name) != value:
                logger.info("Using the model's %s=%r (not %r)", name, value, getattr(args, name))
                setattr(args, name, value)
    else:
        torch.manual_seed(args.seed)
        # Only set when used, so a model class without the option still trains the paper's adapter.
        context = {"adapter_context": args.adapter_context} if args.adapter_context != "exit" else {}
        if args.adapter_mlp:
            context["adapter_mlp"] = True
        model = KangarooForCausalLM.from_base(
            model_or_base, exit_layer=args.exit_layer, adapter_num_layers=args.adapter_num_layers, **context
        )
        if args.init_from_early_exit:
            with torch.no_grad():
                for block in model.adapter.layers:
                    block.self_attn.o_proj.weight.zero_()
                    if block.mlp is not None:
                        block.mlp.down_proj.weight.zero_()
                model.adapter.norm.weight.copy_(model.parts.norm.weight)
    model.requires_grad_(False)
    model.adapter.requires_grad_(True)
    model.adapter.float()
    adapter_ids = {id(p) for p in model.adapter.parameters()}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(id(p) in adapter_ids for p in model.parameters() if p.requires_grad), trainable
    return model


def _autocast_dtype(name: str) -> torch.dtype | None:
    return None if name in ("no", "float32") else getattr(torch, name.replace("bf16", "bfloat16"))


def _prepare_data(model, tokenizer, train_data, validation_data, args: TrainingArguments, accelerator):
    """Conversations -> (self-distilled) -> encoded -> feature caches for training and validation."""
    output_dir = Path(args.output_dir)
    if isinstance(train_data, (FeatureCache, OnlineFeatures)):
        return train_data, validation_data
    conversations = load_conversations(train_data, args.max_examples, args.max_examples_per_source, args.seed)
    if validation_data is None and args.validation_size > 0:
        train_conversations, validation_conversations = split_validation(
            conversations, args.validation_size, args.seed
        )
    else:
        train_conversations = conversations
        validation_conversations = (
            None if validation_data is None else load_conversations(validation_data, seed=args.seed)
        )
    if args.self_distill:
        cache = Path(args.distill_cache or output_dir / "self_distilled.jsonl")
        if accelerator.is_main_process:
            base = copy.deepcopy(model.get_base_model()).to(getattr(torch, args.distill_dtype))
            settings = SelfDistillArguments(
                max_new_tokens=args.distill_max_new_tokens,
                batch_size=args.distill_batch_size,
                max_prompt_length=args.max_length - 1,
            )
            self_distill(base, tokenizer, train_conversations + (validation_conversations or []), cache, settings)
            del base
        accelerator.wait_for_everyone()
        answers = {c["id"]: c for c in load_conversations([cache], seed=args.seed)}
        train_conversations = [answers[c["id"]] for c in train_conversations if c["id"] in answers]
        if validation_conversations:
            validation_conversations = [answers[c["id"]] for c in validation_conversations if c["id"] in answers]
    caches = []
    feature_root = Path(args.feature_cache_dir or output_dir / "features")
    for name, split in (("train", train_conversations), ("validation", validation_conversations)):
        if not split:
            caches.append(None)
            continue
        sequences = encode_conversations(tokenizer, split, args.max_length)
        if args.online_features:
            caches.append(
                OnlineFeatures(
                    model,
                    sequences,
                    args.cached_layers,
                    shard_tokens=args.shard_tokens,
                    batch_tokens=args.extraction_batch_tokens,
                    autocast_dtype=_autocast_dtype(args.extraction_dtype),
                    with_last_states=args.needs_last_states,
                )
            )
            continue
        FeatureCache.build(
            model,
            sequences,
            feature_root / name,
            args.cached_layers,
            storage_dtype=args.feature_dtype,
            shard_tokens=args.shard_tokens,
            batch_tokens=args.extraction_batch_tokens,
            autocast_dtype=_autocast_dtype(args.extraction_dtype),
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            with_last_states=args.needs_last_states,
        )
        accelerator.wait_for_everyone()
        caches.append(FeatureCache.finalize(feature_root / name) if accelerator.is_main_process else None)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            caches[-1] = FeatureCache(feature_root / name)
    return caches[0], caches[1]


def train_adapter(
    model_or_base: nn.Module,
    train_data: Sequence[str | Path] | Iterable[dict[str, Any]] | FeatureCache | OnlineFeatures,
    args: TrainingArguments,
    tokenizer=None,
    validation_data: Sequence[str | Path] | Iterable[dict[str, Any]] | FeatureCache | OnlineFeatures | None = None,
) -> TrainResult:
    """Train the adapter of a Kangaroo model with its base frozen (see the module docstring for the recipe).

    Args:
        model_or_base: a `KangarooForCausalLM` (its adapter is trained further) or a LLaMA-family base (a fresh
            adapter is attached at `args.exit_layer`, or the saved one `args.init_adapter` names).
        train_data: JSONL paths, an iterable of `{"messages": [...]}` dicts (e.g. a `datasets.Dataset`), or a
            `FeatureCache` already built (or `OnlineFeatures`).
        args: the run's settings.
        tokenizer: the base's tokenizer (its chat template renders the conversations); not needed for a cache.
        validation_data: like `train_data`; default: `args.validation_size` conversations held out of `train_data`.

    Writes `<output_dir>/checkpoint-<step>/` (resumable) after every epoch and every `save_steps`, and the final
    adapter (`save_pretrained`, with `training_args.json` and `kangaroo_metrics.json`) to `output_dir`.

    Example:

    ```python
    >>> from kangaroo_hf import load_embedded_base
    >>> from kangaroo_hf.training import TrainingArguments, train_adapter
    >>> base, tokenizer = load_embedded_base()  # doctest: +SKIP
    >>> args = TrainingArguments(output_dir="runs/demo", exit_layer=2, self_distill=True, max_examples=2000)
    >>> result = train_adapter(base, ["data/train/gsm8k_train.jsonl"], args, tokenizer)  # doctest: +SKIP
    >>> result.metrics[-1]["validation"]["top1_agreement"]  # doctest: +SKIP
    ```
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # `args.mixed_precision` only sets the dtype of the loss's LM-head matmuls (the adapter itself is tiny), so the
    # process-wide accelerator state is left alone and train_adapter can run several times in one process.
    accelerator = Accelerator()
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None and not isinstance(train_data, (FeatureCache, OnlineFeatures)):
        raise ValueError("train_adapter needs the base's tokenizer to render conversations (or a FeatureCache).")
    model = prepare_model(model_or_base, args).to(accelerator.device)
    if args.targets == "tokens" and uses_final_context(model):
        raise ValueError("This model's adapter attends to the base's last-layer states: use targets='distribution'.")
    train_cache, validation_cache = _prepare_data(model, tokenizer, train_data, validation_data, args, accelerator)
    for name, cache in (("training", train_cache), ("validation", validation_cache)):
        if cache is not None and args.needs_last_states and not cache.has_last_states:
            raise ValueError(
                f"The {name} features hold no last-layer states, which targets='distribution' and the final-state "
                "context need: build them with with_last_states=True, or train with targets='tokens'."
            )
    if accelerator.is_main_process:
        (output_dir / "training_args.json").write_text(json.dumps(args.to_dict(), indent=2, sort_keys=True))
        logger.info(
            "Training the adapter at exit layer %d on %d sequences (%d tokens, %d loss tokens)",
            model.config.exit_layer,
            train_cache.num_sequences,
            train_cache.num_tokens,
            train_cache.num_target_tokens,
        )
    if args.draft_vocab_size and not model.config.draft_vocab_size:
        # The base's own answers decide which tokens the draft may propose; training then scores only those. An
        # adapter trained further keeps its own (`prepare_model`).
        model.set_draft_vocab(train_cache.frequent_answer_tokens(args.draft_vocab_size).to(accelerator.device))
    run = _Run(model, train_cache, validation_cache, args, accelerator)
    run.resume()
    run.train()
    if accelerator.is_main_process:
        model.save_pretrained(  # with the tokenizer when there is one: the folder is then ready to serve
            output_dir,
            metrics={"epochs": run.history},
            training_args={**args.to_dict(), **run.data_summary()},
            tokenizer=tokenizer,
        )
    accelerator.wait_for_everyone()
    return TrainResult(model, run.global_step, run.history, output_dir, run.losses)


class _Run:
    """The optimisation state of one `train_adapter` call: optimizer, schedule, step, metrics, checkpoints."""

    def __init__(self, model, train_cache: FeatureCache, validation_cache, args: TrainingArguments, accelerator):
        self.model, self.args, self.accelerator = model, args, accelerator
        self.train_cache, self.validation_cache = train_cache, validation_cache
        self.output_dir = Path(args.output_dir)
        module = _AdapterModule(model)
        decay = [p for p in module.parameters() if p.dim() > 1]
        no_decay = [p for p in module.parameters() if p.dim() <= 1]  # norms
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
        )
        # Only the module goes through `prepare` (DDP when distributed); the schedule is stepped once per update.
        self.module = accelerator.prepare(module)
        self.per_step = args.gradient_accumulation_steps * accelerator.num_processes
        self.steps_per_epoch = len(plan_epoch(train_cache, args.batch_tokens, args.seed, 0)) // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"Too little training data for one optimizer step ({self.per_step} micro-batches).")
        self.total_steps = args.max_steps or self.steps_per_epoch * args.num_epochs
        warmup = int(args.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_lambda(step, warmup, self.total_steps, args.lr_scheduler)
        )
        self.compute_dtype = _autocast_dtype(args.mixed_precision)
        self.final_context = uses_final_context(model)
        self.vocab_ids = draft_vocab_ids(model)
        self.global_step, self.history, self.losses = 0, [], []

    def data_summary(self) -> dict[str, int]:
        cache = self.train_cache
        return {
            "train_sequences": cache.num_sequences,
            "train_tokens": cache.num_tokens,
            "train_loss_tokens": cache.num_target_tokens,
        }

    def resume(self) -> None:
        if not self.args.resume_from_checkpoint:
            return
        checkpoint = find_checkpoint(self.output_dir, self.args.resume_from_checkpoint)
        if checkpoint is None:
            logger.info("No checkpoint in %s: starting from scratch", self.output_dir)
            return
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        self.model.load_adapter_state_dict(load_file(checkpoint / "adapter_weights.safetensors"))
        load_tensors_and_state(self.optimizer, self.scheduler, checkpoint)
        self.global_step, self.history, self.losses = state["global_step"], state["metrics"], state["train_loss"]
        logger.info("Resumed from %s at step %d", checkpoint, self.global_step)

    def train(self) -> None:
        args, accelerator = self.args, self.accelerator
        progress = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            desc="train adapter",
            mininterval=10,
            disable=not accelerator.is_main_process,
        )
        window, started = DistillStats(), time.perf_counter()
        while self.global_step < self.total_steps:
            epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
            plan = plan_epoch(self.train_cache, args.batch_tokens, args.seed, epoch)
            plan = plan[step_in_epoch * self.per_step : self.steps_per_epoch * self.per_step]
            plan = plan[accelerator.process_index :: accelerator.num_processes]
            group = []
            for sequences in iter_planned(self.train_cache, plan, self.model.config.exit_layer):
                group.append(
                    make_batch(sequences, accelerator.device, self.final_context, all_tokens=args.loss_on == "all")
                )
                if len(group) < args.gradient_accumulation_steps:
                    continue
                self._update(group, window)
                group = []
                self.global_step += 1
                progress.update(1)
                if self.global_step % args.logging_steps == 0 or self.global_step == self.total_steps:
                    self._log(window, time.perf_counter() - started, epoch)
                    window, started = DistillStats(), time.perf_counter()
                self._end_of_step(epoch)
                if self.global_step >= self.total_steps:
                    break
        progress.close()

    def _update(self, group: list, stats: DistillStats) -> None:
        """One optimizer step over `group` micro-batches; the loss is the mean over all their loss tokens."""
        args, accelerator = self.args, self.accelerator
        group_tokens = max(1, sum(batch.num_loss_tokens for batch in group))
        for index, batch in enumerate(group):
            last = index == len(group) - 1
            with contextlib.ExitStack() as stack:
                if not last:
                    stack.enter_context(accelerator.no_sync(self.module))
                with torch.autocast(
                    batch.exit_states.device.type, dtype=self.compute_dtype, enabled=args.autocast_adapter
                ):
                    hidden = draft_states(self.model, batch, self.module, self._draft_depth(batch, index))  # (B, T, D)
                selected = hidden[batch.loss_mask]  # (N, D)
                grad = distill_loss_chunks(
                    self.model.parts.lm_head,
                    selected,
                    batch.teacher_states if args.targets == "distribution" else None,
                    args.loss_chunk_tokens,
                    stats,
                    loss_scale=1.0 / group_tokens,
                    compute_dtype=self.compute_dtype,
                    vocab_ids=self.vocab_ids,
                    full_teacher=False,
                    target_ids=batch.target_ids,
                )
                # The LM-head chunks already gave d(loss)/d(selected): one backward pass through the adapter.
                accelerator.backward((selected * grad).sum())
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.module.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _draft_depth(self, batch, index: int) -> torch.Tensor | int:
        """adapter_context="final": each position plays a random draft depth in [0, max_draft_tokens) (seeded)."""
        if not self.final_context:
            return 0
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.global_step * 1009 + index)
        width = batch.exit_states.shape[1]
        depth = torch.randint(0, self.model.config.max_draft_tokens, (width,), generator=generator)
        return depth.to(batch.exit_states.device)

    def _log(self, window: DistillStats, seconds: float, epoch: int) -> None:
        summary = window.summary()
        self.losses.append(summary["loss"])
        logger.info(
            "step %d/%d (epoch %d): loss %.4f, top-1 agreement %.3f, expected acceptance %.3f, lr %.2e, %.0f tokens/s",
            self.global_step,
            self.total_steps,
            epoch + 1,
            summary["loss"],
            summary["top1_agreement"],
            summary["expected_acceptance"],
            self.scheduler.get_last_lr()[0],
            summary["tokens"] / max(seconds, 1e-9),
        )

    def _end_of_step(self, epoch: int) -> None:
        """Validate after every epoch (and at the end); checkpoint then and every `save_steps`."""
        step, args = self.global_step, self.args
        finished = step == self.total_steps
        end_of_epoch = step % self.steps_per_epoch == 0 or finished
        if end_of_epoch:
            entry: dict[str, Any] = {"epoch": epoch + 1, "step": step}
            if self.validation_cache is not None and self.accelerator.is_main_process:
                entry["validation"] = evaluate_adapter(
                    self.model,
                    self.validation_cache,
                    args.batch_tokens,
                    args.loss_chunk_tokens,
                    args.eval_thresholds,
                    self.compute_dtype,
                )
                logger.info("validation after epoch %d: %s", epoch + 1, json.dumps(entry["validation"]))
            self.history.append(entry)
        if end_of_epoch or (args.save_steps and step % args.save_steps == 0):
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        """`checkpoint-<step>/`: adapter and optimizer tensors (safetensors), schedule and progress (json)."""
        if self.accelerator.is_main_process:
            folder = self.output_dir / f"checkpoint-{self.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            weights = {k: v.detach().cpu().contiguous() for k, v in self.model.adapter_state_dict().items()}
            save_safetensors(weights, folder / "adapter_weights.safetensors")
            save_tensors_and_state(self.optimizer, self.scheduler, folder)
            (folder / "kangaroo_metrics.json").write_text(json.dumps({"epochs": self.history}, indent=2))
            state = {"global_step": self.global_step, "metrics": self.history, "train_loss": self.losses}
            # Written last: a checkpoint without it is incomplete and never resumed from.
            (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))
        self.accelerator.wait_for_everyone()


__all__ = ["TrainResult", "TrainingArguments", "prepare_model", "train_adapter"]
