"""Deprecated import path, kept for one release: use kangaroo_hf.bench.profile."""

from ._deprecated import warn_moved
from .bench.profile import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.bench.profile")
