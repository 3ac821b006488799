"""Deprecated import path, kept for one release: use kangaroo_hf.core.layers, kangaroo_hf.core.kernels."""

from ._deprecated import warn_moved
from .core.kernels import *  # noqa: F403
from .core.layers import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.core.layers, kangaroo_hf.core.kernels")
