"""Tiny real ComfyUI models for the integration tests (import after ``conftest.load_comfy``).

A class-conditional pixel-space EDM model (sigma_data 0.5) whose conditioning carries a one-hot
``class_labels`` tensor -- the convention the pack's class-label models use -- and a counter of
its forwards; a small timm classifier saved to safetensors and loaded through the pack's node.
"""
from __future__ import annotations

import math
import os

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base

K = 10  # classes


class TinyNet(torch.nn.Module):
    """F(x; c_noise, y): two convs with a class and noise embedding. Records each forward's batch."""

    def __init__(self, seed=0, width=16, classes=K, channels=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)
        self.emb = torch.nn.Linear(classes, width)
        self.temb = torch.nn.Linear(1, width)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.dtype = torch.float32
        self.calls = []

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kw):
        self.calls.append(x.shape[0])
        h = self.inp(x) + self.temb(timesteps.view(-1, 1).to(x.dtype))[..., None, None]
        if y is not None:
            h = h + self.emb(y.to(x.dtype))[..., None, None]
        return self.out(torch.nn.functional.silu(h))


class PixelFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 3

    def process_in(self, latent):
        return latent

    def process_out(self, latent):
        return latent


class TinyConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    sampling_settings = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
    latent_format = PixelFormat
    memory_usage_factor = 0.01
    supported_inference_dtypes = [torch.float32]

    def __init__(self):
        super().__init__({"disable_unet_model_creation": True})


class TinyLatentConfig(TinyConfig):
    latent_format = comfy.latent_formats.SD15


class TinyModel(comfy.model_base.BaseModel):
    def __init__(self, net, config=None):
        super().__init__(config or TinyConfig(), comfy.model_base.ModelType.EDM, device=torch.device("cpu"))
        self.diffusion_model = net

    def extra_conds(self, **kwargs):
        out = {}
        labels = kwargs.get("class_labels")
        if labels is not None:
            out["y"] = comfy.conds.CONDRegular(labels)
        return out


def tiny_model(seed=0, width=16, latent=False):
    net = TinyNet(seed, width, channels=4 if latent else 3)
    model = TinyModel(net, TinyLatentConfig() if latent else None)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev), net


def label_cond(k, classes=K):
    onehot = torch.zeros(1, classes)
    if k is not None:
        onehot[0, k] = 1.0
    return [[torch.zeros(1, 1, 1), {"class_labels": onehot}]]


def pixel_vae():
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def random_taesd_state(latent_channels=4, seed=0):
    """The state dict of ComfyUI's TAESD (encoder + decoder) with random weights (ComfyUI builds
    layers without init: give every weight a real value)."""
    import comfy.taesd.taesd

    g = torch.Generator().manual_seed(seed)
    sd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels).state_dict()
    for k, v in sd.items():
        if k.endswith("weight") and v.ndim > 1:
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(v[0].numel())
        elif k.endswith("bias"):
            sd[k] = torch.zeros(v.shape)
    return sd


def taesd_vae(seed=0):
    """A real ComfyUI VAE (TAESD architecture, 4-channel latents, x8) with random weights."""
    return comfy.sd.VAE(sd=random_taesd_state(4, seed))


def save_classifier(folder, name="tiny_resnet.safetensors", arch="test_resnet", seed=0, classes=K, metadata=True):
    import timm

    from comfyui_gfcg.classifiers import save_timm_classifier

    torch.manual_seed(seed)
    net = timm.create_model(arch, pretrained=False, num_classes=classes)
    path = os.path.join(folder, name)
    if metadata:
        save_timm_classifier(path, net, arch, class_names=[f"shape {i}, s{i}" for i in range(classes)],
                             data_config={"input_size": [3, 32, 32], "crop_pct": 1.0})
    else:
        from safetensors.torch import save_file

        save_file(dict(net.state_dict()), path)
    return path
