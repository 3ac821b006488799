"""`kangaroo-hf push`: upload a Kangaroo checkpoint folder (adapter, card, remote code) to the Hub."""

from __future__ import annotations

from typing import Any

from ..core.checkpoint import push_folder
from .model_card import write_model_card


def _run_push(args: Any) -> int:
    if args.refresh_card:
        write_model_card(args.folder, repo_id=args.repo_id)
    commit = push_folder(
        args.folder,
        args.repo_id,
        commit_message=args.commit_message,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
    )
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


def add_push(subparsers: Any) -> None:
    """Register `kangaroo-hf push FOLDER REPO_ID`."""
    parser = subparsers.add_parser("push", help="upload a saved Kangaroo adapter folder (card included) to the Hub")
    parser.add_argument("folder", help="folder written by KangarooForCausalLM.save_pretrained")
    parser.add_argument("repo_id", help="target repo, e.g. your-name/smollm2-135m-kangaroo")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--revision", default=None, help="branch to push to")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument(
        "--refresh-card", action="store_true", help="re-render README.md from config and metrics before pushing"
    )
    parser.set_defaults(handler=_run_push)


__all__ = ["add_push"]
