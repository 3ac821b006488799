"""Conversation data for adapter training: JSONL loading and mixing, chat rendering with an assistant-token mask, and
self-distillation (the base's own greedy answers in place of the dataset's assistant turns).

A conversation is a dict with a `messages` list of `{"role": "user" | "assistant" | "system", "content": str}`, the
format of `data/train/*.jsonl` and of chat datasets on the Hub (a `datasets.Dataset` is accepted as any iterable of
such dicts). An assistant message may carry `"truncated": true` (written by self-distillation when an answer hit
`max_new_tokens`): its end-of-turn token is then left out of the loss, since the base never emitted it.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Used for tokenizers without a chat template (e.g. a base model's): one "role: content" line per message.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


@dataclass
class EncodedConversation:
    """One rendered and tokenized conversation.

    `assistant_mask[i]` is 1 when token `i` belongs to an assistant turn (its content and end-of-turn token). The
    training loss at position `t` (which predicts token `t + 1`) is therefore masked with `assistant_mask[t + 1]`.
    """

    input_ids: list[int]
    assistant_mask: list[int]
    id: str | None = None

    @property
    def num_assistant_tokens(self) -> int:
        return sum(self.assistant_mask)


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSON Lines file, one per non-empty line; a bad line raises `ValueError` with its number."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {error}") from error


def validate_conversation(example: dict[str, Any], where: str = "conversation") -> list[dict[str, Any]]:
    """The `messages` of `example`, checked: known roles, string contents, and at least one assistant turn."""
    messages = example.get("messages") if isinstance(example, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} needs a non-empty `messages` list, got {type(messages).__name__}.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{where}: message {index} must have a role in {ROLES}, got {message!r:.200}.")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {index} has non-string content {message.get('content')!r:.200}.")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{where} starts with an assistant turn; it must start with a user (or system) turn.")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where} has no assistant turn to train on.")
    return messages


def load_conversations(
    sources: Sequence[str | Path] | Iterable[dict[str, Any]],
    max_examples: int | None = None,
    max_examples_per_source: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Read and mix conversations: JSONL paths (each capped at `max_examples_per_source`), or an iterable of dicts.

    The mix is shuffled with `seed` before `max_examples` are kept, so a cap keeps every source represented.
    """
    rng = random.Random(seed)
    conversations: list[dict[str, Any]] = []
    is_paths = isinstance(sources, (list, tuple)) and all(isinstance(s, (str, Path)) for s in sources)
    groups = [(str(s), list(read_jsonl(s))) for s in sources] if is_paths else [("data", list(sources))]
    for name, examples in groups:
        if max_examples_per_source is not None and len(examples) > max_examples_per_source:
            examples = rng.sample(examples, max_examples_per_source)
        for index, example in enumerate(examples):
            validate_conversation(example, where=f"{name} example {index}")
        # Ids tie self-distilled answers back to their prompts; sources without them get positional ones.
        conversations.extend(
            {**example, "id": example.get("id") or f"{Path(name).stem}-{index:06d}"}
            for index, example in enumerate(examples)
        )
        logger.info("Read %d conversations from %s", len(examples), name)
    rng.shuffle(conversations)
    if max_examples is not None:
        conversations = conversations[:max_examples]
    return conversations


def split_validation(
    conversations: list[dict[str, Any]], validation_size: int | float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation): a seeded random split; `validation_size` is a count, or a fraction when below 1."""
    count = int(round(validation_size * len(conversations))) if validation_size < 1 else int(validation_size)
    if not 0 <= count < len(conversations):
        raise ValueError(f"validation_size={validation_size} leaves no training data ({len(conversations)} examples).")
    order = list(range(len(conversations)))
    random.Random(seed + 1).shuffle(order)
    held_out = set(order[:count])
    train = [c for i, c in enumerate(conversations) if i not in held_out]
    return train, [conversations[i] for i in sorted(held_out)]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
    )


def assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> tuple[str, list]:
    """The rendered conversation and the `(start, end)` character span of every assistant turn in it.

    Chat templates rarely mark assistant text (generation tags), so each span is found by rendering prefixes: the turn
    starts where `messages[:k]` + generation prompt ends and stops where `messages[: k + 1]` ends, trailing whitespace
    excluded (the base stops at its end-of-turn token and never emits what the template writes after it).
    """
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:k], generation_prompt=True)
        upto = _render(tokenizer, messages[: k + 1], generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(prefix)):
            raise ValueError(
                "The chat template does not render conversations prefix by prefix (needed to find assistant tokens); "
                f"turn {k} renders as {upto[len(prefix) :]!r:.120} after a prefix the full text does not start with."
            )
        content_end = len(prefix) + len(message["content"])
        if message.get("truncated") and upto[len(prefix) : content_end] == message["content"]:
            end = content_end  # the answer was cut: its end-of-turn token is not the base's
        else:
            end = len(upto.rstrip())
        spans.append((len(prefix), end))
    return text, spans


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    max_length: int | None = None,
    id: str | None = None,
) -> EncodedConversation:
    """Render `messages` with the tokenizer's chat template, tokenize, mark assistant tokens, keep `max_length` tokens.

    Example:

    ```python
    >>> encoded = encode_conversation(tokenizer, [{"role": "user", "content": "Hi"},
    ...                                           {"role": "assistant", "content": "Hello!"}])  # doctest: +SKIP
    >>> encoded.assistant_mask  # 1 on "Hello", "!" and the end-of-turn token  # doctest: +SKIP
    ```
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    mask = [0] * len(input_ids)
    for i, (start, end) in enumerate(encoding["offset_mapping"]):
        if end > start and any(start < span_end and end > span_start for span_start, span_end in spans):
            mask[i] = 1
    if max_length is not None:
        input_ids, mask = input_ids[:max_length], mask[:max_length]
    return EncodedConversation(input_ids=input_ids, assistant_mask=mask, id=id)


def encode_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[dict[str, Any]],
    max_length: int | None = None,
    min_assistant_tokens: int = 1,
) -> list[EncodedConversation]:
    """`encode_conversation` over many; drops (and counts) those with no assistant token left after truncation."""
    encoded, dropped = [], 0
    for index, conversation in enumerate(conversations):
        messages = validate_conversation(conversation, where=f"example {index}")
        item = encode_conversation(tokenizer, messages, max_length, id=conversation.get("id"))
        # Token 0 is never a loss target (nothing predicts it), so count targets from token 1 on.
        if sum(item.assistant_mask[1:]) < min_assistant_tokens:
            dropped += 1
            continue
        encoded.append(item)
    if dropped:
        logger.info("Dropped %d conversations with no assistant tokens within max_length=%s", dropped, max_length)
    return encoded


# -- self-distillation ----------------------------------------------------------------------------------------------


@dataclass
class SelfDistillArguments:
    """How the base answers the training prompts itself."""

    max_new_tokens: int = 256  # answers are cut here (and marked `truncated`)
    batch_size: int = 16  # prompts generated together (left padding)
    batch_tokens: int = (
        12288  # and at most this many cached tokens (prompt + answer) per batch: long prompts go in small batches
    )
    max_prompt_length: int = 1536  # longer prompts are skipped (their conversation ends at the previous turn)
    chunk_size: int = 256  # conversations written to the cache together; the unit of resumption


def _generate_batch(
    base: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], max_new_tokens: int
) -> list[tuple[str, bool]]:
    """Greedy answers of the base to tokenized `prompts` (left padded); (text, finished with end-of-turn) each."""
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    device = next(base.parameters()).device
    output = base.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        # A static cache avoids re-concatenating every layer's KV at each step: ~1.5x faster batched decoding on CPU.
        cache_implementation="static",
        # generate() would torch.compile the forward for a static cache on GPUs, recompiling for every batch shape
        # (each batch of prompts has another width): minutes of compilation for seconds of decoding.
        disable_compile=True,
    )
    eos = base.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    answers = []
    for row in output[:, width:].tolist():
        end = next((i for i, token in enumerate(row) if token in eos_ids), None)
        tokens = row if end is None else row[:end]
        answers.append((tokenizer.decode(tokens, skip_special_tokens=True), end is not None))
    return answers


def _token_batches(pending: list, args: SelfDistillArguments) -> Iterator[list]:
    """Consecutive (length-sorted) prompts, at most `batch_size` and `batch_tokens` (prompt + answer) per batch."""
    batch: list = []
    for item in pending:
        width = len(item[1]) + args.max_new_tokens
        if batch and (len(batch) == args.batch_size or (len(batch) + 1) * width > args.batch_tokens):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _distill_chunk(base, tokenizer, chunk: list[dict[str, Any]], args: SelfDistillArguments, progress) -> list[dict]:
    """Replace every assistant turn of `chunk`, turn index by turn index, batching prompts of similar length."""
    states = [{"source": c, "messages": [], "next": 0, "open": True} for c in chunk]
    while True:
        pending = []
        for state in states:
            messages = state["source"]["messages"]
            if not state["open"]:
                continue
            # Copy user/system turns up to the next assistant turn.
            i = state["next"]
            while i < len(messages) and messages[i]["role"] != "assistant":
                state["messages"].append(dict(messages[i]))
                i += 1
            if i == len(messages):
                state["open"] = False
                continue
            prompt = tokenizer(_render(tokenizer, state["messages"], True), add_special_tokens=False)["input_ids"]
            if len(prompt) > args.max_prompt_length:
                state["open"] = False
                continue
            state["next"] = i + 1
            pending.append((state, prompt))
        if not pending:
            break
        pending.sort(key=lambda item: len(item[1]))
        for batch in _token_batches(pending, args):
            answers = _generate_batch(base, tokenizer, [prompt for _, prompt in batch], args.max_new_tokens)
            for (state, _), (text, finished) in zip(batch, answers, strict=True):
                message = {"role": "assistant", "content": text}
                if not finished:
                    message["truncated"] = True
                    state["open"] = False  # a cut answer ends the conversation: later turns would not follow it
                state["messages"].append(message)
            progress.update(len(batch))
    results = []
    for state in states:
        messages = state["messages"]
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if any(m["role"] == "assistant" for m in messages):
            results.append({**{k: v for k, v in state["source"].items() if k != "messages"}, "messages": messages})
    return results


@torch.no_grad()
def self_distill(
    base: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[dict[str, Any]],
    output_path: str | Path,
    args: SelfDistillArguments | None = None,
) -> list[dict[str, Any]]:
    """Write `conversations` with every assistant turn replaced by the base's greedy answer to a JSONL cache.

    Drafts are verified against the base's own outputs, so these are the texts the adapter should learn to predict.
    Resumable: conversations whose `id` is already in `output_path` are skipped. Returns all cached conversations.
    """
    args = args or SelfDistillArguments()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    done = {c.get("id") for c in read_jsonl(output_path)} if output_path.exists() else set()
    todo = [c for c in conversations if c.get("id") is None or c.get("id") not in done]
    logger.info("Self-distilling %d conversations (%d already in %s)", len(todo), len(done), output_path)
    total_turns = sum(sum(m["role"] == "assistant" for m in c["messages"]) for c in todo)
    was_training = base.training
    base.eval()
    try:
        with tqdm(total=total_turns, desc="self-distill", unit="answer", mininterval=10) as progress:
            for start in range(0, len(todo), args.chunk_size):
                results = _distill_chunk(base, tokenizer, todo[start : start + args.chunk_size], args, progress)
                with open(output_path, "a", encoding="utf-8") as handle:
                    for result in results:
                        handle.write(json.dumps(result, ensure_ascii=False) + "\n")
    finally:
        base.train(was_training)
    return list(read_jsonl(output_path))


__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "EncodedConversation",
    "SelfDistillArguments",
    "assistant_char_spans",
    "encode_conversation",
    "encode_conversations",
    "load_conversations",
    "read_jsonl",
    "self_distill",
    "split_validation",
    "validate_conversation",
]
