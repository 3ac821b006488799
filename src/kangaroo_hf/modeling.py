"""Deprecated import path, kept for one release: use kangaroo_hf.core.modeling, kangaroo_hf.core.adapter."""

from ._deprecated import warn_moved
from .core.adapter import *  # noqa: F403
from .core.modeling import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.core.modeling, kangaroo_hf.core.adapter")
