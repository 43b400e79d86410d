"""Models from the Hugging Face hub (or a mirror of it) through `huggingface_hub`: HF_ENDPOINT, HF_HUB_CACHE,
HF_TOKEN and HF_HUB_OFFLINE behave as users know them, and the hub cache is used in place, never copied."""

from __future__ import annotations

import os
from pathlib import Path

from service.sources.errors import ModelSourceError

# Only what a causal LM needs; skips other frameworks' weights (.bin/.h5/.onnx/.gguf) in the repo.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]


def resolve(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "not in the local hub cache (HF_HUB_OFFLINE is set)" if offline else "not reachable and not cached"
        raise ModelSourceError(f"hf:{repo_id}: {why}: {exc}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelSourceError(f"hf:{repo_id}: {exc}") from exc
    return Path(path)
