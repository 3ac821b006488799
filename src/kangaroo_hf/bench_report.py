"""Deprecated import path, kept for one release: use kangaroo_hf.bench.report."""

from ._deprecated import warn_moved
from .bench.report import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.bench.report")
