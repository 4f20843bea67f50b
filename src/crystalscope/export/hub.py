"""``export --push-to-hub ORG/NAME``: an export's files to a Hugging Face hub model repository
(huggingface_hub's ``HfApi``: the repository is created when missing, private unless asked
otherwise, then the files are uploaded in one commit)."""

from __future__ import annotations

import re
from pathlib import Path

from crystalscope.errors import UserError
from crystalscope.model.spec import RunLayout
from crystalscope.settings import SettingsError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` as the hub spells repository ids, else a one-line SettingsError."""
    if not REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise SettingsError("push_to_hub", "give the hub repository as ORG/NAME, e.g. "
                            "my-lab/cex-pg-resnet50", repo_id)
    return repo_id


def hub_files(folder: Path) -> list[Path]:
    """The export's files in ``folder`` that go to the hub: the card and the model files (not
    the run's checkpoints, logs or reports)."""
    return [p for p in RunLayout(Path(folder)).exported if p.is_file()]


def push_to_hub(folder: Path, repo_id: str, *, private: bool = True,
                token: str | None = None) -> str:
    """Upload :func:`hub_files` of ``folder`` to ``repo_id``; the commit's URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    files = hub_files(folder)
    if not RunLayout(Path(folder)).onnx.is_file():
        raise UserError(f"{folder}: holds no exported model to push")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   allow_patterns=[p.name for p in files],
                                   commit_message="crystalscope export")
    except Exception as exc:  # offline, no token, no rights: the same advice
        why = (str(exc).splitlines() or [""])[0][:200]
        raise UserError(f"could not push to the Hugging Face hub repository {repo_id} "
                        f"({type(exc).__name__}: {why}); log in with `hf auth login` or set "
                        "HF_TOKEN, and check the network; the export itself is complete in "
                        f"{folder}") from exc
    return str(getattr(commit, "commit_url", commit))
