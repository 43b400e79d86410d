"""Models from ModelScope through the `modelscope` package (the optional `modelscope` extra); MODELSCOPE_CACHE
honoured."""

from __future__ import annotations

from pathlib import Path

from service.sources.errors import ModelSourceError


def resolve(model_id: str, revision: str | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ModelSourceError(f"modelscope:{model_id}: needs the modelscope package (pip install modelscope)") from exc
    try:
        return Path(snapshot_download(model_id, revision=revision or "master"))
    except Exception as exc:  # modelscope raises many kinds
        raise ModelSourceError(f"modelscope:{model_id}: {exc}") from exc
