"""Benchmarks against the alternatives users would pick, losslessness checks, profiles and threshold tuning."""

from .runner import *  # noqa: F403
from .runner import __all__ as __all__
