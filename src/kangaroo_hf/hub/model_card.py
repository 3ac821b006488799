"""Model cards for Kangaroo checkpoints, rendered from `hub_cards/kangaroo_card.md`.

Everything on the card is read from the checkpoint folder: `config.json` (base, exit layer, draft settings), the
adapter file (parameter count, size, dtype) and, when present, `kangaroo_metrics.json` (measured speed-up, accepted
tokens, ...) and `training_args.json` (data, steps, ...). Training and benchmark code write those two JSON files, or
pass `metrics=` / `training_args=` to `save_pretrained`; `write_model_card(folder)` re-renders after they change.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from pathlib import Path
from typing import Any

from ..core.checkpoint import (
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    TRAINING_ARGS_NAME,
    decode_adapter_weights,
    read_adapter_file,
)

TEMPLATE_DIR = Path(__file__).parents[1] / "hub_cards"
TEMPLATE_NAME = "kangaroo_card.md"
CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_template(name: str = TEMPLATE_NAME) -> string.Template:
    """A card template shipped in the package (`kangaroo_hf/hub_cards/`)."""
    return string.Template((TEMPLATE_DIR / name).read_text(encoding="utf-8"))


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and _REPO_ID.match(name) is not None and not os.path.exists(name)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(item) for item in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            value, key = value[-1], f"{key}[-1]"  # a history (e.g. per-epoch metrics): the latest entry
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _table(values: dict[str, Any], header: tuple[str, str]) -> str:
    rows = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    rows += [f"| {key} | {_format_value(value)} |" for key, value in _flatten(values).items()]
    return "\n".join(rows)


# What a Hub visitor needs of the training recipe; `training_args.json` keeps every argument.
RECIPE_KEYS = (
    "data",
    "hardware",
    "exit_layer",
    "adapter_num_layers",
    "adapter_context",
    "adapter_mlp",
    "draft_vocab_size",
    "targets",
    "loss_on",
    "num_epochs",
    "epochs_completed",
    "steps",
    "max_steps",
    "learning_rate",
    "train_sequences",
    "train_tokens",
)


def _recipe(training_args: dict[str, Any]) -> str:
    """A short table of the recipe (the keys of `RECIPE_KEYS` it has) and a pointer to the full arguments."""
    rows = {key: training_args[key] for key in RECIPE_KEYS if key in training_args}
    if isinstance(training_args.get("initial_adapter"), dict):
        rows["initial_adapter"] = "trained further from an earlier adapter (its recipe is in training_args.json)"
    table = _table(rows, ("setting", "value")) if rows else ""
    return f"{table}\n\nEvery training argument is recorded in `{TRAINING_ARGS_NAME}`.".lstrip()


def _measured(metrics: dict[str, Any]) -> str:
    """The overall measurements; per-category breakdowns stay in the metrics file."""
    flat = _flatten(metrics)
    overall = {key: value for key, value in flat.items() if "by_category" not in key}
    table = _table(overall, ("metric", "value")) if overall else ""
    if len(overall) < len(flat):
        table += f"\n\nPer-category results are in `{METRICS_NAME}`."
    return table.lstrip()


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    values = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}.")
    return values


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def adapter_size(folder: str | os.PathLike) -> tuple[int, int, str]:
    """Parameter count, file size in bytes and dtype(s) of the adapter weights in a checkpoint folder.

    Parameters are the floating tensors once decoded (an int8 checkpoint's matrices count, their row scales do not);
    integer buffers (token ids) count towards the size only. The dtypes are those stored.
    """
    path = Path(folder) / ADAPTER_WEIGHTS_NAME
    stored, metadata = read_adapter_file(folder)  # names a missing, pickled or damaged file
    decoded = decode_adapter_weights(stored, metadata, str(path))  # names an undecodable one; drops the row scales
    parameters = [name for name, tensor in decoded.items() if tensor.is_floating_point()]
    dtypes = {str(stored[name].dtype).removeprefix("torch.") for name in parameters}
    dtypes = ["int8 with row scales" if d == "int8" else d for d in sorted(dtypes, key=lambda d: (d != "int8", d))]
    return sum(decoded[name].numel() for name in parameters), path.stat().st_size, "/".join(dtypes)


def _describe_lookup(config: dict[str, Any]) -> str:
    lookup = config.get("lookup_num_tokens", 0)
    if not lookup:
        return "off"
    growth = config.get("lookup_max_tokens", 0)
    grows = f", growing to {growth} while copies are accepted" if growth > lookup else ""
    trust = config.get("lookup_trust_ngram", 0)
    trusted = f"; matches of {trust}+ tokens copied even over a sure adapter" if trust else ""
    decay = config.get("lookup_hit_rate_decay", 0.0)
    by_rate = (
        f"; copied whenever the context's recent hit rate (decay {decay}) beats the adapter's confidence"
        if decay
        else ""
    )
    ngrams = config.get("lookup_max_ngram", 3)
    return f"up to {lookup} context tokens copied per round{grows} (n-grams up to {ngrams}{trusted}{by_rate})"


def render_model_card(folder: str | os.PathLike, repo_id: str | None = None) -> str:
    """The `README.md` text for the Kangaroo checkpoint in `folder` (`repo_id` is used in the usage snippet)."""
    folder = Path(folder)
    config = _read_json(folder / CONFIG_NAME)
    if config is None:
        raise FileNotFoundError(f"No {CONFIG_NAME} in {folder}: not a Kangaroo checkpoint folder.")
    base_config = config.get("base_config") or {}
    base_name = config.get("base_model_name_or_path") or "unknown base"
    revision = config.get("base_model_revision")
    params, size, dtype = adapter_size(folder)
    metrics = _read_json(folder / METRICS_NAME)
    training_args = _read_json(folder / TRAINING_ARGS_NAME)
    training_section = _recipe(training_args) if training_args else "Training settings and data were not recorded."
    metrics_section = _measured(metrics) if metrics else "No measurements were recorded for this checkpoint yet."
    return load_template().substitute(
        yaml_base_model=f"base_model: {base_name}\nbase_model_relation: adapter\n" if _is_hub_id(base_name) else "",
        base_name=base_name,
        base_model_type=base_config.get("model_type", "unknown architecture"),
        base_revision=f"`{revision}`" if revision else "default branch",
        base_revision_note=f" at revision `{revision}`" if revision else "",
        base_tuning=f"PEFT adapter `{peft}`" if (peft := config.get("peft_adapter_name_or_path")) else "none",
        repo_hint=repo_id or folder.name,
        exit_layer=config.get("exit_layer"),
        num_layers=base_config.get("num_hidden_layers", "?"),
        adapter_description=_adapter_description(config),
        adapter_context={"exit": "exit-layer states (the paper)", "final": "final-layer states (as EAGLE)"}.get(
            config.get("adapter_context", "exit"), config.get("adapter_context")
        ),
        adapter_params=f"{params:,}",
        adapter_params_human=_human(params),
        adapter_mb=f"{size / 1e6:.2f}",
        adapter_dtype=dtype,
        draft_threshold=config.get("draft_threshold"),
        max_draft_tokens=config.get("max_draft_tokens"),
        draft_vocabulary=(
            f"the {vocab_size:,} most frequent answer tokens (verification keeps the full head)"
            if (vocab_size := config.get("draft_vocab_size", 0))
            else "full"
        ),
        prompt_lookup=_describe_lookup(config),
        kangaroo_hf_version=config.get("kangaroo_hf_version", "unknown"),
        training_section=training_section,
        metrics_section=metrics_section,
    )


def _adapter_description(config: dict[str, Any]) -> str:
    layers = config.get("adapter_num_layers", 1)
    if config.get("adapter_mlp", False):
        return f"{layers} full decoder layer(s) (attention + the base's MLP) and an output RMSNorm"
    return f"{layers} attention block(s) between two RMSNorms, no MLP (the paper's adapter)"


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Render the card of the checkpoint in `folder` into `folder/README.md`; returns its path."""
    path = Path(folder) / CARD_NAME
    path.write_text(render_model_card(folder, repo_id=repo_id), encoding="utf-8")
    return path


__all__ = ["CARD_NAME", "TEMPLATE_NAME", "adapter_size", "load_template", "render_model_card", "write_model_card"]
