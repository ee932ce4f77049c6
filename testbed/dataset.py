"""ShapePairs: a procedural, class-labelled 16x16 RGB dataset with classes confusable in pairs.

Ten classes in five pairs that differ in one detail, so a small unguided model often draws
something in between:

    0 disc        / 1 ring          (is the centre filled?)
    2 square      / 3 diamond       (rotated by 45 degrees; both get +-15 degrees of jitter)
    4 plus        / 5 tee           (does the vertical bar continue below the crossing?)
    6 triangle up / 7 triangle down
    8 two dots    / 9 three dots

Nuisances, independent of the class: the shape's position (+-1/8 of the image), size (x0.8..1.2), rotation
jitter, its colour (any hue, high saturation), and the background (a smooth two-colour gradient in
a contrasting brightness). Every image is a pure function of (seed, index): generating is
deterministic and needs no download; nothing is stored on disk. Pixels are in [-1, 1] (EDM2's
pixel convention); ``to_unit`` maps them to [0, 1].
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

CLASS_NAMES = ("disc", "ring", "square", "diamond", "plus", "tee", "triangle up", "triangle down",
               "two dots", "three dots")
PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
NUM_CLASSES = len(CLASS_NAMES)
PARTNER = torch.tensor([next(q[1 - q.index(k)] for q in PAIRS if k in q) for k in range(NUM_CLASSES)])  # the other member
PAIR_OF = torch.tensor([next(i for i, p in enumerate(PAIRS) if k in p) for k in range(NUM_CLASSES)])  # class -> pair
RESOLUTION = 16
# 16x16 since the testbed's second generation: at 32x32 a 2-core CPU trained the main model for
# 1200 iterations (26 min) and it drew blobs (41.5 % of its samples in the right pair); at 16x16 an
# iteration costs a third as much and the shapes stay legible (docs/testbed.md).


def _hsv_to_rgb(h, s, v):
    """h, s, v in [0, 1] (tensors [N]) -> [N, 3] RGB in [0, 1]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _soft(d: torch.Tensor, px: float) -> torch.Tensor:
    """Coverage of a signed distance d (negative inside), anti-aliased over about one pixel."""
    return torch.sigmoid(-d / (0.5 * px))


def _sd_box(u, v, hx, hy):
    qx, qy = u.abs() - hx, v.abs() - hy
    return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.clamp(torch.maximum(qx, qy), max=0)


def _sd_triangle(u, v, r):
    """Equilateral triangle pointing up (+v) with circumradius r: the larger of the distances to
    the slanted edges, (sqrt(3) |u| + v - r) / 2, and to the base, -v - r/2."""
    return torch.maximum((math.sqrt(3.0) * u.abs() + v - r) / 2, -v - r / 2)


def shape_coverage(cls: torch.Tensor, u: torch.Tensor, v: torch.Tensor, px: float) -> torch.Tensor:
    """Coverage in [0, 1] of class ``cls`` [N] at shape-frame coordinates u, v [N, H, W] (unit size ~1)."""
    out = torch.zeros_like(u)
    r = torch.sqrt(u ** 2 + v ** 2)
    masks = {
        0: _soft(r - 0.8, px),
        1: _soft((r - 0.62).abs() - 0.2, px),
        2: _soft(_sd_box(u, v, 0.66, 0.66), px),
        4: _soft(torch.minimum(_sd_box(u, v, 0.8, 0.2), _sd_box(u, v, 0.2, 0.8)), px),
        5: _soft(torch.minimum(_sd_box(u, v - 0.6, 0.8, 0.2), _sd_box(u, v + 0.1, 0.2, 0.7)), px),
        6: _soft(_sd_triangle(u, v + 0.1, 0.95), px),
        7: _soft(_sd_triangle(u, -v + 0.1, 0.95), px),
        8: _soft(torch.minimum(torch.sqrt((u - 0.42) ** 2 + v ** 2), torch.sqrt((u + 0.42) ** 2 + v ** 2)) - 0.3, px),
        9: _soft(torch.minimum(torch.minimum(torch.sqrt((u - 0.5) ** 2 + (v + 0.3) ** 2),
                                             torch.sqrt((u + 0.5) ** 2 + (v + 0.3) ** 2)),
                               torch.sqrt(u ** 2 + (v - 0.5) ** 2)) - 0.3, px),
    }
    c45, s45 = math.cos(math.pi / 4), math.sin(math.pi / 4)
    masks[3] = _soft(_sd_box(c45 * u - s45 * v, s45 * u + c45 * v, 0.6, 0.6), px)
    for k, m in masks.items():
        out = torch.where((cls == k)[:, None, None], m, out)
    return out


def render(labels: torch.Tensor, generator: torch.Generator, size: int = RESOLUTION) -> torch.Tensor:
    """Images [N, 3, size, size] in [-1, 1] of the given classes, nuisances drawn from ``generator``."""
    n = labels.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    scale = 0.8 + 0.4 * rand(n)                      # shape radius ~ 0.32 * size * scale
    angle = (rand(n) - 0.5) * (math.pi / 6)          # +-15 degrees
    shift = (rand(n, 2) - 0.5) * 0.5                 # +-1/8 of the image in [-1, 1] coordinates
    hue, sat = rand(n), 0.6 + 0.4 * rand(n)
    fg_v = rand(n)
    bright_fg = fg_v > 0.5
    fg_v = torch.where(bright_fg, 0.75 + 0.25 * fg_v, 0.25 + 0.3 * fg_v)
    bg_v = torch.where(bright_fg, 0.1 + 0.25 * rand(n), 0.7 + 0.25 * rand(n))
    fg = _hsv_to_rgb(hue, sat, fg_v)
    bg1 = _hsv_to_rgb(rand(n), 0.5 * rand(n), bg_v)
    bg2 = _hsv_to_rgb(rand(n), 0.5 * rand(n), (bg_v + 0.15 * (rand(n) - 0.5)).clamp(0, 1))
    theta = rand(n) * 2 * math.pi

    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(-lin, lin, indexing="ij")
    x = xx[None] - shift[:, 0, None, None]
    y = yy[None] - shift[:, 1, None, None]
    ca, sa = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    unit = (0.64 * scale)[:, None, None]             # shape-frame unit in image coordinates
    u = (ca * x + sa * y) / unit
    v = (-sa * x + ca * y) / unit
    px = 2.0 / size / float(unit.mean())
    cov = shape_coverage(labels, u, v, px)[:, None]
    g = (torch.cos(theta)[:, None, None] * xx[None] + torch.sin(theta)[:, None, None] * yy[None] + 1.5) / 3
    bg = bg1[:, :, None, None] * (1 - g[:, None]) + bg2[:, :, None, None] * g[:, None]
    img = bg * (1 - cov) + fg[:, :, None, None] * cov
    return img * 2 - 1


def make_split(n: int, seed: int, labels: Optional[torch.Tensor] = None, size: int = RESOLUTION,
               chunk: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (balanced classes unless ``labels`` is given), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    if labels is None:
        labels = torch.arange(n) % NUM_CLASSES
        labels = labels[torch.randperm(n, generator=g)]
    imgs = [render(labels[i:i + chunk], g, size) for i in range(0, n, chunk)]
    return torch.cat(imgs) if imgs else torch.zeros(0, 3, size, size), labels


# Disjoint seeds per use, so that no classifier or metric ever sees the model's training images.
SEEDS = {"diffusion": 1, "guidance_classifier": 2, "eval_classifier": 3, "reference": 4, "classifier_val": 5}


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1)
