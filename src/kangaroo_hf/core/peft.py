"""Kangaroo on PEFT-tuned bases: identify the tuning a Kangaroo adapter was trained for and rebuild it on load.

The draft shares the base's first `exit_layer` layers, LoRA modules included, so an adapter trained on one tuned model
drafts best for that tuned model. A checkpoint records the PEFT adapter's name/path and a fingerprint of its weights;
loading rebuilds the tuned base with PEFT's own loader, and warns when a differently tuned base is supplied (outputs
stay lossless either way; only acceptance drops).
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def is_peft_model(model: nn.Module) -> bool:
    """True for a `peft.PeftModel` (checked by its attributes, so peft need not be installed)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def peft_fingerprint(model: nn.Module) -> str | None:
    """SHA-256 over the names and values of the PEFT adapter weights in `model`; None when it holds no PEFT adapter."""
    if not is_peft_model(model):
        return None
    digest = hashlib.sha256()
    found = False
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name and "modules_to_save" not in name:
            continue
        found = True
        digest.update(name.encode())
        digest.update(tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest() if found else None


def load_peft_base(base: nn.Module, name_or_path: str, revision: str | None = None, **kwargs) -> nn.Module:
    """Put the recorded PEFT adapter on `base` with PEFT's own loader (folder or repo id)."""
    try:
        from peft import PeftModel
    except ImportError as error:
        raise ImportError(
            f"This Kangaroo checkpoint was trained for a base tuned with the PEFT adapter {name_or_path!r}; "
            "install peft (`pip install peft`) to rebuild it, or pass base_model= yourself."
        ) from error
    return PeftModel.from_pretrained(base, name_or_path, revision=revision, **kwargs).eval()


def warn_if_peft_differs(recorded_path: str | None, recorded_fingerprint: str | None, base: nn.Module) -> bool:
    """Warn (and return True) when `base` is not tuned with the PEFT adapter the Kangaroo adapter was trained for."""
    actual = peft_fingerprint(base)
    if actual == recorded_fingerprint:
        return False
    recorded = (
        f"PEFT adapter {recorded_path or '(unnamed)'} (fingerprint {recorded_fingerprint[:12]})"
        if recorded_fingerprint
        else "the untuned base (no PEFT adapter)"
    )
    supplied = f"a PEFT adapter with fingerprint {actual[:12]}" if actual else "no PEFT adapter"
    logger.warning(
        "This Kangaroo adapter was trained for %s, but the base carries %s: outputs stay lossless, acceptance "
        "may drop.",
        recorded,
        supplied,
    )
    return True


__all__ = ["is_peft_model", "load_peft_base", "peft_fingerprint", "warn_if_peft_differs"]
