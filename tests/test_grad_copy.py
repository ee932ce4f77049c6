"""The grad-capable copy of a loaded VAE decoder (common.grad_copy), framework-free: a module laid
out as ComfyUI's loaders leave it -- weights made under inference mode, comfy.ops cast hooks on,
and (DynamicVRAM) runtime objects that own native memory on layers and on the root."""
import gc

import pytest
import torch

from comfyui_gfcg.common.grad_copy import RUNTIME_ATTRS, plain_resident_copy


class NativeOwner:
    """Stands for comfy-aimdo's ModelVBAR / HostBuffer: frees native memory in ``__del__``."""
    freed = 0

    def __deepcopy__(self, memo):
        raise AssertionError("a native-memory owner was duplicated")

    def __del__(self):
        NativeOwner.freed += 1


class CastConv(torch.nn.Conv2d):
    """A comfy.ops-style layer: with cast hooks on, the forward would not use its own weights."""
    comfy_cast_weights = False

    def forward(self, x):
        if self.comfy_cast_weights or self.weight_function:
            raise RuntimeError("dynamic cast path taken")
        return super().forward(x)


class FirstStage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Conv2d(3, 4, 1)
        self.decoder = torch.nn.Sequential(CastConv(4, 8, 3, padding=1), torch.nn.SiLU(), CastConv(8, 3, 1))

    def decode(self, z):
        return self.decoder(z)


def loaded_like_comfyui_dynamic():
    with torch.inference_mode():
        m = FirstStage()
    owners = []
    for layer in m.decoder:
        if isinstance(layer, CastConv):
            layer.comfy_cast_weights = True
            layer.weight_function, layer.bias_function = [lambda w: w * 0], []
            owners.append(NativeOwner())
            layer._v = (owners[-1], 0, 1024)
            layer._pin_state = {"pinned": True}
            layer.prev_comfy_cast_weights = False
    m.dynamic_pins = {"cuda:0": NativeOwner()}
    m.dynamic_vbars = {"cuda:0": NativeOwner()}
    return m


def test_copy_shares_no_native_owner_and_runs_its_plain_forward():
    m = loaded_like_comfyui_dynamic()
    NativeOwner.freed = 0
    c = plain_resident_copy(m, "cpu", torch.float32, skip=[m.encoder])
    assert c.encoder is None and m.encoder is not None
    for mod in c.modules():
        left = [k for k in RUNTIME_ATTRS if k in mod.__dict__ and mod.__dict__[k] != []]   # hook lists: emptied
        assert not left, (type(mod).__name__, left)
        if isinstance(mod, CastConv):
            assert mod.comfy_cast_weights is False and mod.weight_function == [] and mod.bias_function == []
    # the original keeps its runtime state, and dropping the copy frees nothing of it
    assert m.decoder[0].comfy_cast_weights and "_v" in m.decoder[0].__dict__ and "dynamic_pins" in m.__dict__
    del c
    gc.collect()
    assert NativeOwner.freed == 0
    # gradients flow through the copy's own (equal) weights, outside inference mode
    c = plain_resident_copy(m, "cpu", torch.float32, skip=[m.encoder])
    for a, b in zip(m.decoder.parameters(), c.decoder.parameters()):
        assert torch.equal(a, b) and not b.is_inference() and not b.requires_grad
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    c.decode(z).square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_dtype_cast_and_a_plain_deepcopy_would_duplicate():
    m = loaded_like_comfyui_dynamic()
    c = plain_resident_copy(m, "cpu", torch.bfloat16, skip=[m.encoder])
    assert {p.dtype for p in c.parameters()} == {torch.bfloat16}
    import copy
    with pytest.raises(AssertionError, match="duplicated"):   # why the copy shares them
        with torch.inference_mode(False):
            copy.deepcopy(m)
