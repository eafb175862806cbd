"""`vqrae-push FOLDER --repo-id org/name`: publish a saved VQRAE folder to the Hub (`vqrae.training.hub`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from ..training.hub import HubPublishError, push_to_hub
from .common import parse_dataclasses, run_cli, setup_logging

__all__ = ["main"]


@dataclass(kw_only=True)
class PushArguments:
    """Options of `vqrae-push FOLDER` (see `--help`)."""

    repo_id: str = field(metadata={"help": "The Hub repository, org/name (created when missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repository private."})
    revision: str | None = field(
        default=None, metadata={"help": "Commit to this branch instead of main (created if missing)."}
    )
    commit_message: str | None = field(default=None, metadata={"help": "The commit message."})


def _push_command(argv: list[str] | None = None) -> int:
    setup_logging()
    description = (
        "Publish a saved VQRAE model folder (weights, model code, model card, pictures, results) to the Hugging Face "
        "Hub in one commit. Log in first with `hf auth login` or set HF_TOKEN."
    )
    positional = [("folder", "the folder written by save_pretrained / vqrae-train")]
    args, extra = parse_dataclasses(PushArguments, "vqrae-push", description, argv, positional)
    try:
        info = push_to_hub(
            extra["folder"],
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except (ValueError, HubPublishError) as error:  # a bad folder or repo id, offline, no token, no network
        raise UsageError(str(error)) from error
    print(info.commit_url)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`vqrae-push FOLDER --repo-id org/name [--private] [--revision BRANCH]`; a user error (a bad folder or repo id,
    offline mode, no token, no connection to the Hub) is one line on stderr and exit status 2
    (`vqrae.cli.common.run_cli`)."""
    return run_cli("vqrae-push", _push_command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
