"""Reference conditioning: the CONDITIONING that asks the model for class k.

Two sources, chosen by the guider node:

* class-label models (EDM2, the testbed): the positive conditioning carries a one-hot
  ``class_labels`` tensor; the reference is the same conditioning with the label set to k;
* text-to-image models: the class name is put into a prompt template ("a photo of a {}") and
  encoded with the CLIP given to the node; the reference is the positive conditioning with only its
  text part replaced by that encoding (:func:`replace_text`), so that the two branches differ in the
  class alone. Every prompt a run can need is encoded before sampling (:meth:`TextReference.prepare`),
  so no text encoder is loaded while the diffusion model samples; the encodings are kept per CLIP
  object (weakly: they go when ComfyUI drops the CLIP) and reused by later runs and guiders.

Works on ComfyUI's CONDITIONING lists ``[[tensor, dict], ...]`` without importing ComfyUI.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from ..common.errors import GFCGInputError

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


# Keys of a CONDITIONING entry's dict that a text encoder writes (``CLIP.encode_from_tokens`` /
# ``encode_from_tokens_scheduled``): the pooled output, the attention masks and the extra per-token
# conditionings of multi-encoder models, and the CLIP schedule's range. They belong to the text part,
# so they are dropped from the positive even when the reference encoding lacks them (encoders omit an
# attention mask with nothing masked: the positive's mask would not fit the reference tokens). Any
# other key that the reference encoding carries is text part too.
TEXT_KEYS = frozenset({
    "pooled_output", "attention_mask", "clip_start_percent", "clip_end_percent",
    "conditioning_lyrics", "conditioning_mt5xl", "attention_mask_mt5xl", "conditioning_llama3",
    "conditioning_byt5small",
})
# Keys an encoding may carry that are never text part: the hooks (a CLIP's ``apply_to_conds`` hooks
# patch the diffusion model's weights); the reference takes the positive's, so both branches run the
# same weights.
MODEL_KEYS = frozenset({"hooks"})
_CLIP_RANGE = ("clip_start_percent", "clip_end_percent")


def _check_conditioning(conditioning, name: str) -> None:
    if not isinstance(conditioning, (list, tuple)) or not all(
            isinstance(c, (list, tuple)) and len(c) >= 2 and isinstance(c[1], dict) for c in conditioning):
        raise GFCGInputError(f"{name}: not a CONDITIONING (a list of [tensor, dict] entries)")


def _matching(d: dict, encoded) -> list:
    """The entries of ``encoded`` for a positive entry ``d``: with a scheduled CLIP (hooks with
    keyframes) both carry a CLIP range, and an entry gets the reference entry of its own range;
    otherwise (or with no range in common) every entry of the encoding."""
    if all(k in d for k in _CLIP_RANGE):
        same = [e for e in encoded if all(k in e[1] and e[1][k] == d[k] for k in _CLIP_RANGE)]
        if same:
            return same
    return list(encoded)


def replace_text(positive, encoded) -> list:
    """The positive CONDITIONING with its text part replaced by ``encoded`` (a fresh text encoding,
    e.g. ``clip.encode_from_tokens_scheduled(tokens)``).

    Per entry of ``positive``: the cross-attention tensor and the text keys (those ``encoded``
    carries, and :data:`TEXT_KEYS`) come from the encoding; every other key of the entry is kept as
    it is: size conditioning (SDXL's width/height/crop_w/crop_h/target_width/target_height), Flux's
    ``guidance``, area/mask/strength/set_area_to_bounds, start_percent/end_percent, ControlNet and
    GLIGEN, ``hooks`` (:data:`MODEL_KEYS`; an encoding's hooks are dropped) and any other. A positive
    of several entries (ConditioningCombine, area conditioning) gives as many reference entries, each
    with the SAME reference text: the reference asks for the class everywhere the positive asks for
    its prompt. With a scheduled CLIP an entry gets the reference entry of its own CLIP range (see
    :func:`_matching`), so the count is kept there too. The token count, and so the tensor's shape,
    may differ from the positive's. Neither input is modified; tensors are shared, not copied."""
    text = set(TEXT_KEYS)
    for _, rd in encoded:
        text.update(k for k in rd if k not in MODEL_KEYS)
    out = []
    for _, d in positive:
        kept = {k: v for k, v in d.items() if k not in text}
        for rt, rd in _matching(d, encoded):
            out.append([rt, {**kept, **{k: v for k, v in rd.items() if k not in MODEL_KEYS}}])
    return out


# CLIP object -> {prompt: encoding}. Weak keys: an entry lives as long as ComfyUI keeps the CLIP (its
# loader's output), so nothing here keeps a model alive; the values are the encodings' tensors alone.
_ENCODINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def encodings_of(clip) -> Dict[str, list]:
    """The prompt -> encoding store of ``clip`` (a fresh dict for objects that take no weak reference)."""
    try:
        return _ENCODINGS.setdefault(clip, {})
    except TypeError:
        return {}


class TextReference:
    """Reference conditioning for text models: ``template.format(name_k)`` encoded with ``clip``
    (any object with ComfyUI's CLIP ``tokenize`` / ``encode_from_tokens_scheduled``) and put in place
    of the text part of ``positive`` (:func:`replace_text`). Without a positive (``None``) the bare
    encoding is the reference. Encodings are shared per CLIP object (:func:`encodings_of`); call
    :meth:`prepare` before sampling so that ``__call__`` never runs the text encoder in the loop."""

    def __init__(self, clip, template: str, class_names: Sequence[str], positive=None):
        if "{}" not in template:
            raise GFCGInputError(f"prompt_template: {template!r} must contain '{{}}' where the class name goes, "
                                 "e.g. 'a photo of a {}'")
        if len(template) > 2000:
            raise GFCGInputError(f"prompt_template: {len(template)} characters is too long (at most 2000)")
        if positive is not None:
            _check_conditioning(positive, "positive")
            if len(positive) == 0:
                raise GFCGInputError("positive: the conditioning is empty; connect the prompt's conditioning")
        self.clip = clip
        self.template = template
        self.class_names = list(class_names)
        self.positive = positive
        self._encodings = encodings_of(clip)
        self._cache: Dict[int, List] = {}
        self.encoded_in_loop = 0          # encodings __call__ had to make itself (none after prepare)

    def prompt(self, k: int) -> str:
        return self.template.replace("{}", short_name(self.class_names[int(k)]))

    def missing(self, classes: Iterable[int]) -> List[int]:
        """The classes among ``classes`` whose prompt has no encoding yet (each prompt once)."""
        out, seen = [], set()
        for k in classes:
            p = self.prompt(k)
            if p not in self._encodings and p not in seen:
                seen.add(p)
                out.append(int(k))
        return out

    def _encode(self, k: int) -> list:
        tokens = self.clip.tokenize(self.prompt(k))
        return self.clip.encode_from_tokens_scheduled(tokens)

    def prepare(self, classes: Iterable[int], progress: Optional[Callable[[int, int], None]] = None) -> int:
        """Encode every prompt of ``classes`` that is not encoded yet (``progress(done, total)`` after
        each); returns how many were encoded."""
        todo = self.missing(classes)
        for i, k in enumerate(todo):
            self._encodings[self.prompt(k)] = self._encode(k)
            if progress is not None:
                progress(i + 1, len(todo))
        return len(todo)

    def __call__(self, k: int):
        k = int(k)
        if k not in self._cache:
            p = self.prompt(k)
            if p not in self._encodings:
                self.encoded_in_loop += 1
                self._encodings[p] = self._encode(k)
            encoded = self._encodings[p]
            self._cache[k] = encoded if self.positive is None else replace_text(self.positive, encoded)
        return self._cache[k]
