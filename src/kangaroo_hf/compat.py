"""Deprecated import path, kept for one release: use kangaroo_hf.core.compat."""

from ._deprecated import warn_moved
from .core.compat import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.core.compat")
