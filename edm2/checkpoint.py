"""Reading EDM2 checkpoints without executing anything from them.

NVlabs' ``.pkl`` files are plain pickle streams whose objects are "persistent" records
``_reconstruct_persistent_obj({type, version, module_src, class_name, state})``; a normal unpickle
executes ``module_src`` (Python source embedded in the file). :class:`SafeUnpickler` resolves only
an allow-list of globals, each to an inert or validating stand-in:

==============================================  ================================================
global in the stream                            what we return
==============================================  ================================================
torch_utils.persistence._reconstruct_persistent_obj  :class:`Record` (class name + state; the
                                                module source is dropped unread)
dnnlib.util.EasyDict                            :class:`EasyDict` (a plain dict subclass)
torch.nn.modules.container.ModuleDict           :class:`Record` named "ModuleDict"
collections.OrderedDict                         collections.OrderedDict
torch._utils._rebuild_tensor_v2                 type-checked call of torch's own rebuild
torch._utils._rebuild_parameter(_with_state)    the data tensor
torch.storage._load_from_bytes                  ``torch.load(blob, weights_only=True)``
numpy[._]core.multiarray._reconstruct/scalar,   numpy's own, refusing object dtypes
numpy.ndarray, numpy.dtype
==============================================  ================================================

Anything else -- ``os.system``, ``builtins.eval``, ``subprocess.Popen``, an unknown class -- stops
the read with :class:`CheckpointError` naming the global. Persistent ids are refused too.

Also here: the safetensors form (weights + config in metadata) written by
``python -m comfyui_gfcg.edm2 convert`` and read back by the loader.
"""
from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import io
import json
import os
import pickle
import re
from typing import Optional

import torch

from .network import EDM2, EDM2Config

FORMAT_TAG = "comfyui-gfcg/edm2"


class CheckpointError(ValueError):
    """A checkpoint that the safe reader refuses or cannot understand (message names the cause)."""


# ----------------------------------------------------------------------------------------------
# Inert stand-ins


class Record:
    """What a persistent NVlabs object becomes: its class name and its state, nothing callable."""

    __slots__ = ("class_name", "state")

    def __init__(self, class_name: str, state):
        self.class_name = class_name
        self.state = state

    def __repr__(self):
        return f"Record({self.class_name!r})"


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict: a dict (its attribute access is not needed)."""


class _ModuleDictRecord:
    """Stand-in for torch.nn.ModuleDict (pickled by NEWOBJ + state): keeps the state only."""

    def __setstate__(self, state):
        self.state = state


_PERSISTENT_KEYS = {"type", "version", "module_src", "class_name", "state"}


def _reconstruct_persistent_obj(meta):
    """Turn an NVlabs persistence record into a :class:`Record`; ``module_src`` is never run."""
    if not isinstance(meta, dict) or not _PERSISTENT_KEYS <= set(meta):
        raise CheckpointError("a persistent-object record lacks the keys "
                              f"{sorted(_PERSISTENT_KEYS)}; this is not an NVlabs EDM2 pickle")
    if meta["type"] != "class" or meta["version"] != 6:
        raise CheckpointError(f"persistent-object record of type {meta['type']!r}, version "
                              f"{meta['version']!r}; only type 'class', version 6 is known")
    name = meta["class_name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise CheckpointError(f"persistent-object record with invalid class name {name!r}")
    return Record(name, meta["state"])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
        raise CheckpointError(f"tensor record with a {type(storage).__name__} instead of a storage")
    if not (isinstance(storage_offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(isinstance(v, int) for v in size + stride)):
        raise CheckpointError("tensor record with malformed offset/size/stride")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False,
                                           collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"parameter record holding a {type(data).__name__} instead of a tensor")
    return data


def _load_from_bytes(blob):
    if not isinstance(blob, (bytes, bytearray)):
        raise CheckpointError(f"storage record holding a {type(blob).__name__} instead of bytes")
    try:
        return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except Exception as e:  # torch's own weights-only refusal, or corrupt data
        raise CheckpointError(f"a tensor storage inside the file could not be read safely: {e}") from None


def _numpy_allowed():
    import numpy as np

    def dtype(obj, align=False, copy=False):
        dt = np.dtype(obj, align, copy)
        if dt.hasobject:
            raise CheckpointError("numpy array with object dtype (would unpickle arbitrary objects)")
        return dt

    def reconstruct(subtype, shape, dt):
        if subtype is not np.ndarray:
            raise CheckpointError(f"numpy array of subtype {subtype!r}; only numpy.ndarray is allowed")
        return np.ndarray.__new__(np.ndarray, shape, dtype(dt))

    def scalar(dt, data=None):
        dt = dtype(dt)
        if not isinstance(data, (bytes, bytearray)):
            raise CheckpointError("numpy scalar record without raw bytes")
        return np.frombuffer(bytes(data), dtype=dt, count=1)[0]

    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = reconstruct
        out[(mod, "scalar")] = scalar
    return out


ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictRecord,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
}


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only :data:`ALLOWED` (and numpy's array records)."""

    def __init__(self, file):
        super().__init__(file)
        self._allowed = dict(ALLOWED)
        self._allowed.update(_numpy_allowed())

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (protocols < 3)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        fn = self._allowed.get((module, name))
        if fn is None:
            raise CheckpointError(
                f"the file refers to the global '{module}.{name}', which is not on the safe reader's "
                f"allow-list (allowed: {', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED))}, numpy arrays). "
                "Nothing from the file was executed")
        return fn

    def persistent_load(self, pid):
        raise CheckpointError("the file uses pickle persistent ids (e.g. a torch.save archive member); "
                              "NVlabs EDM2 .pkl files do not")


def safe_unpickle(data_or_file):
    """Unpickle NVlabs-format data with :class:`SafeUnpickler`; every failure is a CheckpointError."""
    f = io.BytesIO(data_or_file) if isinstance(data_or_file, (bytes, bytearray)) else data_or_file
    try:
        return SafeUnpickler(f).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"not a complete pickle stream ({type(e).__name__}: {e}); the file is "
                              "truncated, corrupt, or not an NVlabs .pkl") from None
    except RecursionError:
        raise CheckpointError("pickle nesting too deep") from None
    except Exception as e:  # malformed records: wrong argument types to an allowed stand-in, ...
        raise CheckpointError(f"malformed pickle data ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# From records to a state dict


def _state_of(obj):
    if isinstance(obj, Record):
        return obj.state
    if isinstance(obj, _ModuleDictRecord):
        return getattr(obj, "state", None)
    return None


def flatten_module(obj, prefix: str = "") -> "collections.OrderedDict[str, torch.Tensor]":
    """Parameters and buffers of a pickled module record, with torch's dotted state-dict names."""
    state = _state_of(obj)
    if not isinstance(state, dict):
        raise CheckpointError(f"expected a module record at '{prefix or '<root>'}', found {type(obj).__name__}")
    out = collections.OrderedDict()
    for key in ("_parameters", "_buffers"):
        for name, t in (state.get(key) or {}).items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"'{prefix}{name}' is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(flatten_module(child, f"{prefix}{name}."))
    return out


@dataclasses.dataclass
class EDM2Checkpoint:
    """A checkpoint read into inert data: config, raw state dict, encoder constants, source name."""

    config: EDM2Config
    state_dict: dict
    encoder: Optional[dict]
    source: str

    @property
    def family(self) -> str:
        return "img512" if self.config.img_channels == 4 else "img64" if self.config.img_channels == 3 else "custom"


_UNET_FIELDS = {"img_resolution", "img_channels", "label_dim", "model_channels", "channel_mult",
                "channel_mult_noise", "channel_mult_emb", "num_blocks", "attn_resolutions",
                "label_balance", "concat_balance", "channels_per_head", "res_balance", "attn_balance",
                "clip_act"}
_TRAINING_ONLY = {"dropout", "use_fp16"}


def _config_from_records(ema: Record, sd) -> EDM2Config:
    st = ema.state
    kwargs = dict(st.get("_init_kwargs") or {})
    unet = (st.get("_modules") or {}).get("unet")
    if isinstance(unet, Record):
        kwargs = {**dict(unet.state.get("_init_kwargs") or {}), **kwargs}
    for k in ("img_resolution", "img_channels", "label_dim", "sigma_data"):
        if k in st and not isinstance(st[k], (dict, list)):
            kwargs.setdefault(k, st[k])
    cfg = infer_config(sd).to_dict()
    heads = _channels_per_head(unet)
    if heads is not None:
        cfg["channels_per_head"] = heads
    for k, v in kwargs.items():
        if k in _TRAINING_ONLY:
            continue
        if k == "resample_filter" and list(v) == [1, 1]:
            continue
        if k == "logvar_channels" or k == "sigma_data":
            cfg[k] = v
        elif k in _UNET_FIELDS:
            cfg[k] = list(v) if isinstance(v, (list, tuple)) else v
        else:
            raise CheckpointError(f"the checkpoint's network uses the setting {k}={v!r}, which this "
                                  "implementation does not support")
    return EDM2Config.from_dict(cfg)


def _channels_per_head(unet) -> Optional[int]:
    """Channels per attention head from the pickled blocks' ``num_heads`` (None if not recorded)."""
    if not isinstance(unet, Record):
        return None
    found = set()
    for part in ("enc", "dec"):
        container = (unet.state.get("_modules") or {}).get(part)
        for blk in ((_state_of(container) or {}).get("_modules") or {}).values():
            st = blk.state if isinstance(blk, Record) else {}
            heads, cout = st.get("num_heads"), st.get("out_channels")
            if isinstance(heads, int) and heads > 0 and isinstance(cout, int):
                found.add(cout // heads)
    if len(found) > 1:
        raise CheckpointError(f"attention blocks disagree on channels per head: {sorted(found)}")
    return found.pop() if found else None


def _encoder_from_record(enc) -> Optional[dict]:
    if not isinstance(enc, Record):
        return None
    if enc.class_name == "StabilityVAEEncoder":
        st = enc.state
        try:
            return {"kind": "stability_vae", "vae_name": str(st.get("vae_name", "")),
                    "scale": [float(v) for v in st["scale"]], "bias": [float(v) for v in st["bias"]]}
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"encoder record without usable scale/bias ({e})") from None
    if enc.class_name == "StandardRGBEncoder":
        return {"kind": "standard_rgb"}
    return {"kind": "unknown", "class_name": enc.class_name}


_EXPECTED_NET = {"Precond", "EDMPrecond"}


def read_nvlabs_pickle(path: str) -> EDM2Checkpoint:
    """Read an NVlabs EDM2 ``.pkl`` safely: the ``ema`` network's state dict, config and encoder."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            root = safe_unpickle(f)
    except CheckpointError as e:
        raise CheckpointError(f"EDM2 checkpoint '{name}' refused: {e}") from None
    if not isinstance(root, dict) or "ema" not in root:
        keys = sorted(root) if isinstance(root, dict) else type(root).__name__
        raise CheckpointError(f"EDM2 checkpoint '{name}' has no 'ema' network (found {keys})")
    ema = root["ema"]
    if not isinstance(ema, Record) or ema.class_name not in _EXPECTED_NET or not isinstance(ema.state, dict):
        raise CheckpointError(f"EDM2 checkpoint '{name}': 'ema' is {ema!r}, expected an NVlabs Precond record")
    try:
        sd = flatten_module(ema)
        cfg = _config_from_records(ema, sd)
    except CheckpointError as e:
        raise CheckpointError(f"EDM2 checkpoint '{name}': {e}") from None
    return EDM2Checkpoint(cfg, dict(sd), _encoder_from_record(root.get("encoder")), name)


# ----------------------------------------------------------------------------------------------
# Shapes -> config (for safetensors without our metadata)


def infer_config(sd) -> EDM2Config:
    """Read the network's shape parameters off a state dict with NVlabs key names."""
    conv = [k for k in sd if re.fullmatch(r"unet\.enc\.(\d+)x\1_conv\.weight", k)]
    if len(conv) != 1:
        raise CheckpointError("state dict has no single 'unet.enc.<R>x<R>_conv.weight'; not an EDM2 network")
    res = int(re.match(r"unet\.enc\.(\d+)x", conv[0]).group(1))
    w = sd[conv[0]]
    c = int(w.shape[0])
    levels, num_blocks, attn = [], 0, []
    r = res
    while any(k.startswith(f"unet.enc.{r}x{r}_block0.") for k in sd):
        levels.append(int(sd[f"unet.enc.{r}x{r}_block0.conv_res1.weight"].shape[0]))
        if any(k.startswith(f"unet.enc.{r}x{r}_block0.attn_qkv") for k in sd):
            attn.append(r)
        r //= 2
    while any(k.startswith(f"unet.enc.{res}x{res}_block{num_blocks}.") for k in sd):
        num_blocks += 1
    if not levels or any(v % c for v in levels):
        raise CheckpointError("state dict's encoder channels are not multiples of the first conv's")
    mult = [v // c for v in levels]
    cemb = int(sd["unet.emb_noise.weight"].shape[0])
    cnoise = int(sd["unet.emb_noise.weight"].shape[1])
    label = sd.get("unet.emb_label.weight")
    return EDM2Config(
        img_resolution=res, img_channels=int(w.shape[1]) - 1,
        label_dim=int(label.shape[1]) if label is not None else 0, model_channels=c, channel_mult=mult,
        channel_mult_noise=None if cnoise == c * mult[0] else cnoise // c,
        channel_mult_emb=None if cemb == c * max(mult) else cemb // c,
        num_blocks=num_blocks, attn_resolutions=attn,
        logvar_channels=int(sd["logvar_linear.weight"].shape[1]) if "logvar_linear.weight" in sd else 128)


# ----------------------------------------------------------------------------------------------
# safetensors form


def save_safetensors(ckpt: EDM2Checkpoint, path: str, dtype: Optional[torch.dtype] = None):
    """Write the raw (unfolded) weights and the config/encoder as safetensors metadata."""
    from safetensors.torch import save_file

    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in ckpt.state_dict.items()}
    meta = {"format": FORMAT_TAG, "edm2_config": ckpt.config.to_json(),
            "edm2_encoder": json.dumps(ckpt.encoder), "source": ckpt.source}
    save_file(sd, path, metadata=meta)


def read_safetensors(path: str) -> EDM2Checkpoint:
    from safetensors import safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"EDM2 checkpoint '{name}' is not a readable safetensors file: {e}") from None
    try:
        cfg = EDM2Config.from_dict(json.loads(meta["edm2_config"])) if "edm2_config" in meta else infer_config(sd)
        encoder = json.loads(meta["edm2_encoder"]) if "edm2_encoder" in meta else None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"EDM2 checkpoint '{name}': bad edm2 metadata ({e})") from None
    return EDM2Checkpoint(cfg, sd, encoder, meta.get("source", name))


def read_checkpoint(path: str) -> EDM2Checkpoint:
    """Read ``.pkl`` (NVlabs, safely) or ``.safetensors`` (converted, or plain NVlabs key names)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".pkl":
        return read_nvlabs_pickle(path)
    if ext in (".safetensors", ".sft"):
        return read_safetensors(path)
    raise CheckpointError(f"EDM2 checkpoint '{os.path.basename(path)}': extension {ext!r} not supported; "
                          "use an NVlabs .pkl or a .safetensors file")


def build_network(ckpt: EDM2Checkpoint, dtype: torch.dtype = torch.float32, device="cpu") -> EDM2:
    """The inference network: strict load of the raw state dict, then fold weights and cast."""
    with torch.device("meta"):
        net = EDM2(ckpt.config)
    try:
        net.load_state_dict(ckpt.state_dict, strict=True, assign=True)
    except RuntimeError as e:
        msg = str(e).split("\n")
        raise CheckpointError(f"EDM2 checkpoint '{ckpt.source}' does not match its config "
                              f"({ckpt.config.model_channels} channels): {' '.join(msg[:4])[:600]}") from None
    net.to(device)
    return net.prepare(dtype).eval()


def load_edm2(path: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """Read a checkpoint and build the network: returns (EDM2 network, EDM2Checkpoint)."""
    ckpt = read_checkpoint(path)
    return build_network(ckpt, dtype, device), ckpt
