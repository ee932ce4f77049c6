"""Class vocabularies: ImageNet-1k names from timm, and resolving a user's class by name or index."""
from __future__ import annotations

import difflib
from functools import lru_cache
from typing import List, Sequence, Union

from ..common.errors import GFCGInputError


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple:
    """The 1000 ImageNet-1k class descriptions in index order, from timm's ImageNetInfo
    (e.g. index 1 = 'goldfish, Carassius auratus')."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


def _synonyms(name: str) -> List[str]:
    return [s.strip().lower() for s in name.split(",") if s.strip()]


def resolve_class(spec: Union[int, str], names: Sequence[str], input_name: str = "desired_class") -> int:
    """Index of the class ``spec`` in ``names``: an integer index (int or digit string), the full
    name, or any of its comma-separated synonyms (case-insensitive). Errors name ``input_name``,
    the allowed range and the closest names."""
    n = len(names)
    if isinstance(spec, bool):
        raise GFCGInputError(f"{input_name}: expected a class name or index, got {spec!r}")
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().lstrip("-").isdigit()):
        idx = int(spec)
        if not 0 <= idx < n:
            raise GFCGInputError(f"{input_name}: class index {idx} is out of range; this classifier has {n} classes (0..{n - 1})")
        return idx
    if not isinstance(spec, str) or not spec.strip():
        raise GFCGInputError(f"{input_name}: give a class name or an index 0..{n - 1}, got {spec!r}")
    key = spec.strip().lower()
    for i, name in enumerate(names):
        if key == name.strip().lower() or key in _synonyms(name):
            return i
    flat = {syn: i for i, name in enumerate(names) for syn in _synonyms(name)}
    close = difflib.get_close_matches(key, list(flat), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise GFCGInputError(f"{input_name}: unknown class name {spec!r} (this classifier has {n} classes; "
                         f"give one of its names or an index 0..{n - 1}){hint}")
