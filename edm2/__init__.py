"""EDM2 (NVlabs, Karras et al. 2024) for ComfyUI: our own network, safe checkpoint reading, latents.

Plain PyTorch; imports without ComfyUI. The ComfyUI model wrapper lives in ``comfy_model``.
"""
from .checkpoint import (CheckpointError, EDM2Checkpoint, build_network, load_edm2, read_checkpoint,
                         read_nvlabs_pickle, safe_unpickle, save_safetensors)
from .latents import EDM2_DEFAULT_ENCODER, edm2_to_raw, raw_to_edm2
from .network import EDM2, EDM2Config, UNet, count_parameters, precond_coefficients
from .presets import PRESET_FILES, preset_config

__all__ = [
    "CheckpointError", "EDM2Checkpoint", "build_network", "load_edm2", "read_checkpoint",
    "read_nvlabs_pickle", "safe_unpickle", "save_safetensors", "EDM2_DEFAULT_ENCODER", "edm2_to_raw",
    "raw_to_edm2", "EDM2", "EDM2Config", "UNet", "count_parameters", "precond_coefficients",
    "PRESET_FILES", "preset_config",
]
