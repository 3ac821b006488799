"""Deprecated import path, kept for one release: use kangaroo_hf.core.configuration."""

from ._deprecated import warn_moved
from .core.configuration import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.core.configuration")
