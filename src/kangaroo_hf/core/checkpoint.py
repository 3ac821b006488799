"""Kangaroo checkpoints: adapter-only save, safe load (local folder or Hub repo id) and push.

A checkpoint folder holds `config.json` (model type `kangaroo`, the base's name and revision, the exit layer, the draft
settings and an `auto_map` for remote code), the adapter weights in `kangaroo_adapter.safetensors`, the base's
`generation_config.json`, a model card (`README.md`) and the remote-code files. File names differ from PEFT's on
purpose: transformers treats a folder holding `adapter_config.json` as a PEFT adapter. With `save_base=True` a full
copy of the base goes to `base/`, and loading prefers it over the recorded base name.

This module is part of the remote code, which is generated from `core/` alone. What the installed package adds (the
model card, the generated remote code, the embedded SmolLM2 base) it registers in `EXTENSIONS` at import; remote code
runs without them and copies its own two files as the remote code of what it saves.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .configuration import KangarooConfig
from .layers import DecoderParts, unwrap_causal_lm
from .peft import load_peft_base, warn_if_peft_differs
from .version import __version__

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
ADAPTER_WEIGHTS_NAME = "kangaroo_adapter.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
BASE_SUBFOLDER = "base"
# Optional JSON files the model card reads: measured speed / acceptance, and how the adapter was trained.
METRICS_NAME = "kangaroo_metrics.json"
TRAINING_ARGS_NAME = "training_args.json"
REMOTE_CODE_FILES = ("configuration_kangaroo.py", "modeling_kangaroo.py")
AUTO_MAP = {
    "AutoConfig": "configuration_kangaroo.KangarooConfig",
    "AutoModelForCausalLM": "modeling_kangaroo.KangarooForCausalLM",
}
# Storage types for the adapter weights (`save_pretrained(weights_dtype=...)`). "int8" keeps each weight matrix as
# int8 with one float32 scale per row (`<name>.int8_scale`), marked in the file's metadata; loading restores floats.
WEIGHTS_DTYPES = ("float32", "float16", "bfloat16", "int8")
WEIGHTS_FORMAT_KEY = "kangaroo_weights"
INT8_ROWWISE = "int8-rowwise"
INT8_SCALE_SUFFIX = ".int8_scale"
# Weight formats that unpickle (and may run code) on load: refused, never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Base config fields the adapter's shapes and the exit layer depend on: recorded at save, compared at load.
BASE_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token")
# Passed by `AutoModelForCausalLM.from_pretrained`; they concern the Kangaroo repo, not the base load.
_AUTO_KWARGS = ("_from_auto", "adapter_kwargs", "trust_remote_code", "code_revision", "_commit_hash")


@dataclass
class CheckpointExtensions:
    """What the installed package adds to saving and loading (registered by `kangaroo_hf/__init__.py`).

    card_writer(folder, repo_id): writes `README.md` into a saved checkpoint folder.
    remote_code_writer(folder): writes the generated remote-code files.
    base_loader(source, revision, dtype, device, cache_dir): a base loaded without a hub, or None to load as usual.
    """

    card_writer: Callable[[Path, str | None], None] | None = None
    remote_code_writer: Callable[[Path], None] | None = None
    base_loader: Callable[..., nn.Module | None] | None = None


EXTENSIONS = CheckpointExtensions()


# -- loading ------------------------------------------------------------------------------------------------------


def resolve_checkpoint(
    pretrained_model_name_or_path: str | os.PathLike,
    revision: str | None = None,
    subfolder: str = "",
    **hub_kwargs: Any,
) -> Path:
    """The local folder of a Kangaroo checkpoint: the path itself, or a Hub snapshot (cache first, offline-safe)."""
    path = Path(pretrained_model_name_or_path)
    if path.is_dir():
        return path / subfolder
    if path.exists():
        raise ValueError(f"A Kangaroo checkpoint is a folder or a repo id, got the file {str(path)!r}.")
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(
            str(pretrained_model_name_or_path),
            revision=revision,
            allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors", f"{prefix}{BASE_SUBFOLDER}/*"],
            **hub_kwargs,
        )
    except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError) as error:
        raise FileNotFoundError(
            f"{str(pretrained_model_name_or_path)!r} (revision {revision!r}) is neither a local folder nor a Hub repo "
            f"that could be fetched or found in the Hugging Face cache: {error}"
        ) from error
    return Path(snapshot) / subfolder


def read_adapter_file(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of `kangaroo_adapter.safetensors` in `folder` as stored, and the file's metadata.

    Pickle files are refused and a missing or damaged file is named; `load_adapter_weights` decodes the tensors.
    """
    folder = Path(folder)
    path = folder / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{folder} holds pickle weight files {pickles} but no {ADAPTER_WEIGHTS_NAME}: Kangaroo loads "
                "safetensors only, since unpickling can run arbitrary code. Convert the weights with "
                "`safetensors.torch.save_file` from a trusted environment."
            )
        present = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        raise FileNotFoundError(f"No adapter weights {ADAPTER_WEIGHTS_NAME} in {folder} (it holds {present}).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata() or {})
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({path.stat().st_size} bytes; truncated or corrupt?): {error}"
        ) from error


def _check_weights_dtype(weights_dtype: str | None) -> None:
    if weights_dtype is not None and weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES} or None, got {weights_dtype!r}.")


def encode_adapter_weights(
    weights: dict[str, torch.Tensor], weights_dtype: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata to store for `weights` in `weights_dtype` (None: as they are; see `WEIGHTS_DTYPES`).

    Integer tensors (token-id buffers) are stored as they are. With "int8", every floating weight matrix becomes int8
    with one float32 scale per row (`max |row| / 127`); vectors (norm weights) keep their dtype.
    """
    metadata = {"format": "pt", "kangaroo_hf_version": __version__}
    _check_weights_dtype(weights_dtype)
    if weights_dtype is None:
        return dict(weights), metadata
    if weights_dtype != "int8":
        dtype = getattr(torch, weights_dtype)
        return {name: t.to(dtype) if t.is_floating_point() else t for name, t in weights.items()}, metadata
    encoded: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if not (tensor.is_floating_point() and tensor.dim() == 2):
            encoded[name] = tensor
            continue
        rows = tensor.float()
        scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        encoded[name] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
        encoded[name + INT8_SCALE_SUFFIX] = scale.contiguous()
    return encoded, {**metadata, WEIGHTS_FORMAT_KEY: INT8_ROWWISE}


def decode_adapter_weights(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "the adapter file"
) -> dict[str, torch.Tensor]:
    """Inverse of `encode_adapter_weights`: int8 matrices (per the metadata) back to float32, the rest as stored."""
    weights_format = metadata.get(WEIGHTS_FORMAT_KEY)
    if weights_format is None:
        return tensors
    if weights_format != INT8_ROWWISE:
        raise ValueError(
            f"{source} stores its weights as {weights_format!r}, which this version of kangaroo_hf ({__version__}) "
            f"cannot read (it reads {INT8_ROWWISE!r}); upgrade kangaroo_hf."
        )
    decoded = {name: t for name, t in tensors.items() if not name.endswith(INT8_SCALE_SUFFIX)}
    for name, tensor in list(decoded.items()):
        if tensor.dtype != torch.int8:
            continue
        scale = tensors.get(name + INT8_SCALE_SUFFIX)
        if scale is None or tensor.dim() != 2 or scale.shape != (tensor.shape[0],):
            found = None if scale is None else tuple(scale.shape)
            raise ValueError(
                f"{source} is damaged: the int8 weight {name!r} {tuple(tensor.shape)} needs a row scale "
                f"{name + INT8_SCALE_SUFFIX!r} of shape ({tensor.shape[0]},), found {found}."
            )
        decoded[name] = tensor.float() * scale.float()[:, None]
    int8_names = {name for name, tensor in tensors.items() if tensor.dtype == torch.int8}
    orphans = sorted(
        name
        for name in tensors
        if name.endswith(INT8_SCALE_SUFFIX) and name.removesuffix(INT8_SCALE_SUFFIX) not in int8_names
    )
    if orphans:
        raise ValueError(f"{source} is damaged: the scales {orphans} belong to no int8 weight.")
    return decoded


def load_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read and decode `kangaroo_adapter.safetensors` from `folder`; pickles are refused, a damaged file (unreadable,
    or holding NaN / infinite weights) is named."""
    tensors, metadata = read_adapter_file(folder)
    source = str(Path(folder) / ADAPTER_WEIGHTS_NAME)
    weights = decode_adapter_weights(tensors, metadata, source)
    damaged = [
        f"{name} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)"
        for name, tensor in weights.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if damaged:
        raise ValueError(f"{source} is damaged: NaN or infinite weights in {', '.join(damaged)}.")
    return weights


def check_kangaroo_folder(folder: Path) -> None:
    """Raise when `folder` has no `config.json`, one that is not JSON, or one of another model type (each named)."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {folder}: not a Kangaroo checkpoint.")
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not a valid JSON file ({error}); the checkpoint is damaged.") from error
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if model_type != KangarooConfig.model_type:
        raise ValueError(f"{config_path} has model_type {model_type!r}, expected {KangarooConfig.model_type!r}.")


def check_base_matches(config: KangarooConfig, base: nn.Module, base_source: str | None = None) -> None:
    """Raise `ValueError` naming each field where the actual base differs from the base the adapter was saved for."""
    actual = DecoderParts.from_base(base).config
    recorded = config.base_config
    source = base_source or actual.name_or_path or type(unwrap_causal_lm(base)).__name__
    if recorded.model_type != actual.model_type:
        raise ValueError(
            f"This Kangaroo adapter was saved for a {recorded.model_type!r} base "
            f"({config.base_model_name_or_path!r}), but the base given ({source!r}) is a {actual.model_type!r} model."
        )
    depth = actual.num_hidden_layers
    if config.exit_layer >= depth:
        raise ValueError(
            f"exit_layer={config.exit_layer} is beyond the depth of the base {source!r}: it has {depth} layers "
            f"(the checkpoint recorded {recorded.num_hidden_layers}); exit_layer must be in [1, {depth - 1}]."
        )
    fields = (*BASE_FIELDS, "num_hidden_layers")
    mismatched = [
        f"{name}: checkpoint {getattr(recorded, name, None)!r} vs base {getattr(actual, name, None)!r}"
        for name in fields
        if getattr(recorded, name, None) != getattr(actual, name, None)
    ]
    if mismatched:
        raise ValueError(
            f"The base {source!r} does not match the base this adapter was saved for "
            f"({config.base_model_name_or_path!r}): " + "; ".join(mismatched)
        )


def _load_base(
    config: KangarooConfig,
    folder: Path,
    dtype: torch.dtype | str | None,
    device_map: Any,
    hub_kwargs: dict[str, Any],
    base_kwargs: dict[str, Any],
) -> tuple[nn.Module, str]:
    """Load the base: the bundled `base/` copy, else the recorded name and revision (embedded SmolLM2 fallback)."""
    if (folder / BASE_SUBFOLDER / CONFIG_NAME).is_file():
        source, revision = str(folder / BASE_SUBFOLDER), None
    else:
        source, revision = config.base_model_name_or_path, config.base_model_revision
    if source is None:
        raise ValueError(f"{folder / CONFIG_NAME} records no base_model_name_or_path: pass the base as `base_model=`.")
    if EXTENSIONS.base_loader is not None:
        device = device_map if isinstance(device_map, (str, torch.device)) and device_map != "auto" else "cpu"
        base = EXTENSIONS.base_loader(source, revision, dtype, device, hub_kwargs.get("cache_dir"))
        if base is not None:
            return base, source
    load_kwargs = {"use_safetensors": True, **hub_kwargs, **base_kwargs}
    if revision is not None:
        load_kwargs["revision"] = revision
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    # A base with custom code is never trusted implicitly: trust_remote_code given for the Kangaroo repo stays there.
    base = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False, **load_kwargs)
    return base, source


def load_kangaroo(
    model_class: type[PreTrainedModel],
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    base_model: nn.Module | None = None,
    config: KangarooConfig | None = None,
    revision: str | None = None,
    subfolder: str = "",
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Implementation of `KangarooForCausalLM.from_pretrained`; see there for the arguments."""
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = torch_dtype if dtype is None else dtype
    for name in _AUTO_KWARGS:
        kwargs.pop(name, None)
    hub_kwargs = {name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs}
    folder = resolve_checkpoint(pretrained_model_name_or_path, revision, subfolder, **hub_kwargs)
    if config is None:
        check_kangaroo_folder(folder)
        config = model_class.config_class.from_pretrained(folder)
    # Read (and validate) the small adapter file before the possibly large base.
    state_dict = load_adapter_weights(folder)
    if base_model is None:
        base_model, source = _load_base(config, folder, dtype, device_map, hub_kwargs, kwargs)
        if config.peft_adapter_name_or_path is not None:
            # The adapter was trained on a PEFT-tuned base: rebuild that tuning with PEFT's own loader.
            base_model = load_peft_base(
                base_model, config.peft_adapter_name_or_path, revision=config.peft_adapter_revision, **hub_kwargs
            )
    else:
        source = None
        if kwargs or dtype is not None or device_map is not None:
            logger.warning("base_model= given: base loading arguments %s are ignored.", sorted(kwargs) or "dtype")
    check_base_matches(config, base_model, source)
    warn_if_peft_differs(config.peft_adapter_name_or_path, config.peft_adapter_fingerprint, base_model)
    parts = DecoderParts.from_base(base_model)
    # The model's config describes the base actually wrapped (dtype, attention implementation, ...).
    config.base_config = copy.deepcopy(parts.config)
    model = model_class(config, base=base_model)
    # Only the adapter moves: the base may be dispatched over several devices by `device_map`.
    anchor = parts.layers[config.exit_layer - 1]
    model.adapter.to(device=next(anchor.parameters()).device, dtype=parts.lm_head.weight.dtype)
    model.load_adapter_state_dict(state_dict)
    if (folder / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


# -- saving -------------------------------------------------------------------------------------------------------


def _write_remote_code(model: PreTrainedModel, folder: Path) -> None:
    """The remote-code files: generated from the package sources, or this file and its config file as remote code."""
    if EXTENSIONS.remote_code_writer is not None:
        EXTENSIONS.remote_code_writer(folder)
        return
    for obj, name in ((model.config, REMOTE_CODE_FILES[0]), (model, REMOTE_CODE_FILES[1])):
        shutil.copyfile(sys.modules[type(obj).__module__].__file__, folder / name)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, leaving the file with the permissions any other file written here gets.

    safetensors 0.8 writes through a temporary file that is always created with mode 0600 and renamed into place
    (safetensors issue #782), so a saved adapter would be unreadable to every other user (a container's runtime
    user, a shared model folder) while its `config.json` beside it is readable. An overwritten file keeps its mode.
    """
    path = Path(path)
    previous_mode = path.stat().st_mode & 0o777 if path.exists() else None
    save_file(tensors, path, metadata=metadata)
    if os.name == "posix":
        os.chmod(path, previous_mode if previous_mode is not None else 0o666 & ~_current_umask())


def _current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (setting and restoring it would briefly
    change it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def save_kangaroo(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    save_base: bool = False,
    metrics: dict[str, Any] | None = None,
    training_args: dict[str, Any] | None = None,
    weights_dtype: str | None = None,
    tokenizer: Any = None,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    safe_serialization: bool = True,
    max_shard_size: int | str = "50GB",
    **kwargs: Any,
) -> list[str]:
    """Implementation of `KangarooForCausalLM.save_pretrained`; returns the names of the files written."""
    if not safe_serialization:
        raise ValueError("Kangaroo checkpoints are safetensors only; safe_serialization=False is not supported.")
    _check_weights_dtype(weights_dtype)  # before anything is written
    push_kwargs = {
        name: kwargs.pop(name) for name in ("repo_id", "commit_message", "private", "token") if name in kwargs
    }
    if kwargs:
        logger.warning("save_pretrained ignores %s: a Kangaroo checkpoint holds the adapter only.", sorted(kwargs))
    folder = Path(save_directory)
    if folder.is_file():
        raise ValueError(f"save_directory must be a folder, got the file {str(folder)!r}.")
    if not is_main_process:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.auto_map = dict(AUTO_MAP)
    if config.base_model_name_or_path is None and not save_base:
        logger.warning("The base has no name or path: loading this checkpoint will need `base_model=`.")
    config.save_pretrained(folder)
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in model.adapter_state_dict().items()}
    tensors, metadata = encode_adapter_weights(weights, weights_dtype)
    save_safetensors(tensors, folder / ADAPTER_WEIGHTS_NAME, metadata=metadata)
    model.generation_config.save_pretrained(folder)
    if tokenizer is not None:  # the folder then serves as is, and `pipeline(model=folder)` finds its tokenizer
        tokenizer.save_pretrained(folder)
    if save_base:
        if unwrap_causal_lm(model.base) is not model.base:
            raise ValueError("save_base=True needs a plain base: call `merge_and_unload()` on the PEFT base first.")
        model.base.save_pretrained(folder / BASE_SUBFOLDER, max_shard_size=max_shard_size)
    for name, values in ((METRICS_NAME, metrics), (TRAINING_ARGS_NAME, training_args)):
        if values is not None:
            (folder / name).write_text(json.dumps(values, indent=2, sort_keys=True, default=str) + "\n")
    _write_remote_code(model, folder)
    if EXTENSIONS.card_writer is not None:
        EXTENSIONS.card_writer(folder, None)
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if push_to_hub:
        push_folder(folder, push_kwargs.pop("repo_id", folder.name), **push_kwargs)
    return written


# -- pushing ------------------------------------------------------------------------------------------------------


def upload_file_list(folder: str | os.PathLike) -> list[str]:
    """The files of a checkpoint folder that a push uploads (hidden files and caches excluded); checks the folder."""
    folder = Path(folder)
    check_kangaroo_folder(folder)
    load_adapter_weights(folder)  # refuses pickles, names a missing or damaged adapter file
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{path} is a pickle file: push safetensors only (remove or convert it).")
        files.append(relative.as_posix())
    return files


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload a saved Kangaroo checkpoint folder (card included) to the Hub repo `repo_id`, creating it if needed.

    Returns the `huggingface_hub.CommitInfo` of the upload.
    """
    files = upload_file_list(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("Uploading %d files from %s to %s", len(files), folder, repo_id)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload Kangaroo adapter",
        revision=revision,
        create_pr=create_pr,
        # Exactly the listed files: nothing else that happens to sit in the folder goes up.
        allow_patterns=[glob.escape(name) for name in files],
    )


def push_kangaroo(
    model: PreTrainedModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    **save_kwargs: Any,
) -> Any:
    """Implementation of `KangarooForCausalLM.push_to_hub`: save to a temporary folder, then `push_folder`."""
    with tempfile.TemporaryDirectory() as tmp:
        save_kangaroo(model, tmp, **save_kwargs)
        if EXTENSIONS.card_writer is not None:
            EXTENSIONS.card_writer(Path(tmp), repo_id)  # the card's usage snippet names the repo
        return push_folder(
            tmp,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


__all__ = [
    "EXTENSIONS",
    "CheckpointExtensions",
    "ADAPTER_WEIGHTS_NAME",
    "AUTO_MAP",
    "BASE_SUBFOLDER",
    "METRICS_NAME",
    "TRAINING_ARGS_NAME",
    "check_base_matches",
    "decode_adapter_weights",
    "encode_adapter_weights",
    "load_adapter_weights",
    "load_kangaroo",
    "push_folder",
    "push_kangaroo",
    "read_adapter_file",
    "resolve_checkpoint",
    "save_kangaroo",
    "upload_file_list",
]
