"""``qdlm-export push``: upload a checkpoint to the Hugging Face Hub."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .console import out
from .options import CheckpointFolder, JsonResult, examples
from .progress_bars import hub_progress_bars

EXAMPLES = examples(
    "qdlm-export push llada-w4 me/LLaDA-8B-Instruct-qdlm-w4",
    "qdlm-export push llada-w4 me/LLaDA-8B-Instruct-qdlm-w4 --private --revision w4-g128",
    "qdlm-export push llada-w4 org/LLaDA-8B-Instruct-qdlm-w4 --create-pr --license mit",
    "qdlm-export push llada-w4 me/LLaDA-8B-Instruct-qdlm-w4 --exclude '*.py' --delete 'old/*'",
)
Patterns = Optional[list[str]]


def push(
    folder: CheckpointFolder,
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Target Hub repo, e.g. your-name/LLaDA-8B-Instruct-w4.")],
    private: Annotated[bool, typer.Option(help="Create the repo as private (if it does not exist yet).")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to commit to (created if missing) [default: main].")] = None,
    commit_message: Annotated[Optional[str], typer.Option(help="Commit message [default: a description of the checkpoint].")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing to the branch.")] = False,
    include: Annotated[Patterns, typer.Option(metavar="GLOB", help="Upload only files matching GLOB (repeatable).")] = None,
    exclude: Annotated[Patterns, typer.Option(metavar="GLOB", help="Do not upload files matching GLOB (repeatable).")] = None,
    delete: Annotated[Patterns, typer.Option(metavar="GLOB", help="Delete files matching GLOB from the repo in the same commit (repeatable).")] = None,
    delete_stale: Annotated[bool, typer.Option(help="Delete weight files on the Hub that this upload does not replace (e.g. model.safetensors after re-sharding).")] = True,
    large_folder: Annotated[Optional[bool], typer.Option("--large-folder/--no-large-folder", help="Upload with huggingface_hub's resumable large-folder upload (no pull request) [default: above 5 GB, unless --create-pr].", show_default=False)] = None,
    license: Annotated[Optional[str], typer.Option(help="License id for the model card metadata, e.g. apache-2.0 [default: the source model card's: its recorded local folder's, else its Hub repo's].")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="Hub id of the original model for the card [default: from the source].")] = None,
    token: Annotated[Optional[str], typer.Option(help="Hugging Face token [default: HF_TOKEN or the saved login]; never printed.", show_default=False)] = None,
    as_json: JsonResult = False,
) -> None:
    """Upload a checkpoint to the Hugging Face Hub (token from --token, HF_TOKEN or `hf auth login`)."""
    from ..hub.push import push_checkpoint

    with hub_progress_bars(disable=as_json):
        result = push_checkpoint(
            folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token,
            create_pr=create_pr, include=include or (), exclude=exclude or (), delete=delete or (),
            delete_stale=delete_stale, large_folder=large_folder, license=license, base_model=base_model,
        )
    if as_json:
        typer.echo(json.dumps(result.__dict__, indent=2))
        return
    where = f"pull request {result.pr_url}" if result.pr_url else result.commit_url
    out.print(f"Uploaded {folder} to {result.repo_url} (commit {result.commit_oid[:10]}): {where}")
    if result.deleted:
        out.print(f"Deleted from the repo: {', '.join(result.deleted)}")
