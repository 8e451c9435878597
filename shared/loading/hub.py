"""Resolve `--model` to a local folder: an existing path, or a Hugging Face Hub snapshot."""

from __future__ import annotations

from pathlib import Path

# What a checkpoint needs at run time; other weight formats (.bin, .pth, .gguf) are skipped.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
]


class ModelNotFoundError(Exception):
    """The model is neither a local folder nor obtainable from the Hub."""


def resolve_model_path(model: str | Path, revision: str | None = None) -> Path:
    """Return a local folder for `model`, downloading from the Hub when it is a repo id.

    huggingface-hub shows its own progress bars and honours HF_HOME, HF_HUB_CACHE and
    HF_HUB_OFFLINE; offline with nothing cached becomes a one-line ModelNotFoundError.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model).startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path {model!r} is not a directory")
    return _download(str(model), revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise ModelNotFoundError(
                f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1"
                " forbids downloading it"
            ) from exc
        raise ModelNotFoundError(f"model {repo_id!r} could not be downloaded: {exc}") from exc
    except (RepositoryNotFoundError, HFValidationError) as exc:
        raise ModelNotFoundError(
            f"model {repo_id!r} is neither a local folder nor a Hub repository"
        ) from exc
