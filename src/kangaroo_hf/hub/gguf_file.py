"""The exported drafter as a GGUF file, for llama.cpp's draft-model speculation (`llama-server -m TARGET -md DRAFT`).

Written with the `gguf` package the way llama.cpp's `convert_hf_to_gguf.py` writes these architectures: a Llama or
Mistral drafter as GGUF architecture `llama` (its Q and K projections permuted to llama.cpp's rotary layout; GGUF has
no sliding-window Mistral, so the window is dropped, as llama.cpp's converter drops it), a Qwen2 drafter as `qwen2`
(biases, no permutation). The tokenizer goes in too,
because llama.cpp loads every model's vocabulary and checks the draft's against the target's: the embedded SmolLM2's
is copied field by field from its own GGUF; another base's is written from its Hugging Face tokenizer files.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")
# transformers model type -> (GGUF architecture, whether Q/K are permuted to llama.cpp's rotary layout)
GGUF_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K rows from the Hugging Face rotary layout (halves) to llama.cpp's (interleaved pairs), per head; the
    inverse of transformers' GGUF loader's `reverse_permute_weights`."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_tensor_name(name: str) -> str | None:
    """The GGUF name of a drafter's state-dict entry (None: not written, e.g. rotary buffers)."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    module, kind = ".".join(parts[3:-1]), parts[-1]
    if module not in _LAYER_TENSORS:
        return None
    return f"blk.{parts[2]}.{_LAYER_TENSORS[module]}.{kind}"


def check_gguf_exportable(config: Any, gguf_type: str = "f16") -> tuple[str, bool]:
    """Raise `ValueError`, saying why, unless a drafter with this config can be written as `gguf_type`; returns its
    GGUF architecture and whether its Q/K are permuted."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}.")
    if config.model_type not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF export covers {sorted(GGUF_ARCHITECTURES)} bases; this one is {config.model_type!r}. Export "
            "without --gguf and convert the folder with llama.cpp's convert_hf_to_gguf.py if it supports the model."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"GGUF export writes default rotary embeddings only; this base uses rope_type={rope['rope_type']!r}. "
            "Export without --gguf and convert the folder with llama.cpp's convert_hf_to_gguf.py."
        )
    return GGUF_ARCHITECTURES[config.model_type]


def _add_hyperparameters(writer: Any, config: Any, name: str, file_type: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def _add_tensors(writer: Any, draft: PreTrainedModel, permute: bool, gguf_type: str) -> None:
    import gguf

    config = draft.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in draft.state_dict().items():
        target = gguf_tensor_name(name)
        if target is None or (tied and target == "output.weight"):  # llama.cpp reuses token_embd when tied
            continue
        tensor = tensor.detach().float().cpu()
        if permute and target.endswith(("attn_q.weight", "attn_q.bias")):
            tensor = permute_for_llama_cpp(tensor, config.num_attention_heads)
        elif permute and target.endswith(("attn_k.weight", "attn_k.bias")):
            tensor = permute_for_llama_cpp(tensor, config.num_key_value_heads)
        array = tensor.numpy()
        if array.ndim == 1 or gguf_type == "f32":  # norms and biases stay float32, as llama.cpp's converter keeps them
            writer.add_tensor(target, array.astype(np.float32))
        elif gguf_type == "f16":
            writer.add_tensor(target, array.astype(np.float16))
        else:
            quantized = gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(target, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def _copy_tokenizer_fields(writer: Any, source: Path) -> None:
    """Every `tokenizer.*` field of the GGUF file `source`, as it is there."""
    import gguf

    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)


def _add_tokenizer_from_files(writer: Any, tokenizer: Any, vocab_size: int) -> bool:
    """The tokenizer from its Hugging Face files (GPT-2 style BPE or SentencePiece, as llama.cpp's converter reads
    them); False when it is neither."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for vocab_class in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab, gguf.vocab.SentencePieceVocab):
            try:
                vocab = vocab_class(Path(folder))
            except (FileNotFoundError, ValueError, TypeError, KeyError):
                continue
            tokens, scores, token_types = [], [], []
            for text, score, token_type in vocab.all_tokens():
                tokens.append(text)
                scores.append(score)
                token_types.append(token_type)
            while len(tokens) < vocab_size:  # the model's rows beyond the tokenizer's vocabulary
                tokens.append(f"[PAD{len(tokens)}]".encode())
                scores.append(-1000.0)
                token_types.append(gguf.TokenType.UNUSED)
            writer.add_tokenizer_model(vocab.tokenizer_model)
            if vocab.tokenizer_model == "gpt2":
                writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(token_types)
            special = gguf.SpecialVocab(Path(folder), load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size)
            special.add_to_gguf(writer, quiet=True)
            return True
    return False


def write_gguf(
    draft: PreTrainedModel,
    path: str | Path,
    *,
    tokenizer: Any = None,
    tokenizer_gguf: str | Path | None = None,
    gguf_type: str = "f16",
    name: str = "kangaroo-drafter",
) -> Path:
    """Write `draft` (from `export.export_drafter`) to the GGUF file `path`.

    Args:
        draft: the exported drafter (a Llama, Mistral or Qwen2 causal LM with default rotary embeddings).
        tokenizer: the base's Hugging Face tokenizer, written into the file when `tokenizer_gguf` is not given.
        tokenizer_gguf: a GGUF file of the base whose `tokenizer.*` fields are copied as they are (preferred: the
            target llama.cpp runs then has exactly the same vocabulary).
        gguf_type: "f32", "f16" (default) or "q8_0" for the weight matrices; norms and biases stay float32.
        name: `general.name`.
    """
    import gguf

    config = draft.config
    architecture, permute = check_gguf_exportable(config, gguf_type)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, architecture)
    _add_hyperparameters(writer, config, name, file_type)
    if tokenizer_gguf is not None:
        _copy_tokenizer_fields(writer, Path(tokenizer_gguf))
    elif tokenizer is None or not _add_tokenizer_from_files(writer, tokenizer, config.vocab_size):
        logger.warning(
            "%s holds no vocabulary (no tokenizer given, or one neither GPT-2 BPE nor SentencePiece): transformers "
            "loads it, llama.cpp does not.",
            path,
        )
    _add_tensors(writer, draft, permute, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


__all__ = ["GGUF_TYPES", "check_gguf_exportable", "gguf_tensor_name", "permute_for_llama_cpp", "write_gguf"]
