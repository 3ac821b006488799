"""kangaroo_hf: lossless self-speculative decoding (Kangaroo, arXiv 2404.18911) for LLaMA-family models."""

from transformers import AutoConfig, AutoModelForCausalLM

from .core.adapter import KangarooAdapter
from .core.checkpoint import EXTENSIONS
from .core.configuration import KangarooConfig
from .core.drafting import DraftSettings, KangarooCandidateGenerator
from .core.kernels import CpuKernels, cpu_linear, few_row_linear, packed_linear, release_packed_weights
from .core.modeling import KangarooForCausalLM
from .core.stats import KangarooStats
from .core.version import __version__
from .default_model import load_default_model, load_embedded_base, load_embedded_if_uncached
from .hub.model_card import write_model_card

AutoConfig.register(KangarooConfig.model_type, KangarooConfig, exist_ok=True)
AutoModelForCausalLM.register(KangarooConfig, KangarooForCausalLM, exist_ok=True)


def _write_remote_code(folder) -> None:
    from .hub.remote_code import write_remote_code  # imported on use: `python -m kangaroo_hf.hub.remote_code` runs it

    write_remote_code(folder)


# What the installed package adds to checkpoints; remote code runs without it.
EXTENSIONS.card_writer = write_model_card
EXTENSIONS.remote_code_writer = _write_remote_code
EXTENSIONS.base_loader = load_embedded_if_uncached

__all__ = [
    "CpuKernels",
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
    "release_packed_weights",
]
