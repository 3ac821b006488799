"""Export a Kangaroo drafter as an ordinary causal LM of the base's architecture, for engines that speculate with a
draft model (transformers' `assistant_model`, vLLM, SGLang, llama.cpp's `-md`).

With `adapter_context="exit"` the drafter is a plain decoder: the base's first `exit_layer` layers, then the adapter
blocks as decoder layers (an attention-only block is a decoder layer whose MLP is zero), then the adapter's norm and
the base's LM head. Engines run it as a separate model, so the shallow layers are computed twice there: sharing the
shallow KV cache with the verifier is what only Kangaroo's own decoding does.
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..core.modeling import KangarooForCausalLM

logger = logging.getLogger(__name__)

CARD = """---
library_name: transformers
base_model: {base}
tags:
- kangaroo
- speculative-decoding
- draft-model
---

# Kangaroo drafter for {base}

The draft model of a Kangaroo adapter (arXiv 2404.18911) as an ordinary `{architecture}`: the base's first
{exit_layer} layers, {adapter_layers} adapter block(s) and the base's LM head ({num_layers} layers in all). Use it as
the draft model of an engine that speculates with one, e.g. transformers' assisted generation:

```python
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained("{base}")
draft = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
out = base.generate(input_ids, assistant_model=draft, max_new_tokens=128)
```

Output stays the base's (the base verifies every draft). The engine runs the shallow layers twice (once in the draft,
once in the base); Kangaroo's own decoding (`kangaroo_hf`) shares them.{vocab_note}{gguf_note}
"""
GGUF_NOTE = """

`{gguf_name}` is the same drafter for llama.cpp, as its draft model:

```bash
llama-server -m target.gguf -md {gguf_name}
```
"""


def export_drafter(model: KangarooForCausalLM) -> PreTrainedModel:
    """The drafter of `model` as a new causal LM of the base's class (its weights copied; float32 kept as is).

    Raises `ValueError` for an adapter that is not a stack of decoder layers over the exit states
    (`adapter_context="final"` attends to the base's final states, which a separate draft model never sees).
    """
    config = model.config
    if hasattr(model.get_base_model(), "peft_config"):
        raise ValueError(
            "The base is a PEFT model: merge its adapter into the weights first (peft's `merge_and_unload()`), then "
            "wrap the merged base with this Kangaroo adapter and export."
        )
    if config.adapter_context != "exit":
        raise ValueError(
            f"Only adapter_context='exit' adapters are plain decoders; this one uses {config.adapter_context!r}."
        )
    parts = model.parts
    exit_layer, adapter_layers = config.exit_layer, len(model.adapter.layers)
    draft_config = copy.deepcopy(parts.config)
    draft_config.num_hidden_layers = exit_layer + adapter_layers
    # The adapter attends to its whole context (a causal mask without a window).
    if getattr(draft_config, "layer_types", None) is not None:
        draft_config.layer_types = list(draft_config.layer_types)[:exit_layer] + ["full_attention"] * adapter_layers
    elif getattr(draft_config, "sliding_window", None) is not None:
        logger.warning(
            "%s applies its sliding window (%d) to every layer: the exported adapter layers will too, so its drafts "
            "can differ from Kangaroo's on contexts longer than the window (outputs stay the base's).",
            type(parts.config).__name__,
            draft_config.sliding_window,
        )
    draft_config.architectures = [type(parts.layers[0]).__name__.replace("DecoderLayer", "ForCausalLM")]
    draft = AutoModelForCausalLM.from_config(draft_config, dtype=parts.lm_head.weight.dtype)
    state = {}
    for name, tensor in model.get_base_model().state_dict().items():
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) < exit_layer:
                state[name] = tensor
        elif not name.startswith("model.norm."):
            state[name] = tensor  # embeddings, rotary buffers, LM head
    for index, block in enumerate(model.adapter.layers):
        prefix = f"model.layers.{exit_layer + index}."
        for name, tensor in block.state_dict().items():
            state[prefix + name] = tensor
        if block.mlp is None:  # attention only: a decoder layer whose MLP adds nothing
            layer = draft.model.layers[exit_layer + index]
            for name, tensor in layer.mlp.state_dict().items():
                state[f"{prefix}mlp.{name}"] = torch.zeros_like(tensor)
            state[f"{prefix}post_attention_layernorm.weight"] = torch.ones_like(layer.post_attention_layernorm.weight)
    for name, tensor in model.adapter.norm.state_dict().items():
        state[f"model.norm.{name}"] = tensor
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and draft_config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"Exported drafter does not match its architecture: missing {missing}, extra {unexpected}.")
    draft.generation_config = copy.deepcopy(model.generation_config)
    return draft.eval()


def save_drafter(
    model: KangarooForCausalLM, output: str | Path, tokenizer: Any = None, gguf_type: str | None = None
) -> Path:
    """Write `export_drafter(model)` to `output` as a standard checkpoint (safetensors, config, tokenizer when given,
    and a short card saying what it is and how to use it); returns the folder.

    With `gguf_type` ("f32", "f16" or "q8_0") the folder also gets `drafter-<type>.gguf` for llama.cpp's `-md`
    (`gguf_file.write_gguf`); the embedded SmolLM2's vocabulary is then copied from its own GGUF.
    """
    output = Path(output)
    draft = export_drafter(model)
    if gguf_type is not None:  # refuse before anything is written
        from .gguf_file import check_gguf_exportable

        check_gguf_exportable(draft.config, gguf_type)
    draft.save_pretrained(output)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    gguf_name = None
    if gguf_type is not None:
        from .gguf_file import write_gguf

        gguf_name = f"drafter-{gguf_type}.gguf"
        write_gguf(
            draft,
            output / gguf_name,
            tokenizer=tokenizer,
            tokenizer_gguf=_embedded_gguf_of(model),
            gguf_type=gguf_type,
            name=f"{Path(str(model.config.base_model_name_or_path or 'base')).name}-kangaroo-drafter",
        )
    draft_vocab = int(model.adapter.draft_vocab_ids.numel())
    vocab_note = (
        f"\n\nThe Kangaroo adapter scores drafts over {draft_vocab} frequent tokens only; this model scores the full "
        "vocabulary, so its drafts can differ where a token outside that set wins."
        if draft_vocab
        else ""
    )
    (output / "README.md").write_text(
        CARD.format(
            base=model.config.base_model_name_or_path or "the base model",
            architecture=draft.config.architectures[0],
            exit_layer=model.config.exit_layer,
            adapter_layers=len(model.adapter.layers),
            num_layers=draft.config.num_hidden_layers,
            vocab_note=vocab_note,
            gguf_note=GGUF_NOTE.format(gguf_name=gguf_name) if gguf_name else "",
        ),
        encoding="utf-8",
    )
    return output


def _embedded_gguf_of(model: KangarooForCausalLM) -> Path | None:
    """The embedded SmolLM2 GGUF when `model`'s base is that model (its vocabulary is then copied exactly)."""
    from ..default_model import EMBEDDED_BASE_ID, embedded_gguf_path

    if model.config.base_model_name_or_path != EMBEDDED_BASE_ID:
        return None
    try:
        return embedded_gguf_path()
    except FileNotFoundError:
        return None


def _run_export(args: argparse.Namespace) -> int:
    from ..loading import load_model

    if args.gguf_type is not None and not args.gguf:
        raise ValueError("--gguf-type sets the type of the GGUF file that --gguf writes: add --gguf.")
    gguf_type = (args.gguf_type or "f16") if args.gguf else None
    model, tokenizer = load_model(args.adapter, "float32")
    logger.info("Wrote the drafter to %s", save_drafter(model, args.output, tokenizer, gguf_type=gguf_type))
    return 0


def add_export(subparsers: Any) -> None:
    """Register `kangaroo-hf export [ADAPTER] --output DIR [--gguf]`."""
    from .gguf_file import GGUF_TYPES

    parser = subparsers.add_parser("export", help="write the drafter as a standard checkpoint of the base's class")
    parser.add_argument("adapter", nargs="?", default=None, help="Kangaroo folder or repo id (default: shipped)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--gguf", action="store_true", help="also write the drafter as a GGUF file for llama.cpp")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default=None, help="GGUF weight type (default: f16)")
    parser.set_defaults(handler=_run_export)


__all__ = ["add_export", "export_drafter", "save_drafter"]
