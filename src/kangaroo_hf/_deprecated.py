"""Old module paths (before the core/ training/ bench/ hub/ cli/ layout) work for one more release, with a warning."""

from __future__ import annotations

import warnings


def warn_moved(old: str, new: str) -> None:
    """Warn that module `old` moved to `new` (kept for one release)."""
    warnings.warn(
        f"{old} moved to {new}; the old import path will be removed in the next release.", FutureWarning, stacklevel=3
    )
