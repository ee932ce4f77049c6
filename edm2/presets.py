"""EDM2 size presets and the published NVlabs checkpoints (facts from the pack's EDM2 note).

Every published network shares channel_mult (1, 2, 3, 4), 3 blocks per level, attention at 16x16
and 8x8, and a 64x64 working resolution; presets differ only in ``model_channels``. img512 models
work on 4-channel SD-VAE latents (64x64), img64 models on 3-channel pixels.
"""
from __future__ import annotations

from .network import EDM2Config

BASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"
LICENSE = "CC BY-NC-SA 4.0 (NVIDIA; non-commercial, share-alike)"

MODEL_CHANNELS = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
FAMILIES = {"img512": dict(img_channels=4), "img64": dict(img_channels=3)}
SIZES = {"img512": ("xs", "s", "m", "l", "xl", "xxl"), "img64": ("xs", "s", "m", "l", "xl")}  # img64-xs: the autoguidance guide

# Parameter counts (conditional, all 203 tensors) from the EDM2 note, in millions.
PUBLISHED_PARAMS_M = {"xs": 124.7, "s": 280.2, "m": 497.8, "l": 777.5, "xl": 1119.3, "xxl": 1523.2}


def preset_config(family: str, size: str, conditional: bool = True) -> EDM2Config:
    """The network config of a published preset, e.g. ("img512", "s")."""
    if family not in FAMILIES:
        raise ValueError(f"EDM2 family must be one of {sorted(FAMILIES)}, got {family!r}")
    if size not in MODEL_CHANNELS:
        raise ValueError(f"EDM2 size must be one of {list(MODEL_CHANNELS)}, got {size!r}")
    return EDM2Config(img_channels=FAMILIES[family]["img_channels"], label_dim=1000 if conditional else 0,
                      model_channels=MODEL_CHANNELS[size])



# Published post-hoc reconstructions used by NVlabs' presets: (preset, main file, guide file, w).
# A guide of None means no guidance (w = 1). "guid" = EDM2's CFG with a separate XS unconditional
# net; "autog" = autoguidance with a smaller / shorter-trained conditional net.
PRESET_FILES = [
    ("img512-xs-fid", "edm2-img512-xs-2147483-0.135.pkl", None, 1.0),
    ("img512-s-fid", "edm2-img512-s-2147483-0.130.pkl", None, 1.0),
    ("img512-m-fid", "edm2-img512-m-2147483-0.100.pkl", None, 1.0),
    ("img512-l-fid", "edm2-img512-l-1879048-0.085.pkl", None, 1.0),
    ("img512-xl-fid", "edm2-img512-xl-1342177-0.085.pkl", None, 1.0),
    ("img512-xxl-fid", "edm2-img512-xxl-0939524-0.070.pkl", None, 1.0),
    ("img64-s-fid", "edm2-img64-s-1073741-0.075.pkl", None, 1.0),
    ("img64-m-fid", "edm2-img64-m-2147483-0.060.pkl", None, 1.0),
    ("img64-l-fid", "edm2-img64-l-1073741-0.040.pkl", None, 1.0),
    ("img64-xl-fid", "edm2-img64-xl-0671088-0.040.pkl", None, 1.0),
    ("img512-xs-guid-fid", "edm2-img512-xs-2147483-0.045.pkl", "edm2-img512-xs-uncond-2147483-0.045.pkl", 1.40),
    ("img512-s-guid-fid", "edm2-img512-s-2147483-0.025.pkl", "edm2-img512-xs-uncond-2147483-0.025.pkl", 1.40),
    ("img512-m-guid-fid", "edm2-img512-m-2147483-0.030.pkl", "edm2-img512-xs-uncond-2147483-0.030.pkl", 1.20),
    ("img512-l-guid-fid", "edm2-img512-l-1879048-0.015.pkl", "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.20),
    ("img512-xl-guid-fid", "edm2-img512-xl-1342177-0.020.pkl", "edm2-img512-xs-uncond-2147483-0.020.pkl", 1.20),
    ("img512-xxl-guid-fid", "edm2-img512-xxl-0939524-0.015.pkl", "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.20),
    ("img512-s-autog-fid", "edm2-img512-s-2147483-0.070.pkl", "edm2-img512-xs-0134217-0.125.pkl", 2.10),
    ("img512-s-autog-dino", "edm2-img512-s-2147483-0.120.pkl", "edm2-img512-xs-0134217-0.165.pkl", 2.45),
    ("img512-xxl-autog-fid", "edm2-img512-xxl-0939524-0.075.pkl", "edm2-img512-m-0268435-0.155.pkl", 2.05),
    ("img512-xxl-autog-dino", "edm2-img512-xxl-0939524-0.130.pkl", "edm2-img512-m-0268435-0.205.pkl", 2.30),
    ("img512-s-uncond-autog-fid", "edm2-img512-s-uncond-2147483-0.070.pkl", "edm2-img512-xs-uncond-0134217-0.110.pkl", 2.85),
    ("img64-s-autog-fid", "edm2-img64-s-1073741-0.045.pkl", "edm2-img64-xs-0134217-0.110.pkl", 1.70),
    ("img64-s-autog-dino", "edm2-img64-s-1073741-0.105.pkl", "edm2-img64-xs-0134217-0.175.pkl", 2.20),
]
