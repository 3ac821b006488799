"""On-disk cache of the base's hidden states for adapter training: extracted once, read shard by shard.

The adapter only ever sees the base's exit-layer states, and its target is the base's own next-token distribution, so
one forward of the frozen base per training sequence is enough for every epoch (and for every exit layer cached).
Each shard is a safetensors file holding, for the sequences assigned to it, concatenated along the token axis:

- `input_ids` (N,) int32 and `assistant_mask` (N,) uint8 (see `EncodedConversation`);
- `hidden.{l}` (N, D): the residual stream after the first `l` decoder layers (the Kangaroo exit states for
  `exit_layer = l`), one entry per cached layer;
- `last` (N, D): the final hidden states *after* the base's final norm, i.e. the LM head's input. The teacher
  distribution is `softmax(lm_head(last))`. The post-norm states are cached because they are bounded (|x| < ~100 for
  SmolLM2) while the pre-norm residual stream reaches ~1e4, too close to float16's range. Absent when built with
  `with_last_states=False` (token targets need no teacher distribution: the base then runs only to the deepest
  cached layer, a few layers instead of all);
- `offsets` (S + 1,) int64: sequence `i` is tokens `offsets[i]:offsets[i + 1]`.

`index.json` lists the shards with per-sequence lengths and loss-token counts, so batches are planned without
reading any tensor; it is written last, so an interrupted extraction is resumed shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..core.checkpoint import save_safetensors
from .data import EncodedConversation

logger = logging.getLogger(__name__)

FORMAT = "kangaroo_hf.features/1"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CachedSequence:
    """One cached sequence: ids (T,), assistant mask (T,), exit states (T, D), post-norm last states (T, D) or None
    when the cache holds none (`with_last_states=False`)."""

    input_ids: torch.Tensor
    assistant_mask: torch.Tensor
    exit_states: torch.Tensor
    last_states: torch.Tensor | None


def _fingerprint(
    model, sequences: Sequence[EncodedConversation], layers: list[int], storage_dtype: str, with_last_states: bool
) -> str:
    digest = hashlib.sha256()
    config = model.parts.config
    described = [
        config.name_or_path,
        config.num_hidden_layers,
        config.hidden_size,
        layers,
        storage_dtype,
    ]
    if not with_last_states:  # (caches with last states keep the fingerprint they always had)
        described.append("no-last-states")
    digest.update(json.dumps(described).encode())
    for sequence in sequences:
        digest.update(torch.tensor(sequence.input_ids, dtype=torch.int32).numpy().tobytes())
        digest.update(bytes(sequence.assistant_mask))
    return digest.hexdigest()[:24]


def _plan_shards(sequences: Sequence[EncodedConversation], shard_tokens: int) -> list[list[int]]:
    shards, current, tokens = [], [], 0
    for index, sequence in enumerate(sequences):
        if current and tokens + len(sequence.input_ids) > shard_tokens:
            shards.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += len(sequence.input_ids)
    if current:
        shards.append(current)
    return shards


def _length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into padded batches of at most `batch_tokens` (B * longest), shortest sequences first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _checked_layers(model, layers: Sequence[int], what: str) -> list[int]:
    """`layers` sorted and deduplicated; `ValueError` unless each is a valid exit layer of `model`'s base."""
    layers = sorted(set(int(layer) for layer in layers))
    num_layers = model.parts.num_layers
    if not layers or layers[0] < 1 or layers[-1] >= num_layers:
        raise ValueError(f"{what} layers must lie in [1, {num_layers - 1}], got {layers}.")
    return layers


def _shard_entry(sequences: Sequence[EncodedConversation], members: list[int]) -> dict[str, list]:
    """What the index records of one shard: per-sequence lengths, loss-token counts and ids."""
    return {
        "lengths": [len(sequences[j].input_ids) for j in members],
        "targets": [sum(sequences[j].assistant_mask[1:]) for j in members],
        "ids": [sequences[j].id for j in members],
    }


def _most_frequent(id_groups: Iterable[torch.Tensor], count: int) -> torch.LongTensor:
    """The `count` most frequent ids over all groups (ties broken by id), returned sorted."""
    counts: dict[int, int] = {}
    for ids in id_groups:
        for token, n in zip(*torch.unique(ids, return_counts=True), strict=True):
            counts[int(token)] = counts.get(int(token), 0) + int(n)
    ranked = sorted(counts, key=lambda token: (-counts[token], token))
    return torch.tensor(sorted(ranked[:count]), dtype=torch.long)


def _extract_in_batches(
    model,
    members: Sequence[EncodedConversation],
    layers: list[int],
    batch_tokens: int,
    autocast_dtype: torch.dtype | None,
    with_last_states: bool = True,
) -> Iterator[tuple[list[int], dict[str, list[torch.Tensor]]]]:
    """(indices into `members`, their states as `_extract_batch` returns them), one length-sorted batch at a time."""
    device_type = model.parts.lm_head.weight.device.type
    for batch in _length_batches([len(s.input_ids) for s in members], batch_tokens):
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = _extract_batch(model, [members[i] for i in batch], layers, with_last_states)
        yield batch, out  # outside the autocast region: the caller's code runs in its own precision


@torch.no_grad()
def _extract_batch(
    model, sequences: list[EncodedConversation], layers: list[int], with_last_states: bool = True
) -> dict[str, list[torch.Tensor]]:
    """Hidden states after each of `layers` and (`with_last_states`) the post-norm final states, for right-padded
    `sequences`; without them the base runs only up to the deepest of `layers`."""
    parts = model.parts
    device = parts.lm_head.weight.device
    width = max(len(s.input_ids) for s in sequences)
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence.input_ids)] = torch.tensor(sequence.input_ids)
        attention_mask[row, : len(sequence.input_ids)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = torch.arange(width, device=device).unsqueeze(0).expand(len(sequences), -1)  # (B, T)
    hidden = parts.embed_tokens(input_ids)  # (B, T, D)
    outputs: dict[str, torch.Tensor] = {}
    start = 0
    for layer in [*layers, parts.num_layers] if with_last_states else layers:
        hidden = parts.run_layers(hidden, start, layer, position_ids, attention_mask, cache=None)
        outputs[f"hidden.{layer}" if layer in layers else "last"] = hidden
        start = layer
    if with_last_states:
        outputs["last"] = parts.norm(outputs["last"])
    return {
        name: [tensor[row, : len(s.input_ids)] for row, s in enumerate(sequences)] for name, tensor in outputs.items()
    }


class FeatureCache:
    """A folder of feature shards (see the module docstring). Open an existing one with `FeatureCache(folder)`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: build the cache with FeatureCache.build first.")
        self.index: dict[str, Any] = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path} has format {self.index.get('format')!r}, expected {FORMAT!r}.")

    @property
    def layers(self) -> list[int]:
        return list(self.index["layers"])

    @property
    def has_last_states(self) -> bool:
        """Whether the base's final states (the teacher distribution's input) are cached."""
        return self.index.get("last_states") is not None

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.index["shards"]

    @property
    def num_sequences(self) -> int:
        return sum(len(shard["lengths"]) for shard in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(sum(shard["lengths"]) for shard in self.shards)

    @property
    def num_target_tokens(self) -> int:
        """Positions with a loss (those predicting an assistant token)."""
        return sum(sum(shard["targets"]) for shard in self.shards)

    def frequent_answer_tokens(self, count: int) -> torch.LongTensor:
        """The `count` most frequent assistant tokens (ids, sorted), read without loading any hidden state."""

        def answer_ids(shard: dict[str, Any]) -> torch.Tensor:
            with safe_open(self.folder / shard["file"], framework="pt") as handle:
                return handle.get_tensor("input_ids").long()[handle.get_tensor("assistant_mask").bool()]

        return _most_frequent((answer_ids(shard) for shard in self.shards), count)

    def load_shard(self, shard_index: int, exit_layer: int) -> list[CachedSequence]:
        """All sequences of one shard (the only tensors held in memory at a time)."""
        if exit_layer not in self.layers:
            raise ValueError(f"exit_layer={exit_layer} is not cached in {self.folder} (layers {self.layers}).")
        tensors = load_file(self.folder / self.shards[shard_index]["file"])
        offsets = tensors["offsets"].tolist()
        hidden = tensors[f"hidden.{exit_layer}"]
        return [
            CachedSequence(
                input_ids=tensors["input_ids"][start:end].long(),
                assistant_mask=tensors["assistant_mask"][start:end].bool(),
                exit_states=hidden[start:end],
                last_states=tensors["last"][start:end] if "last" in tensors else None,
            )
            for start, end in zip(offsets[:-1], offsets[1:], strict=True)
        ]

    @classmethod
    def build(
        cls,
        model,
        sequences: Sequence[EncodedConversation],
        folder: str | Path,
        layers: Sequence[int],
        storage_dtype: str = "float16",
        shard_tokens: int = 262_144,
        batch_tokens: int = 8192,
        autocast_dtype: torch.dtype | None = None,
        process_index: int = 0,
        num_processes: int = 1,
        with_last_states: bool = True,
    ) -> FeatureCache:
        """Run the frozen base over `sequences` and write the cache (or reuse a complete one built from the same data).

        Args:
            model: a `KangarooForCausalLM` (only its base's layers, norm and device are used).
            layers: exit layers to cache (e.g. `[2, 4, 6]` to compare exit layers without re-extracting).
            storage_dtype: `float16` (default) or `bfloat16` / `float32`.
            shard_tokens: tokens per shard file; a shard is the unit of reading and of resumption.
            batch_tokens: padded tokens per forward during extraction.
            autocast_dtype: run the base under autocast (e.g. `torch.bfloat16`, about 2x faster on recent CPUs).
            process_index, num_processes: with several processes, each extracts every `num_processes`-th shard;
                call `build` in every process, then `FeatureCache(folder)` once all are done.
            with_last_states: also cache the base's post-norm final states (needed by distribution targets and by
                `adapter_context="final"`); without them only the layers up to the deepest cached one run.
        """
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}.")
        layers = _checked_layers(model, layers, "Cached")
        folder = Path(folder)
        fingerprint = _fingerprint(model, sequences, layers, storage_dtype, with_last_states)
        if (folder / "index.json").is_file():
            cache = cls(folder)
            if cache.index.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{folder} holds features of other data or settings (fingerprint {cache.index.get('fingerprint')} "
                    f"vs {fingerprint}); choose another feature_cache_dir or delete it."
                )
            logger.info("Reusing feature cache %s (%d tokens)", folder, cache.num_tokens)
            return cache
        folder.mkdir(parents=True, exist_ok=True)
        plan = _plan_shards(sequences, shard_tokens)
        mine = [i for i in range(len(plan)) if i % num_processes == process_index]
        dtype = STORAGE_DTYPES[storage_dtype]
        total = sum(len(sequences[j].input_ids) for i in mine for j in plan[i])
        with tqdm(total=total, desc="extract features", unit="tok", unit_scale=True, mininterval=10) as progress:
            for shard_index in mine:
                path = folder / f"shard-{shard_index:05d}-{fingerprint}.safetensors"
                members = [sequences[j] for j in plan[shard_index]]
                if path.is_file():  # written by an interrupted run of the same plan
                    progress.update(sum(len(s.input_ids) for s in members))
                    continue
                collected: dict[str, list] = {}
                slots = [None] * len(members)
                batches = _extract_in_batches(model, members, layers, batch_tokens, autocast_dtype, with_last_states)
                for batch, out in batches:
                    for row, i in enumerate(batch):
                        slots[i] = {name: values[row].to("cpu", dtype) for name, values in out.items()}
                    progress.update(sum(len(members[i].input_ids) for i in batch))
                for name in slots[0]:
                    collected[name] = torch.cat([slot[name] for slot in slots])
                for name, tensor in collected.items():
                    if not torch.isfinite(tensor).all():
                        raise ValueError(f"{name} overflows {storage_dtype}; use storage_dtype='bfloat16'.")
                lengths = [len(s.input_ids) for s in members]
                collected["offsets"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
                collected["input_ids"] = torch.tensor([t for s in members for t in s.input_ids], dtype=torch.int32)
                collected["assistant_mask"] = torch.tensor(
                    [m for s in members for m in s.assistant_mask], dtype=torch.uint8
                )
                partial = path.with_suffix(".partial")
                save_safetensors({k: v.contiguous() for k, v in collected.items()}, partial)
                partial.rename(path)
        if process_index == 0:
            shards = []
            for shard_index, members in enumerate(plan):
                shards.append(
                    {"file": f"shard-{shard_index:05d}-{fingerprint}.safetensors", **_shard_entry(sequences, members)}
                )
            index = {
                "format": FORMAT,
                "fingerprint": fingerprint,
                "base": model.parts.config.name_or_path or None,
                "layers": layers,
                "storage_dtype": storage_dtype,
                "hidden_size": model.parts.config.hidden_size,
                "last_states": "post-norm (LM head input)" if with_last_states else None,
                "shards": shards,
            }
            if num_processes == 1:
                (folder / "index.json").write_text(json.dumps(index))
            else:
                (folder / "index.pending.json").write_text(json.dumps(index))
        return cls(folder) if num_processes == 1 else None

    @staticmethod
    def finalize(folder: str | Path) -> FeatureCache:
        """After a multi-process `build`: publish the index once every process has written its shards."""
        folder = Path(folder)
        pending = folder / "index.pending.json"
        if pending.is_file():
            index = json.loads(pending.read_text())
            missing = [s["file"] for s in index["shards"] if not (folder / s["file"]).is_file()]
            if missing:
                raise FileNotFoundError(f"Feature shards missing in {folder}: {missing[:5]}")
            pending.rename(folder / "index.json")
        return FeatureCache(folder)


class OnlineFeatures:
    """A drop-in for `FeatureCache` that computes the base's states when a shard is read, never storing them.

    Each epoch then runs the frozen base once more over the data, which costs less than reading a disk cache where
    the base is cheap next to the hardware (a small base on a GPU). Shards (`shard_tokens` each) keep the cache's
    batching and shuffling; a loaded shard's states live on the base's device until the next shard is read.
    """

    def __init__(
        self,
        model,
        sequences: Sequence[EncodedConversation],
        layers: Sequence[int],
        shard_tokens: int = 262_144,
        batch_tokens: int = 8192,
        autocast_dtype: torch.dtype | None = None,
        with_last_states: bool = True,
    ) -> None:
        layers = _checked_layers(model, layers, "Feature")
        if not sequences:
            raise ValueError("OnlineFeatures needs at least one sequence.")
        self.model, self.sequences = model, sequences
        self.batch_tokens, self.autocast_dtype = batch_tokens, autocast_dtype
        self.plan = _plan_shards(sequences, shard_tokens)
        self.index = {
            "layers": layers,
            "last_states": "post-norm (LM head input)" if with_last_states else None,
            "shards": [_shard_entry(sequences, members) for members in self.plan],
        }

    layers = FeatureCache.layers
    has_last_states = FeatureCache.has_last_states
    shards = FeatureCache.shards
    num_sequences = FeatureCache.num_sequences
    num_tokens = FeatureCache.num_tokens
    num_target_tokens = FeatureCache.num_target_tokens

    def frequent_answer_tokens(self, count: int) -> torch.LongTensor:
        """The `count` most frequent assistant tokens (ids, sorted)."""
        answer_ids = (
            torch.tensor(s.input_ids)[torch.tensor(s.assistant_mask, dtype=torch.bool)] for s in self.sequences
        )
        return _most_frequent(answer_ids, count)

    def load_shard(self, shard_index: int, exit_layer: int) -> list[CachedSequence]:
        """The shard's sequences with freshly computed states (on the base's device, float32)."""
        if exit_layer not in self.layers:
            raise ValueError(f"exit_layer={exit_layer} is not among the online feature layers {self.layers}.")
        members = [self.sequences[j] for j in self.plan[shard_index]]
        loaded: list[CachedSequence | None] = [None] * len(members)
        batches = _extract_in_batches(
            self.model, members, [exit_layer], self.batch_tokens, self.autocast_dtype, self.has_last_states
        )
        for batch, out in batches:
            for row, i in enumerate(batch):
                loaded[i] = CachedSequence(
                    input_ids=torch.tensor(members[i].input_ids),
                    assistant_mask=torch.tensor(members[i].assistant_mask, dtype=torch.bool),
                    exit_states=out[f"hidden.{exit_layer}"][row].float(),
                    last_states=out["last"][row].float() if "last" in out else None,
                )
        return loaded


__all__ = ["CachedSequence", "FeatureCache", "OnlineFeatures"]
