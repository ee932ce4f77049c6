"""The committed testbed models (``testbed/weights``), loaded through the pack's own loaders:
the EDM2 reader for the diffusion models, the timm classifier loader for both classifiers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import torch

from ..classifiers.timm_classifier import ImageClassifier, load_timm_classifier
from ..edm2.checkpoint import load_edm2
from .files import FILES, WEIGHTS_DIR


@dataclass
class Testbed:
    main: torch.nn.Module                  # class-conditional EDM2 (zero label = unconditional)
    guide: torch.nn.Module                 # the smaller, shorter-trained autoguidance model
    guidance_classifier: ImageClassifier   # what GFCG reads
    eval_classifier: ImageClassifier       # what the metrics read; never guides


def weights_path(name: str, weights_dir: str = WEIGHTS_DIR) -> str:
    path = os.path.join(weights_dir, FILES[name])
    if not os.path.exists(path):
        raise FileNotFoundError(f"testbed weights {path!r} are missing; train them with "
                                f"`python -m comfyui_gfcg train --only {name}`")
    return path


def load_testbed(dtype="float32", weights_dir: str = WEIGHTS_DIR) -> Testbed:
    """The four models; ``dtype`` ("float32" | "bfloat16" | "float16") is the diffusion trunks'."""
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    main, _ = load_edm2(weights_path("main", weights_dir), dt)
    guide, _ = load_edm2(weights_path("guide", weights_dir), dt)
    return Testbed(main.requires_grad_(False), guide.requires_grad_(False),
                   load_timm_classifier(weights_path("guidance_classifier", weights_dir)),
                   load_timm_classifier(weights_path("eval_classifier", weights_dir)))


@torch.no_grad()
def logits_and_features(clf: ImageClassifier, images01: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One forward of a timm classifier: its logits and its penultimate (pre-logits) features."""
    net = clf.net
    x = clf.preprocess(images01).to(clf.dtype)
    feats = net.forward_head(net.forward_features(x), pre_logits=True)
    return net.get_classifier()(feats).float(), feats.float()
