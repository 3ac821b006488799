"""Deprecated import path, kept for one release: use kangaroo_hf.bench.methods."""

from ._deprecated import warn_moved
from .bench.methods import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.bench.methods")
