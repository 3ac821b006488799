"""kangaroo_hf: lossless self-speculative decoding (Kangaroo, arXiv 2404.18911) for LLaMA-family models."""

from transformers import AutoConfig, AutoModelForCausalLM

from .backbone import cpu_linear, few_row_linear, packed_linear
from .configuration import KangarooConfig
from .default_model import load_default_model, load_embedded_base
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
    "cpu_linear",
    "few_row_linear",
    "load_default_model",
    "load_embedded_base",
    "packed_linear",
]
