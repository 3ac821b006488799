"""Deprecated import path, kept for one release: use kangaroo_hf.core.version."""

from ._deprecated import warn_moved
from .core.version import *  # noqa: F403
from .core.version import __version__  # noqa: F401

warn_moved(__name__, "kangaroo_hf.core.version")
