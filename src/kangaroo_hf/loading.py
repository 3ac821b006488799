"""What the commands load: a Kangaroo model or a base, each with its tokenizer (the embedded SmolLM2 by default)."""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."
DTYPES = ("float32", "bfloat16")


def load_model(model: str | None, dtype: str, device: str = "cpu"):
    """A Kangaroo model and its tokenizer: the shipped default, or a Kangaroo folder / repo id (the tokenizer saved
    in the folder, else the base's)."""
    from transformers import AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if model is None:
        from .default_model import load_default_model

        return load_default_model(dtype=torch_dtype, device=device)
    from .core.modeling import KangarooForCausalLM

    kangaroo = KangarooForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device).eval()
    if (Path(model) / "tokenizer_config.json").is_file():  # saved with `save_pretrained(..., tokenizer=...)`
        return kangaroo, AutoTokenizer.from_pretrained(model)
    base_id = kangaroo.config.base_model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_id)
    except OSError:
        from .default_model import EMBEDDED_BASE_ID, load_embedded_tokenizer

        if base_id != EMBEDDED_BASE_ID:
            raise
        tokenizer = load_embedded_tokenizer()  # offline: the base itself came from the embedded GGUF too
    return kangaroo, tokenizer


def load_base(name: str | None, dtype: str):
    """The base and tokenizer: the embedded SmolLM2 by default, else any `AutoModelForCausalLM` id or folder."""
    if name is None:
        from .default_model import load_embedded_base

        return load_embedded_base(dtype=getattr(torch, dtype))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype)), AutoTokenizer.from_pretrained(name)


def chat_input_ids(tokenizer, prompt: str):
    """The prompt as a single user turn, rendered with the model's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


__all__ = ["DEFAULT_PROMPT", "DTYPES", "chat_input_ids", "load_base", "load_model"]
