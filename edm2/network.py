"""EDM2 magnitude-preserving U-Net and its preconditioning, for inference (plain PyTorch).

Our own implementation from the EDM2 paper (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models") and the facts collected in the pack's reference note on
EDM2 (architecture, parameter names, presets). The module tree and parameter names equal those of
the published NVlabs checkpoints, so their ``ema`` state dict loads with ``strict=True``:
``unet.enc.64x64_conv.weight``, ``unet.dec.8x8_in0.attn_qkv.weight``, ``unet.out_gain``,
``logvar_linear.weight``, ...

Inference only: no dropout, no forced weight normalisation, no loss. The published weights are not
unit-norm (they are averages of normalised weights), so every ``MPConv`` normalises its weight; the
:meth:`EDM2.prepare` step folds that normalisation and the learned gains into the weights once
(float32), after which every layer is a plain bias-free conv or linear layer. The embedding path
(Fourier features, noise/label/block embeddings) stays in float32 whatever the trunk dtype, as in
NVlabs' fp16 runs.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

EPS = 1e-4


# ----------------------------------------------------------------------------------------------
# Primitives


def normalize(x: torch.Tensor, dim=None, eps: float = EPS) -> torch.Tensor:
    """Unit-RMS normalisation: x / (eps + ||x||_2 / sqrt(n)), n = number of elements reduced over.

    The norm is taken in float32 over ``dim`` (default: every dim but the first) and cast back.
    """
    if dim is None:
        dim = tuple(range(1, x.ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = math.prod(x.shape[d] for d in dims)
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    return x / (eps + norm / math.sqrt(n)).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU: silu(x) / 0.596."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving blend: ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving channel concat [a, b] (main path first).

    With K = sqrt((Na + Nb) / ((1 - t)^2 + t^2)): a is scaled by K (1 - t) / sqrt(Na) and b by
    K t / sqrt(Nb).
    """
    na, nb = a.shape[1], b.shape[1]
    k = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (k * (1 - t) / math.sqrt(na)), b * (k * t / math.sqrt(nb))], dim=1)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """EDM2's [1, 1] resampling filter: 'down' = 2x2 box average, stride 2; 'up' = nearest x2."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


def folded_weight(weight: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    """Effective MPConv weight, float32: W_eff[o] = g w[o] / (||w[o]||_2 + eps sqrt(fan_in)).

    The closed form of "normalise each output row to unit RMS, then scale by g / sqrt(fan_in)".
    """
    w = weight.to(torch.float32)
    fan_in = w[0].numel()
    norm = torch.linalg.vector_norm(w, dim=tuple(range(1, w.ndim)), keepdim=True)
    g = gain.to(torch.float32) if torch.is_tensor(gain) else float(gain)
    return w * (g / (norm + eps * math.sqrt(fan_in)))


def cosine_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """EDM2 self-attention on qkv [N, 3C, H, W] -> [N, C, H, W].

    Channel layout of qkv is interleaved: index = h * 3c + ch * 3 + j, j in (q, k, v), c = C/heads.
    q, k and v are each normalised to unit RMS over the c channels of a head; the output is
    softmax(q k^T / sqrt(c)) v, with channel h * c + ch.
    """
    n, _, h, w = qkv.shape
    y = normalize(qkv.reshape(n, heads, -1, 3, h * w), dim=2)
    q, k, v = (t.transpose(-1, -2) for t in y.unbind(3))  # [N, heads, HW, c]
    o = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(c)
    return o.transpose(-1, -2).reshape(n, -1, h, w)


# ----------------------------------------------------------------------------------------------
# Layers


class MPFourier(torch.nn.Module):
    """Fourier features sqrt(2) cos(s f + phi) of a vector s [N] -> [N, C], in float32.

    ``freqs`` and ``phases`` were drawn at random when the checkpoint was made and are read from it
    (zeros until loaded). NVlabs stores them as buffers; here they are frozen parameters (same
    state-dict names) so that ComfyUI's model loading, which moves modules that own parameters,
    puts them on the GPU with everything else.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.freqs = torch.nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.phases = torch.nn.Parameter(torch.zeros(channels), requires_grad=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        # on s's device: a partial (lowvram) load may leave this small module on the offload device
        f32 = dict(device=s.device, dtype=torch.float32)
        y = torch.outer(s.to(torch.float32), self.freqs.to(**f32)) + self.phases.to(**f32)
        return y.cos() * math.sqrt(2)


class MPConv(torch.nn.Module):
    """Bias-free magnitude-preserving conv (kernel k x k, padding k // 2) or linear layer (no kernel).

    Before :meth:`fold` the weight is normalised on every call (``folded_weight``); after it, the
    stored weight already is the effective weight (gain included) and is used as is.
    """

    def __init__(self, cin: int, cout: int, kernel: Iterable[int] = ()):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(cout, cin, *kernel), requires_grad=False)
        self.folded = False

    @torch.no_grad()
    def fold(self, gain=1.0):
        self.weight.data = folded_weight(self.weight, gain)
        self.folded = True

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = self.weight if self.folded else folded_weight(self.weight, gain)
        return mp_apply(x, w.to(x.dtype))


def mp_apply(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """An MPConv's effective weight applied to x: ``x @ w.T`` (linear) or a 'same' conv2d."""
    if w.ndim == 2:
        return x @ w.t()
    return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(torch.nn.Module):
    """Encoder ('enc') or decoder ('dec') residual block with optional cosine self-attention.

    x <- resample(x); enc: x <- pixel_norm(skip(x));
    y = conv_res1(mp_silu(conv_res0(mp_silu(x)) * (1 + emb_linear(emb))));
    dec: x <- skip(x);  x <- mp_sum(x, y, res_balance);
    attention: x <- mp_sum(x, attn_proj(attention(attn_qkv(x))), attn_balance);  clamp to +-clip_act.
    """

    def __init__(self, cin, cout, cemb, flavor="enc", resample_mode="keep", attention=False,
                 channels_per_head=64, res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels = cout
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = cout // channels_per_head if attention else 0
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]), requires_grad=False)
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, [3, 3])
        self.emb_linear = MPConv(cemb, cout)
        self.conv_res1 = MPConv(cout, cout, [3, 3])
        self.conv_skip = MPConv(cin, cout, [1, 1]) if cin != cout else None
        self.attn_qkv = MPConv(cout, cout * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(cout, cout, [1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # float32 embedding path
        y = self.conv_res1(mp_silu(y * c[:, :, None, None].to(y.dtype)))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            y = self.attn_proj(cosine_attention(self.attn_qkv(x), self.num_heads))
            x = mp_sum(x, y, self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class EDM2Config:
    """Everything that fixes the network's shape (defaults = the published checkpoints)."""

    img_resolution: int = 64
    img_channels: int = 4
    label_dim: int = 1000
    model_channels: int = 192
    channel_mult: tuple = (1, 2, 3, 4)
    channel_mult_noise: Optional[int] = None
    channel_mult_emb: Optional[int] = None
    num_blocks: int = 3
    attn_resolutions: tuple = (16, 8)
    label_balance: float = 0.5
    concat_balance: float = 0.5
    channels_per_head: int = 64
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: Optional[float] = 256
    sigma_data: float = 0.5
    logvar_channels: int = 128

    def __post_init__(self):
        self.channel_mult = tuple(int(c) for c in self.channel_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)

    @property
    def cblock(self):
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def cnoise(self):
        m = self.channel_mult_noise
        return self.model_channels * m if m is not None else self.cblock[0]

    @property
    def cemb(self):
        m = self.channel_mult_emb
        return self.model_channels * m if m is not None else max(self.cblock)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "EDM2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"EDM2 config: unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Network


class UNet(torch.nn.Module):
    """The raw network F(x_in, c_noise, labels) of EDM2 (x_in already scaled by c_in)."""

    def __init__(self, cfg: EDM2Config):
        super().__init__()
        self.label_balance = cfg.label_balance
        self.concat_balance = cfg.concat_balance
        cblock, cemb = cfg.cblock, cfg.cemb
        bkw = dict(channels_per_head=cfg.channels_per_head, res_balance=cfg.res_balance,
                   attn_balance=cfg.attn_balance, clip_act=cfg.clip_act)
        self.out_gain = torch.nn.Parameter(torch.zeros([]), requires_grad=False)
        self.emb_fourier = MPFourier(cfg.cnoise)
        self.emb_noise = MPConv(cfg.cnoise, cemb)
        self.emb_label = MPConv(cfg.label_dim, cemb) if cfg.label_dim else None

        self.enc = torch.nn.ModuleDict()
        cout = cfg.img_channels + 1  # + constant ones channel
        skips = []
        for level, channels in enumerate(cblock):
            res = cfg.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, [3, 3])
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, "enc", "down", **bkw)
            skips.append(cout)
            for i in range(cfg.num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(cout, channels, cemb, "enc",
                                                          attention=res in cfg.attn_resolutions, **bkw)
                cout = channels
                skips.append(cout)

        self.dec = torch.nn.ModuleDict()
        for level, channels in reversed(list(enumerate(cblock))):
            res = cfg.img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, "dec", attention=True, **bkw)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, "dec", **bkw)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, "dec", "up", **bkw)
            for i in range(cfg.num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = Block(cout + skips.pop(), channels, cemb, "dec",
                                                          attention=res in cfg.attn_resolutions, **bkw)
                cout = channels
        self.out_conv = MPConv(cout, cfg.img_channels, [3, 3])

    def embedding(self, c_noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """emb = mp_silu(mp_sum(emb_noise(fourier(c_noise)), emb_label(sqrt(L) y), label_balance)), fp32."""
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            y = labels.to(torch.float32)
            emb = mp_sum(emb, self.emb_label(y * math.sqrt(y.shape[1])), self.label_balance)
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: Optional[torch.Tensor] = None):
        emb = self.embedding(c_noise, labels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class EDM2(torch.nn.Module):
    """The preconditioned denoiser (NVlabs' ``Precond``; the pickled ``ema`` object).

    D(x, sigma, y) = c_skip x + c_out F(c_in x, c_noise, y) with
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4, sd = sigma_data = 0.5.
    """

    def __init__(self, cfg: EDM2Config):
        super().__init__()
        self.config = cfg
        self.label_dim = cfg.label_dim
        self.sigma_data = cfg.sigma_data
        self.unet = UNet(cfg)
        self.logvar_fourier = MPFourier(cfg.logvar_channels)  # training-only head, kept for the keys
        self.logvar_linear = MPConv(cfg.logvar_channels, 1)
        self.dtype = torch.float32
        self.prepared = False

    # -- loading ---------------------------------------------------------------------------------
    def embedding_modules(self):
        """Modules that stay float32: Fourier features, noise/label embedding, block emb_linear."""
        u = self.unet
        mods = [u.emb_fourier, u.emb_noise, self.logvar_fourier, self.logvar_linear]
        if u.emb_label is not None:
            mods.append(u.emb_label)
        mods += [b.emb_linear for b in list(u.enc.values()) + list(u.dec.values()) if isinstance(b, Block)]
        return mods

    @torch.no_grad()
    def prepare(self, dtype: torch.dtype = torch.float32) -> "EDM2":
        """Fold weight normalisation and gains into the weights (float32, once) and cast the trunk.

        After this the state dict holds effective weights: convert checkpoints from the raw state
        dict, never from a prepared network.
        """
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"EDM2 dtype must be float32, float16 or bfloat16, got {dtype}")
        if not self.prepared:
            u = self.unet
            for blk in list(u.enc.values()) + list(u.dec.values()):
                if isinstance(blk, Block):
                    blk.emb_linear.fold(blk.emb_gain)
            u.out_conv.fold(u.out_gain)
            for m in self.modules():
                if isinstance(m, MPConv) and not m.folded:
                    m.fold()
            for b in [m for m in self.modules() if isinstance(m, MPFourier)]:
                b.freqs.data = b.freqs.data.float()
                b.phases.data = b.phases.data.float()
            self.prepared = True
        keep = {id(p) for m in self.embedding_modules() for p in m.parameters()}
        for m in self.modules():
            if isinstance(m, MPConv) and id(m.weight) not in keep:
                m.weight.data = m.weight.data.to(dtype)
            elif isinstance(m, MPConv):
                m.weight.data = m.weight.data.float()
        self.dtype = dtype
        return self

    # -- inference -------------------------------------------------------------------------------
    def labels_for(self, labels: Optional[torch.Tensor], n: int, device) -> Optional[torch.Tensor]:
        """[N, L] float32 labels; None on a conditional net means the zero vector (untrained mode)."""
        if not self.label_dim:
            return None
        if labels is None:
            return torch.zeros(n, self.label_dim, device=device)
        labels = labels.to(device=device, dtype=torch.float32).reshape(-1, self.label_dim)
        return labels.expand(n, -1) if labels.shape[0] == 1 else labels

    def check_input(self, x: torch.Tensor) -> None:
        """A clear error for inputs the U-Net cannot take: another channel count (the other EDM2
        family) or sides that do not survive its 2x downsamplings."""
        c, f = self.config.img_channels, 2 ** (len(self.config.channel_mult) - 1)
        kind = {4: "img512: 4-channel SD-VAE latents", 3: "img64: 3-channel pixels"}.get(c, f"{c} channels")
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"latent_image: this EDM2 network takes [B, {c}, H, W] inputs ({kind}) but got "
                             f"{tuple(x.shape)}; use EDM2 Empty Latent with the network's family")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"latent_image: sides {x.shape[2]}x{x.shape[3]} are not multiples of {f}; this EDM2 "
                             f"network halves the resolution {len(self.config.channel_mult) - 1} times")

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels=None) -> torch.Tensor:
        """F(x_in, c_noise, labels) in float32, the trunk in ``self.dtype``."""
        self.check_input(x_in)
        y = self.labels_for(labels, x_in.shape[0], x_in.device)
        return self.unet(x_in.to(self.dtype), c_noise.to(torch.float32).reshape(-1), y).to(torch.float32)

    def forward(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = precond_coefficients(sigma, self.sigma_data)
        return c_skip * x + c_out * self.raw(c_in * x, c_noise, labels)


def precond_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """EDM preconditioning: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4."""
    r = (sigma ** 2 + sigma_data ** 2)
    return sigma_data ** 2 / r, sigma * sigma_data / r.sqrt(), 1 / r.sqrt(), sigma.log().flatten() / 4


def count_parameters(cfg: EDM2Config) -> int:
    """Parameter + buffer elements of a network built on the meta device (no memory used)."""
    with torch.device("meta"):
        net = EDM2(cfg)
    return sum(v.numel() for v in net.state_dict().values())
