"""ComfyUI model-folder registration shared by the pack's loaders (imports ComfyUI)."""
from __future__ import annotations

import folder_paths


def ensure_folder(key: str, default_paths, extensions) -> None:
    """Register ``key`` with its default paths and extensions, keeping paths that an
    extra_model_paths.yaml (read by ComfyUI before custom nodes load) already added."""
    entry = folder_paths.folder_names_and_paths.get(key)
    if entry is None:
        folder_paths.folder_names_and_paths[key] = (list(default_paths), set(extensions))
        return
    paths, exts = entry
    for p in default_paths:
        if p not in paths:
            paths.append(p)
    exts.update(extensions)
