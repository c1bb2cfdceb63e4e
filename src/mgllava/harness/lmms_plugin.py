"""The entry point lmms-eval loads from the group `lmms_eval.models` (pyproject.toml): `--model mgllava` is
`harness.lmms.MGLlavaLmms`. Kept apart from that module, which lmms-eval imports only when the model is
used: lmms-eval loads every entry point while building its model registry, on every run."""

from __future__ import annotations

from typing import Any

MODEL_ID = "mgllava"
CLASS_PATH = "mgllava.harness.lmms.MGLlavaLmms"


def manifest() -> Any:
    """lmms-eval's `ModelManifest` for the model (called by its registry, so lmms-eval is importable)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
