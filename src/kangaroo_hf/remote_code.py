"""Deprecated import path, kept for one release: use kangaroo_hf.hub.remote_code."""

from ._deprecated import warn_moved
from .hub.remote_code import *  # noqa: F403

warn_moved(__name__, "kangaroo_hf.hub.remote_code")

if __name__ == "__main__":
    from .hub.remote_code import main

    raise SystemExit(main())
