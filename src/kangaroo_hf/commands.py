"""Deprecated import path, kept for one release: use kangaroo_hf.loading, kangaroo_hf.cli.generate."""

from ._deprecated import warn_moved
from .cli.generate import *  # noqa: F403
from .loading import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.loading, kangaroo_hf.cli.generate")
