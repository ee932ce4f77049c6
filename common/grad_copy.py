"""Copies of loaded ComfyUI modules that autograd may use (no ComfyUI import).

ComfyUI loads models under ``torch.inference_mode()`` and, in newer versions, loads weights
*dynamically* (DynamicVRAM, ``ModelPatcherDynamic``): a layer keeps its weights on the host and
casts them into a slice of a virtual VRAM area at forward time. The layer and the model's root
then carry runtime objects that own native memory (comfy-aimdo ``ModelVBAR`` / ``HostBuffer``
wrappers whose ``__del__`` frees it) and cast hooks (``comfy_cast_weights``, ``weight_function``).

A plain ``copy.deepcopy`` duplicates those owners (the copy's garbage collection would free the
original's memory) and keeps the dynamic cast path, which hands autograd reused cast buffers.
:func:`plain_resident_copy` instead shares every runtime object during the copy, strips them from
the copy, turns the cast hooks off and puts the copy's own weights on the device: an ordinary
module, independent of how ComfyUI loaded the original.
"""
from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch

# per-module runtime state of ComfyUI's loaders (legacy lowvram and DynamicVRAM, v0.33 - v0.38)
RUNTIME_ATTRS = ("_v", "_v_signature", "_v_weight", "_v_bias", "_v_block", "_prefetch", "_pin_state", "_pins",
                 "weight_lowvram_function", "bias_lowvram_function", "weight_function", "bias_function",
                 "prev_comfy_cast_weights", "dynamic_vbars", "dynamic_pins", "dynamic_patchers", "_comfy_graph",
                 "_comfy_malloc_graph", "seed_key")


def plain_resident_copy(module: torch.nn.Module, device, dtype: Optional[torch.dtype] = None,
                        skip: Iterable[torch.nn.Module] = ()) -> torch.nn.Module:
    """A grad-capable copy of ``module`` on ``device`` (``None``: each tensor where it is; floating
    weights cast to ``dtype`` if given)
    without the submodules in ``skip`` (they become ``None``) and without ComfyUI's runtime state.

    Runtime objects are shared during the copy (never duplicated, so nothing the original owns is
    freed twice) and then removed from the copy; ``comfy_cast_weights`` is off and the cast hook
    lists are empty, so every layer runs its plain forward on its own weights."""
    memo = {id(m): None for m in skip}
    for m in module.modules():
        for k in RUNTIME_ATTRS:
            if k in m.__dict__:
                v = m.__dict__[k]
                memo[id(v)] = v
    with torch.inference_mode(False):
        out = copy.deepcopy(module, memo)
        for m in out.modules():
            for k in RUNTIME_ATTRS:
                m.__dict__.pop(k, None)
            if hasattr(m, "comfy_cast_weights"):
                m.comfy_cast_weights = False
                m.weight_function, m.bias_function = [], []
        if device is not None:
            out.to(device=device)
        if dtype is not None:
            for p in list(out.parameters()) + list(out.buffers()):
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
        out.requires_grad_(False)
    return out


def copy_bytes(module: torch.nn.Module, dtype: Optional[torch.dtype] = None,
               skip: Iterable[torch.nn.Module] = ()) -> int:
    """Bytes that :func:`plain_resident_copy` of ``module`` (with ``dtype`` and ``skip``) will hold:
    its parameters and buffers, floating ones at ``dtype`` where given, shared tensors once."""
    skipped = {id(t) for m in skip for t in list(m.parameters()) + list(m.buffers())}
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen or id(t) in skipped:
            continue
        seen.add(id(t))
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() \
            else t.element_size()
        total += t.numel() * size
    return total
