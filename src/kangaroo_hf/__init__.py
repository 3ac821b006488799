"""kangaroo_hf: lossless self-speculative decoding (Kangaroo, arXiv 2404.18911) for transformers LLaMA-family models."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import KangarooConfig
from .generation import DraftSettings, KangarooCandidateGenerator, KangarooStats
from .modeling import KangarooAdapter, KangarooForCausalLM
from .version import __version__

AutoConfig.register(KangarooConfig.model_type, KangarooConfig, exist_ok=True)
AutoModelForCausalLM.register(KangarooConfig, KangarooForCausalLM, exist_ok=True)

__all__ = [
    "DraftSettings",
    "KangarooAdapter",
    "KangarooCandidateGenerator",
    "KangarooConfig",
    "KangarooForCausalLM",
    "KangarooStats",
    "__version__",
]
