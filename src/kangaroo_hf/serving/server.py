"""transformers' `Serve` and `ModelLoader` with the Kangaroo set-up of the model's process (see `kangaroo_hf.serving`).

Imported only once `serving_unsupported_reason()` has found transformers' serving code as this module expects it.
`KangarooModelLoader` is module-level because the server pickles the loader into the model's process.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from transformers.cli.serve import Serve
from transformers.cli.serving.model_manager import ModelLoader

from ..core.stats import STATS_LOGGER


def set_up_model_process(log_level: int) -> None:
    """In the model's process: the Kangaroo classes registered with the Auto classes (importing the package does it)
    and the statistics logger writing at the server's level."""
    import kangaroo_hf  # noqa: F401

    stats_logger = logging.getLogger(STATS_LOGGER)
    stats_logger.setLevel(log_level)
    if not stats_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        stats_logger.addHandler(handler)
        stats_logger.propagate = False


class KangarooModelLoader(ModelLoader):
    """transformers' loader with `set_up_model_process` run before the model loads, in the process that loads it."""

    log_level = logging.INFO

    @classmethod
    def wrapping(cls, loader: ModelLoader, log_level: int) -> KangarooModelLoader:
        """A copy of `loader` (its settings as they are) that sets the model's process up first."""
        kangaroo = cls.__new__(cls)
        kangaroo.__dict__.update(vars(loader))
        kangaroo.log_level = log_level
        return kangaroo

    def load_model_and_processor(self, *args: Any, **kwargs: Any) -> Any:
        set_up_model_process(self.log_level)
        return super().load_model_and_processor(*args, **kwargs)


class KangarooServe(Serve):
    def _with_kangaroo_loader(self) -> None:
        if not isinstance(self.loader, KangarooModelLoader):
            self.loader = KangarooModelLoader.wrapping(self.loader, self.log_level)

    def run(self, *args: Any, **kwargs: Any) -> None:
        self._with_kangaroo_loader()
        super().run(*args, **kwargs)

    def run_api_servers(self, *args: Any, **kwargs: Any) -> None:
        self._with_kangaroo_loader()
        super().run_api_servers(*args, **kwargs)


KangarooServe.__doc__ = (
    "`transformers serve` with a Kangaroo checkpoint (the shipped adapter on the embedded SmolLM2 by default): the "
    "model's process imports kangaroo_hf and logs each request's speculation statistics.\n" + (Serve.__doc__ or "")
)

__all__ = ["KangarooModelLoader", "KangarooServe", "set_up_model_process"]
