"""Deprecated import path, kept for one release: use kangaroo_hf.hub.model_card."""

from ._deprecated import warn_moved
from .hub.model_card import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.hub.model_card")
