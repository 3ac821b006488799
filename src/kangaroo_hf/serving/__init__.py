"""`kangaroo-hf serve`: a Kangaroo checkpoint behind transformers' OpenAI-compatible server (`transformers serve`).

The server is transformers' own (same flags, same HTTP API: `/v1/chat/completions`, streaming or not,
`/v1/completions`, `/v1/models`, ...). Two things are added, in the model's process that server spawns:

- `kangaroo_hf` is imported there, so a Kangaroo checkpoint loads through `AutoModelForCausalLM` with the installed
  package (no `--trust-remote-code` needed) and the embedded SmolLM2 base resolves offline;
- the `kangaroo_hf.stats` logger writes each request's speculation statistics at the server's log level.

Without a checkpoint it serves the shipped adapter on the embedded SmolLM2: a serve-ready folder (the adapter, its
config and the tokenizer) is written once under `$KANGAROO_HF_CACHE`.

On transformers 5.25 `transformers serve CHECKPOINT --trust-remote-code` also loads a checkpoint saved with
`save_pretrained(..., tokenizer=tokenizer)` through its remote code, without the statistics lines.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import transformers
from packaging.version import Version

from ..core.compat import missing_private_names

# What this module relies on in transformers' serving code (not public API; checked by the test suite like
# `core.compat.PRIVATE_NAMES`, but only where serving is supported).
SERVING_PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("transformers.cli.serve:Serve", "the `transformers serve` command: its flags, its server"),
    ("transformers.cli.serve:Serve.run", "serves with `self.loader`"),
    ("transformers.cli.serve:Serve.run_api_servers", "serves with `self.loader` in several processes"),
    ("transformers.cli.serving.model_manager:ModelLoader", "how the model's process loads a model"),
    ("transformers.cli.serving.model_manager:ModelLoader.load_model_and_processor", "runs in the model's process"),
)
# transformers 5.24's server resolves a model's class from its config's `architectures` in transformers' namespace
# only; from 5.25 on it loads a config without `architectures` (as a Kangaroo checkpoint's) by its Auto class.
SERVING_SINCE = "5.25"
SERVE_EXTRA_HINT = 'pip install "kangaroo-hf[serve]"'


def serving_unsupported_reason() -> str | None:
    """Why `kangaroo-hf serve` cannot run with the installed packages, or None when it can."""
    if Version(transformers.__version__).release < Version(SERVING_SINCE).release:
        return (
            f"kangaroo-hf serve needs transformers>={SERVING_SINCE} (installed: {transformers.__version__}): older "
            "servers load a model only by a class of transformers' own namespace."
        )
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        return f"kangaroo-hf serve needs transformers' serving dependencies: {SERVE_EXTRA_HINT}"
    missing = missing_private_names(SERVING_PRIVATE_NAMES)
    if missing:
        return "The installed transformers' server lacks what kangaroo-hf serve relies on: " + "; ".join(missing)
    return None


def default_serving_folder() -> Path:
    """A serve-ready copy of the shipped adapter (config, weights, remote code, card) with the embedded SmolLM2's
    tokenizer, written once under `$KANGAROO_HF_CACHE/serve/` (keyed by the adapter's weights)."""
    from ..default_model import SHIPPED_ADAPTER, cache_root, load_embedded_tokenizer, publish_folder

    weights = (SHIPPED_ADAPTER / "kangaroo_adapter.safetensors").read_bytes()
    key = hashlib.sha256(weights).hexdigest()[:16]
    folder = cache_root() / "serve" / f"{SHIPPED_ADAPTER.name}-{key}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
    shutil.copytree(SHIPPED_ADAPTER, partial, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    load_embedded_tokenizer().save_pretrained(partial)
    publish_folder(partial, folder)
    return folder


def serve(argv: list[str]) -> int:
    """`kangaroo-hf serve [CHECKPOINT] [transformers serve's flags]`: transformers' server with the Kangaroo set-up;
    without a checkpoint, the shipped adapter on the embedded SmolLM2."""
    reason = serving_unsupported_reason()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    from huggingface_hub import typer_factory

    from .server import KangarooServe

    if "--continuous-batching" in argv:
        print(
            "kangaroo-hf serve: --continuous-batching runs the model's forward in transformers' paged scheduler, "
            "without generate(), so Kangaroo would not decode at all; serve without it (requests run one at a time).",
            file=sys.stderr,
        )
        return 2
    asks_for_help = any(arg in ("--help", "-h") for arg in argv)
    if not asks_for_help and (not argv or argv[0].startswith("-")):
        argv = [str(default_serving_folder()), *argv]
    app = typer_factory(help="Serve a Kangaroo checkpoint with transformers' OpenAI-compatible server.")
    app.command(name="serve")(KangarooServe)
    try:
        app(["serve", *argv], prog_name="kangaroo-hf")
    except SystemExit as exit_:  # typer exits: 0 after --help or a clean stop, 2 on a usage error
        return int(exit_.code or 0)
    return 0


__all__ = ["SERVING_PRIVATE_NAMES", "default_serving_folder", "serve", "serving_unsupported_reason"]
