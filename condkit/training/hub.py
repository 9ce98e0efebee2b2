"""`--push-to-hub REPO`: upload a finished run folder (its conditioner, model card, loss curve, last
validation grid — not its checkpoints) to a Hugging Face model repository.

    check_can_push("me/my-wiclp")             # before training: refuses offline mode and bad names
    push_run_to_hub(run_dir, "me/my-wiclp")   # after saving: huggingface_hub.upload_folder

Uploading needs the network and a token (`hf auth login` or HF_TOKEN); it is not exercised by the
tests, which run offline. A failed upload is one line; the run folder stays complete on disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
NOT_UPLOADED = ["checkpoints/*", "checkpoints/**", ".*"]


def check_can_push(repo: str) -> None:
    """Refuse, before any work, a repository name that is not OWNER/NAME or a session that is offline."""
    if not REPO_PATTERN.match(repo):
        raise ValueError(f"--push-to-hub {repo!r} is not a repository id; expected OWNER/NAME")
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")  # as set now, not at import
    if constants.HF_HUB_OFFLINE or offline:
        raise ValueError(f"--push-to-hub {repo!r} needs the network, but HF_HUB_OFFLINE is set")


def push_run_to_hub(folder: str | Path, repo: str) -> str:
    """Create (if needed) the model repo and upload the run folder; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo, repo_type="model", exist_ok=True)
        commit = upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                               ignore_patterns=NOT_UPLOADED, commit_message="Upload condkit training run")
    except Exception as error:  # noqa: BLE001 - network, auth, permissions: all one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"could not push {str(folder)!r} to {repo!r} (the run is saved on disk): {first}") from None
    return str(getattr(commit, "commit_url", commit))
