"""Deprecated import path, kept for one release: use kangaroo_hf.core.drafting, kangaroo_hf.core.stats."""

from ._deprecated import warn_moved
from .core.drafting import *  # noqa: F403
from .core.stats import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.core.drafting, kangaroo_hf.core.stats")
