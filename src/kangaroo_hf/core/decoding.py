"""How `KangarooForCausalLM.generate()` decodes a call: which loop, which candidate generator, what is refused.

One sequence with chain rounds runs in transformers' assisted loop with `KangarooCandidateGenerator`; batches and
tree rounds run in Kangaroo's own loop (`BatchedKangarooDecoder`). `compat.GenerationHooks` asks the two hooks here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from .batched import BatchedKangarooDecoder
from .compat import GenerationHooks, attention_implementation
from .drafting import KangarooCandidateGenerator


class KangarooDecoding(GenerationHooks):
    """The decoding hooks of a Kangaroo model (mixed into `KangarooForCausalLM`, which provides `_draft_settings`
    for the current call, `last_generate_stats`, `parts` and the CPU kernels)."""

    def candidate_generator_for(
        self,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
    ) -> KangarooCandidateGenerator | None:
        """The candidate generator greedy search and sampling run with (`compat.GenerationHooks`): Kangaroo's when
        enabled for this call, else None (the base's own decoding)."""
        settings = self._draft_settings
        if settings is None or input_ids.shape[0] != 1:
            return None
        self._check_kangaroo_call(generation_config, model_kwargs)
        generator = KangarooCandidateGenerator(
            self,
            settings,
            generation_config,
            logits_processor,
            stopping_criteria,
            use_few_row_matmul=self.uses_few_row_matmul(),
            use_packed_weights=self.uses_packed_weights(),
        )
        self.last_generate_stats = generator.stats
        return generator

    def own_decoder_for(
        self,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
    ) -> BatchedKangarooDecoder | None:
        """Kangaroo's own decoding loop for this call (`compat.GenerationHooks`): for a batch (B > 1) or tree rounds;
        None otherwise (one sequence with chain rounds runs in transformers' assisted loop)."""
        settings = self._draft_settings
        if settings is None or (input_ids.shape[0] == 1 and not settings.tree_rounds):
            return None
        self._check_kangaroo_call(generation_config, model_kwargs)
        streamer = model_kwargs.get("streamer")
        if streamer is not None and input_ids.shape[0] > 1:
            self._refuse_streamer(input_ids.shape[0])
        requested = [
            name for name in ("output_attentions", "output_hidden_states") if getattr(generation_config, name)
        ]
        if requested:
            raise ValueError(f"{requested} are not available with batched Kangaroo decoding; use_kangaroo=False.")
        attention = attention_implementation(self.parts.config)
        if attention not in (None, "sdpa", "eager"):
            raise ValueError(
                f"Batched Kangaroo decoding and tree rounds build 4D attention masks, which "
                f"attn_implementation={attention!r} does not take; load the base with attn_implementation='sdpa' or "
                "'eager'."
            )
        decoder = BatchedKangarooDecoder(
            self,
            settings,
            generation_config,
            logits_processor,
            stopping_criteria,
            batch_size=input_ids.shape[0],
            use_few_row_matmul=self.uses_few_row_matmul(),
            use_packed_weights=self.uses_packed_weights(),
            streamer=streamer,
        )
        self.last_generate_stats = decoder.total_stats
        return decoder

    @staticmethod
    def _refuse_streamer(batch_size: int) -> None:
        raise ValueError(
            f"Streamers handle one sequence; this batch has {batch_size}. Stream one prompt at a time, or drop the "
            "streamer."
        )

    def _check_kangaroo_call(self, generation_config: GenerationConfig, model_kwargs: dict[str, Any]) -> None:
        """Refuse what Kangaroo decoding cannot honour: a lossy acceptance rule, or no fresh dynamic cache."""
        if generation_config.assistant_ensemble_weight is not None:
            raise ValueError(
                "assistant_ensemble_weight relaxes verification (lossy); Kangaroo decoding is lossless and does not "
                f"support it (got {generation_config.assistant_ensemble_weight})."
            )
        cache = model_kwargs.get("cache")
        if not isinstance(cache, DynamicCache) or cache.get_seq_length() > 0:
            raise ValueError(
                "Kangaroo decoding needs use_cache=True and a fresh DynamicCache (it writes the shallow layers' KV "
                f"during drafting and crops after verification), got {type(cache).__name__}."
            )

    def decoding_context(self, decoder: Any) -> contextlib.AbstractContextManager:
        """The CPU kernels (`cpu_kernels`) around the whole decoding loop: the prefill, drafting steps and
        verifications."""
        return self.decoding_kernels()


__all__ = ["KangarooDecoding"]
