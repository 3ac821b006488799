"""Deprecated import path, kept for one release: use kangaroo_hf.training.loss."""

from ._deprecated import warn_moved
from .training.loss import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.training.loss")
