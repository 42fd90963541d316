"""Share the exported student: ``sakd push RUN_DIR REPO_ID`` and ``train.push_to_hub``.

Through ``huggingface_hub``'s own client: ``HfApi.create_repo`` (exist_ok) then ``HfApi.upload_folder`` of the
run's ``student/`` folder (weights, tokenizer, the model card README.md with the held-out bits-per-byte table,
the teacher and the data). ``check_push`` runs first and alone: offline or without a token it stops with one
line before anything else (for ``train.push_to_hub``: before the run loads a model)."""

from __future__ import annotations

import os
from pathlib import Path

from sakd.errors import UserError

NEEDED = {"weights": ("*.safetensors", "*.bin"), "tokenizer": ("tokenizer.json", "tokenizer_config.json"),
          "model card": ("README.md",), "config": ("config.json",)}


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the variable is checked here as well so that a test
    # or a notebook that sets it later is obeyed
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_push(repo_id: str, token: str | None = None, key: str = "REPO_ID") -> str:
    """The token to push ``repo_id`` with (``token``, else HF_TOKEN or the saved login), or a ``UserError``:
    offline, no token, or a malformed repo id. Touches no network."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{key}={repo_id!r} is not a hub repo id: write owner/name, e.g. me/my-student") from None
    if _offline():
        raise UserError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set; unset it (with network) or push later "
                        "with `sakd push RUN_DIR REPO_ID`")
    token = token or get_token()
    if not token:
        raise UserError(f"cannot push to {repo_id!r}: no Hugging Face token; set HF_TOKEN (a write token from "
                        "https://huggingface.co/settings/tokens), pass --token, or run `hf auth login`")
    return token


def student_folder(run_dir) -> Path:
    """``RUN_DIR/student`` (or RUN_DIR itself when it is an exported student) holding weights, tokenizer,
    config and model card."""
    d = Path(run_dir).expanduser()
    folder = d / "student" if (d / "student").is_dir() else d
    if not folder.is_dir():
        raise UserError(f"run folder {str(d)!r} does not exist")
    missing = [what for what, patterns in NEEDED.items() if not any(any(folder.glob(p)) for p in patterns)]
    if missing:
        raise UserError(f"{str(folder)!r} holds no exported student ({', '.join(missing)} missing): finish the run "
                        "(sakd distill --resume) so that it exports one")
    return folder


def push_student(run_dir, repo_id: str, *, token: str | None = None, private: bool = False,
                 revision: str | None = None, commit_message: str | None = None, log=print) -> str:
    """Create ``repo_id`` if needed and upload the exported student folder; the URL of the commit."""
    import huggingface_hub

    token = check_push(repo_id, token)
    folder = student_folder(run_dir)
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             commit_message=commit_message or f"sakd: distilled student from {folder}")
    url = str(getattr(info, "commit_url", None) or info)
    log(f"pushed {folder} to https://huggingface.co/{repo_id} ({url})")
    return url
