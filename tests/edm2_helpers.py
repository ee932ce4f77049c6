"""Test-side EDM2 helpers, written independently of ``comfyui_gfcg.edm2``:

- ``random_state_dict``: random raw weights (not unit-norm, fp16 as NVlabs saves them) with the key
  names of the EDM2 note's module tables, built from the tables rather than from the pack's module;
- ``write_nvlabs_pickle``: a file in NVlabs' persistence format (records with type, version,
  module_src, class_name, state; EasyDict root; ModuleDict containers), whose module_src creates a
  sentinel file and raises if it is ever executed;
- ``reference_denoiser``: D(x, sigma, y) computed functionally from the raw state dict with the
  formulas of the note (einsum attention, explicit box-filter / transposed-conv resampling).
"""
from __future__ import annotations

import collections
import math
import pickle
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-4


# ----------------------------------------------------------------------------------------------
# Topology from the note's tables


def topology(cfg):
    """Yields (module path, kind, info) for every layer, in NVlabs' order."""
    C = cfg["model_channels"]
    cblock = [C * m for m in cfg["channel_mult"]]
    cemb = max(cblock)
    R = cfg["img_resolution"]
    cph = cfg.get("channels_per_head", 64)
    attn_res = cfg["attn_resolutions"]
    enc, dec = [], []
    skips = []
    cout = cfg["img_channels"] + 1
    for lvl, ch in enumerate(cblock):
        r = R >> lvl
        if lvl == 0:
            enc.append((f"{r}x{r}_conv", "conv", dict(cin=cout, cout=ch)))
            cout = ch
        else:
            enc.append((f"{r}x{r}_down", "block", dict(cin=cout, cout=cout, flavor="enc", mode="down", heads=0)))
        skips.append(cout)
        for i in range(cfg["num_blocks"]):
            enc.append((f"{r}x{r}_block{i}", "block",
                        dict(cin=cout, cout=ch, flavor="enc", mode="keep", heads=ch // cph if r in attn_res else 0)))
            cout = ch
            skips.append(cout)
    for lvl in reversed(range(len(cblock))):
        ch = cblock[lvl]
        r = R >> lvl
        if lvl == len(cblock) - 1:
            dec.append((f"{r}x{r}_in0", "block", dict(cin=cout, cout=cout, flavor="dec", mode="keep", heads=cout // cph)))
            dec.append((f"{r}x{r}_in1", "block", dict(cin=cout, cout=cout, flavor="dec", mode="keep", heads=0)))
        else:
            dec.append((f"{r}x{r}_up", "block", dict(cin=cout, cout=cout, flavor="dec", mode="up", heads=0)))
        for i in range(cfg["num_blocks"] + 1):
            cin = cout + skips.pop()
            dec.append((f"{r}x{r}_block{i}", "block",
                        dict(cin=cin, cout=ch, flavor="dec", mode="keep", heads=ch // cph if r in attn_res else 0)))
            cout = ch
    return enc, dec, cemb, cout


def block_shapes(info, cemb):
    cin, cout = info["cin"], info["cout"]
    s = {"emb_gain": (), "conv_res0.weight": (cout, cout if info["flavor"] == "enc" else cin, 3, 3),
         "emb_linear.weight": (cout, cemb), "conv_res1.weight": (cout, cout, 3, 3)}
    if cin != cout:
        s["conv_skip.weight"] = (cout, cin, 1, 1)
    if info["heads"]:
        s["attn_qkv.weight"] = (3 * cout, cout, 1, 1)
        s["attn_proj.weight"] = (cout, cout, 1, 1)
    return s


def random_state_dict(cfg, seed=0):
    """Raw (not normalised) fp16 weights with NVlabs key names; nonzero gains."""
    g = torch.Generator().manual_seed(seed)
    enc, dec, cemb, cout = topology(cfg)
    C = cfg["model_channels"]
    shapes = collections.OrderedDict()
    shapes["unet.out_gain"] = ()
    shapes["unet.emb_fourier.freqs"] = (C,)
    shapes["unet.emb_fourier.phases"] = (C,)
    shapes["unet.emb_noise.weight"] = (cemb, C)
    if cfg["label_dim"]:
        shapes["unet.emb_label.weight"] = (cemb, cfg["label_dim"])
    for part, layers in (("enc", enc), ("dec", dec)):
        for name, kind, info in layers:
            if kind == "conv":
                shapes[f"unet.{part}.{name}.weight"] = (info["cout"], info["cin"], 3, 3)
            else:
                for k, s in block_shapes(info, cemb).items():
                    shapes[f"unet.{part}.{name}.{k}"] = s
    shapes["unet.out_conv.weight"] = (cfg["img_channels"], cout, 3, 3)
    shapes["logvar_fourier.freqs"] = (128,)
    shapes["logvar_fourier.phases"] = (128,)
    shapes["logvar_linear.weight"] = (1, 128)
    sd = collections.OrderedDict()
    for k, s in shapes.items():
        if k.endswith("freqs"):
            t = 2 * math.pi * torch.randn(s, generator=g)
        elif k.endswith("phases"):
            t = 2 * math.pi * torch.rand(s, generator=g)
        elif k.endswith("gain"):
            t = 0.5 + torch.rand(s, generator=g)
        else:
            t = torch.randn(s, generator=g) * (0.5 + torch.rand((), generator=g))
        sd[k] = t.to(torch.float16)
    return sd


# ----------------------------------------------------------------------------------------------
# NVlabs persistence format, synthesised


def _fake_global(module, name, obj):
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    setattr(sys.modules[module], name, obj)
    obj.__module__ = module
    obj.__qualname__ = name
    obj.__name__ = name
    return obj


FAKE_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")


class _Persistent:
    """Pickles exactly as an NVlabs persistent object: REDUCE(_reconstruct_persistent_obj, (meta,))."""

    def __init__(self, class_name, state, src):
        self.class_name, self.state, self.src = class_name, state, src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.src, class_name=self.class_name, state=self.state)
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))


def _module_dict(state):
    """A real torch ModuleDict whose __dict__ is ``state``: pickles as NEWOBJ(ModuleDict) + BUILD."""
    md = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
    md.__dict__.update(state)
    return md


def _module_state(params, buffers, modules, **attrs):
    st = {"training": False, "_parameters": collections.OrderedDict(params),
          "_buffers": collections.OrderedDict(buffers), "_non_persistent_buffers_set": set(),
          "_backward_hooks": collections.OrderedDict(), "_forward_hooks": collections.OrderedDict(),
          "_forward_pre_hooks": collections.OrderedDict(), "_state_dict_hooks": collections.OrderedDict(),
          "_load_state_dict_pre_hooks": collections.OrderedDict(), "_modules": collections.OrderedDict(modules)}
    st.update(attrs)
    return st


def sentinel_source(sentinel_path):
    return (f"open({str(sentinel_path)!r}, 'w').write('executed')\n"
            "raise SystemExit('module_src must never be executed')\n")


def build_records(cfg, sd, src):
    """The ``ema`` Precond record tree for raw state dict ``sd``."""
    def P(t):
        return torch.nn.Parameter(t.clone(), requires_grad=False)

    def conv(prefix, cout):
        return _Persistent("MPConv", _module_state({"weight": P(sd[prefix + "weight"])}, {}, {},
                                                   out_channels=cout, _init_args=(), _init_kwargs={}), src)

    def fourier(prefix):
        return _Persistent("MPFourier", _module_state({}, {"freqs": sd[prefix + "freqs"].clone(),
                                                           "phases": sd[prefix + "phases"].clone()}, {},
                                                      _init_args=(), _init_kwargs={}), src)

    def block(prefix, info):
        mods = collections.OrderedDict()
        for sub in ("conv_res0", "emb_linear", "conv_res1", "conv_skip", "attn_qkv", "attn_proj"):
            key = prefix + sub + "."
            mods[sub] = conv(key, sd[key + "weight"].shape[0]) if key + "weight" in sd else None
        return _Persistent("Block", _module_state({"emb_gain": P(sd[prefix + "emb_gain"])}, {}, mods,
                                                  out_channels=info["cout"], flavor=info["flavor"],
                                                  resample_filter=[1, 1], resample_mode=info["mode"],
                                                  num_heads=info["heads"], dropout=0, res_balance=0.3,
                                                  attn_balance=0.3, clip_act=256, _init_args=(),
                                                  _init_kwargs={}), src)

    enc, dec, cemb, _ = topology(cfg)
    containers = {}
    for part, layers in (("enc", enc), ("dec", dec)):
        children = collections.OrderedDict()
        for name, kind, info in layers:
            p = f"unet.{part}.{name}."
            children[name] = conv(p, info["cout"]) if kind == "conv" else block(p, info)
        containers[part] = _module_dict(_module_state({}, {}, children))
    # As in NVlabs' training loop: only the preset's channels/dropout and the interface sizes are
    # constructor kwargs; everything else (levels, blocks, attention, heads) must be read off the
    # tensors' shapes and the blocks' recorded num_heads.
    unet_kwargs = {k: cfg[k] for k in ("img_resolution", "img_channels", "label_dim", "model_channels")}
    unet_kwargs["dropout"] = 0.0
    unet_mods = collections.OrderedDict(
        emb_fourier=fourier("unet.emb_fourier."), emb_noise=conv("unet.emb_noise.", cemb),
        emb_label=conv("unet.emb_label.", cemb) if cfg["label_dim"] else None,
        enc=containers["enc"], dec=containers["dec"], out_conv=conv("unet.out_conv.", cfg["img_channels"]))
    unet = _Persistent("UNet", _module_state({"out_gain": P(sd["unet.out_gain"])}, {}, unet_mods,
                                             label_balance=0.5, concat_balance=0.5, _init_args=(),
                                             _init_kwargs=unet_kwargs), src)
    prec_kwargs = dict(unet_kwargs, use_fp16=True)
    return _Persistent("Precond", _module_state(
        {}, {}, collections.OrderedDict(unet=unet, logvar_fourier=fourier("logvar_fourier."),
                                        logvar_linear=conv("logvar_linear.", 1)),
        img_resolution=cfg["img_resolution"], img_channels=cfg["img_channels"], label_dim=cfg["label_dim"],
        use_fp16=True, sigma_data=0.5, _init_args=(), _init_kwargs=prec_kwargs), src)


def install_fakes():
    """Fake NVlabs globals so that ``pickle`` can write references to them (removed afterwards)."""
    def recon(meta):
        raise AssertionError("the test-side reconstruct hook must never be called")

    _fake_global("torch_utils.persistence", "_reconstruct_persistent_obj", recon)

    class EasyDict(dict):
        pass

    _fake_global("dnnlib.util", "EasyDict", EasyDict)
    return EasyDict


def remove_fakes():
    for m in FAKE_MODULES:
        sys.modules.pop(m, None)


def dumps_with_fakes(make_obj):
    """pickle.dumps(make_obj(EasyDict)) with the fake NVlabs globals installed (protocol 4)."""
    try:
        easy = install_fakes()
        return pickle.dumps(make_obj(easy), protocol=4)
    finally:
        remove_fakes()


def nvlabs_pickle_bytes(cfg, sd, sentinel_path, encoder="stability"):
    src = sentinel_source(sentinel_path)

    def make(EasyDict):
        if encoder == "stability":
            raw_mean = np.float32([5.81, 3.25, 0.12, -2.15])
            scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
            enc = _Persistent("StabilityVAEEncoder", {"vae_name": "stabilityai/sd-vae-ft-mse", "scale": scale,
                                                      "bias": np.float32(0) - raw_mean * scale, "batch_size": 8,
                                                      "_vae": None, "_init_args": (), "_init_kwargs": {}}, src)
        else:
            enc = _Persistent("StandardRGBEncoder", {"_init_args": (), "_init_kwargs": {}}, src)
        loss = _Persistent("EDM2Loss", {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5, "_init_args": (),
                                        "_init_kwargs": {"P_mean": -0.4, "P_std": 1.0}}, src)
        root = EasyDict()
        root["dataset_kwargs"] = EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip",
                                          use_labels=bool(cfg["label_dim"]))
        root["loss_fn"] = loss
        root["ema"] = build_records(cfg, sd, src)
        root["encoder"] = enc
        return root

    return dumps_with_fakes(make)


# ----------------------------------------------------------------------------------------------
# Reference computation (formulas of the note, functional, float32)


def ref_normalize(x, dims):
    n = 1
    for d in dims:
        n *= x.shape[d]
    return x / (EPS + torch.sqrt((x.float() ** 2).sum(dim=dims, keepdim=True)) / math.sqrt(n))


def ref_weight(w, gain=1.0):
    w = w.float()
    fan_in = w[0].numel()
    # "normalise each row to unit RMS, then multiply by g / sqrt(fan_in)"
    return ref_normalize(w, tuple(range(1, w.ndim))) * (gain / math.sqrt(fan_in))


def ref_conv(x, w, gain=1.0):
    w = ref_weight(w, gain)
    if w.ndim == 2:
        return x @ w.t()
    return F.conv2d(x, w, padding=w.shape[-1] // 2)


def ref_silu(x):
    return x * torch.sigmoid(x) / 0.596


def ref_sum(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2)


def ref_cat(a, b, t=0.5):
    na, nb = a.shape[1], b.shape[1]
    k = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * k * (1 - t) / math.sqrt(na), b * k * t / math.sqrt(nb)], 1)


def ref_resample(x, mode):
    c = x.shape[1]
    f = torch.full((c, 1, 2, 2), 0.25)
    if mode == "down":
        return F.conv2d(x, f, groups=c, stride=2)
    if mode == "up":
        return F.conv_transpose2d(x, f * 4, groups=c, stride=2)
    return x


def ref_block(sd, p, info, x, emb):
    x = ref_resample(x, info["mode"])
    if info["flavor"] == "enc":
        if p + "conv_skip.weight" in sd:
            x = ref_conv(x, sd[p + "conv_skip.weight"])
        x = ref_normalize(x, (1,))
    y = ref_conv(ref_silu(x), sd[p + "conv_res0.weight"])
    c = ref_conv(emb, sd[p + "emb_linear.weight"], sd[p + "emb_gain"].float()) + 1
    y = ref_conv(ref_silu(y * c[:, :, None, None]), sd[p + "conv_res1.weight"])
    if info["flavor"] == "dec" and p + "conv_skip.weight" in sd:
        x = ref_conv(x, sd[p + "conv_skip.weight"])
    x = ref_sum(x, y, 0.3)
    if info["heads"]:
        n, ch, h, w = x.shape
        qkv = ref_conv(x, sd[p + "attn_qkv.weight"]).reshape(n, info["heads"], -1, 3, h * w)
        qkv = ref_normalize(qkv, (2,))
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        o = torch.einsum("nhqk,nhck->nhcq", a, v).reshape(n, ch, h, w)
        x = ref_sum(x, ref_conv(o, sd[p + "attn_proj.weight"]), 0.3)
    return x.clamp(-256, 256)


def ref_unet(sd, cfg, x, c_noise, labels):
    enc, dec, _, _ = topology(cfg)
    f = torch.outer(c_noise.float(), sd["unet.emb_fourier.freqs"].float()) + sd["unet.emb_fourier.phases"].float()
    emb = ref_conv(math.sqrt(2) * torch.cos(f), sd["unet.emb_noise.weight"])
    if cfg["label_dim"]:
        emb = ref_sum(emb, ref_conv(labels * math.sqrt(cfg["label_dim"]), sd["unet.emb_label.weight"]), 0.5)
    emb = ref_silu(emb)
    x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    skips = []
    for name, kind, info in enc:
        p = f"unet.enc.{name}."
        x = ref_conv(x, sd[p + "weight"]) if kind == "conv" else ref_block(sd, p, info, x, emb)
        skips.append(x)
    for name, kind, info in dec:
        if "_block" in name:
            x = ref_cat(x, skips.pop())
        x = ref_block(sd, f"unet.dec.{name}.", info, x, emb)
    return ref_conv(x, sd["unet.out_conv.weight"], sd["unet.out_gain"].float())


def reference_denoiser(sd, cfg, x, sigma, labels):
    """D = c_skip x + c_out F(c_in x, ln(sigma)/4, y), sigma_data 0.5 (formulas of the note)."""
    sd = {k: v.float() for k, v in sd.items()}
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
    sdata = 0.5
    c_skip = sdata ** 2 / (s ** 2 + sdata ** 2)
    c_out = s * sdata / torch.sqrt(s ** 2 + sdata ** 2)
    c_in = 1 / torch.sqrt(sdata ** 2 + s ** 2)
    c_noise = torch.log(s.flatten()) / 4
    return c_skip * x + c_out * ref_unet(sd, cfg, c_in * x, c_noise, labels)


def small_cfg(family="img512", label_dim=1000):
    """A small network of the given family with every kind of block (down/up, attention, skips)."""
    return dict(img_resolution=16, img_channels=4 if family == "img512" else 3, label_dim=label_dim,
                model_channels=32, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8, 4],
                channels_per_head=32)
