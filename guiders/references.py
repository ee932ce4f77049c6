"""Reference conditioning: the CONDITIONING that asks the model for class k.

Two sources, chosen by the guider node:

* class-label models (EDM2, the testbed): the positive conditioning carries a one-hot
  ``class_labels`` tensor; the reference is the same conditioning with the label set to k;
* text-to-image models: the class name is put into a prompt template ("a photo of a {}") and
  encoded with the CLIP given to the node; encodings are cached per class.

Works on ComfyUI's CONDITIONING lists ``[[tensor, dict], ...]`` without importing ComfyUI.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .config import GFCGInputError

CLASS_LABEL_KEY = "class_labels"


def has_class_labels(conditioning) -> bool:
    return bool(conditioning) and all(CLASS_LABEL_KEY in c[1] for c in conditioning)


def short_name(description: str) -> str:
    """'goldfish, Carassius auratus' -> 'goldfish' (the first synonym, for prompt templates)."""
    return description.split(",")[0].strip()


class LabelReference:
    """Reference conditioning for class-label models: the positive conditioning with its one-hot
    ``class_labels`` replaced by class k (same width, same batch)."""

    def __init__(self, positive):
        if not has_class_labels(positive):
            raise GFCGInputError("positive: the conditioning carries no class label; use a class-label "
                                 "conditioning (e.g. the EDM2 Class Label node) or connect a CLIP for text models")
        self.positive = positive
        self.num_labels = int(positive[0][1][CLASS_LABEL_KEY].shape[-1])

    def __call__(self, k: int):
        out = []
        for tensor, d in self.positive:
            lab = d[CLASS_LABEL_KEY]
            onehot = torch.zeros_like(lab)
            onehot[..., int(k)] = 1.0
            out.append([tensor, {**d, CLASS_LABEL_KEY: onehot}])
        return out


class TextReference:
    """Reference conditioning for text models: ``template.format(name_k)`` encoded with ``clip``
    (any object with ComfyUI's CLIP ``tokenize`` / ``encode_from_tokens_scheduled``), cached per class."""

    def __init__(self, clip, template: str, class_names: Sequence[str]):
        if "{}" not in template:
            raise GFCGInputError(f"prompt_template: {template!r} must contain '{{}}' where the class name goes, "
                                 "e.g. 'a photo of a {}'")
        if len(template) > 2000:
            raise GFCGInputError(f"prompt_template: {len(template)} characters is too long (at most 2000)")
        self.clip = clip
        self.template = template
        self.class_names = list(class_names)
        self._cache: Dict[int, List] = {}

    def prompt(self, k: int) -> str:
        return self.template.replace("{}", short_name(self.class_names[int(k)]))

    def __call__(self, k: int):
        k = int(k)
        if k not in self._cache:
            tokens = self.clip.tokenize(self.prompt(k))
            self._cache[k] = self.clip.encode_from_tokens_scheduled(tokens)
        return self._cache[k]
