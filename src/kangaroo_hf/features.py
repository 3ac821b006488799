"""Deprecated import path, kept for one release: use kangaroo_hf.training.features."""

from ._deprecated import warn_moved
from .training.features import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.training.features")
