"""Sharing adapters: the model card, the generated remote code and `kangaroo-hf push` (checkpoint I/O is in
`kangaroo_hf.core.checkpoint`, re-exported here as the old `kangaroo_hf.hub` module was)."""

from ..core.checkpoint import *  # noqa: F403
from ..core.checkpoint import __all__ as _checkpoint_all
from .push import add_push

__all__ = [*_checkpoint_all, "add_push"]
