"""``qdlm-export push``: upload a checkpoint to the Hugging Face Hub."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .console import out
from .options import CheckpointFolder, JsonResult, examples

EXAMPLES = examples(
    "qdlm-export push llada-w4 me/LLaDA-8B-Instruct-qdlm-w4",
    "qdlm-export push llada-w4 me/LLaDA-8B-Instruct-qdlm-w4 --private --revision w4-g128",
)


def push(
    folder: CheckpointFolder,
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Target Hub repo, e.g. your-name/LLaDA-8B-Instruct-w4.")],
    private: Annotated[bool, typer.Option(help="Create the repo as private (if it does not exist yet).")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to commit to (created if missing) [default: main].")] = None,
    commit_message: Annotated[Optional[str], typer.Option(help="Commit message [default: a description of the checkpoint].")] = None,
    as_json: JsonResult = False,
) -> None:
    """Upload a checkpoint to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`)."""
    from ..hub.push import push_checkpoint

    result = push_checkpoint(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    if as_json:
        typer.echo(json.dumps(result.__dict__, indent=2))
    else:
        out.print(f"Uploaded {folder} to {result.repo_url} (commit {result.commit_oid[:10]}): {result.commit_url}")
