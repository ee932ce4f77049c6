"""An analytic toy problem that shows what GFCG does, in about a second on a CPU.

Data: K classes, each a Gaussian blob N(mu_k, s^2 I) in 2-D, the means on a circle. The "model" is
deliberately weak: its class-conditional denoiser is the exact denoiser of a blurrier Gaussian
N(lam * mu_c, v I) (means pulled toward the centre, larger spread), its unconditional branch that
of N(0, v_u I), and the autoguidance "guide" an even weaker N(lam_g * mu_c, v_g I). The classifier
is the exact Bayes posterior of the true data. Sampling: Euler on the EDM sigma schedule
(rho = 7), driving the same ``GFCGEngine`` the ComfyUI guider uses.

The exact denoiser of N(m, v I) at noise level sigma:  D(x; sigma) = (v x + sigma^2 m) / (v + sigma^2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..guiders.config import GFCGConfig
from ..guiders.engine import GFCGEngine


def edm_sigmas(n: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0."""
    i = torch.arange(n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def gaussian_denoiser(x: torch.Tensor, sigma: float, mean: torch.Tensor, var: float) -> torch.Tensor:
    """D(x; sigma) = (v x + sigma^2 m) / (v + sigma^2) for data N(m, v I)."""
    return (var * x + sigma ** 2 * mean) / (var + sigma ** 2)


@dataclass
class Toy:
    classes: int = 6
    radius: float = 2.0
    data_std: float = 0.6
    lam: float = 0.45          # model's conditional means, pulled toward the centre
    model_var: float = 1.0
    uncond_var: float = 4.0
    lam_guide: float = 0.25    # the weaker guide model
    guide_var: float = 1.4

    def means(self) -> torch.Tensor:
        a = torch.arange(self.classes) * 2 * math.pi / self.classes
        return self.radius * torch.stack([a.cos(), a.sin()], 1)

    def posterior_logits(self, x0: torch.Tensor) -> torch.Tensor:
        """Bayes classifier of the true data: log N(x0; mu_k, s^2 I) up to a constant."""
        pts = x0.view(x0.shape[0], 2)
        return -((pts[:, None, :] - self.means()[None]) ** 2).sum(-1) / (2 * self.data_std ** 2)

    def denoise(self, x, sigma, cond, classes, guide=False):
        mu = self.means()
        if cond == "negative":
            m, v = torch.zeros_like(x.view(-1, 2)), self.uncond_var
        else:
            lam, v = (self.lam_guide, self.guide_var) if guide else (self.lam, self.model_var)
            m = lam * mu[classes]
        return gaussian_denoiser(x, sigma, m.view(x.shape), v)


def sample(toy: Toy, method: str, desired: int, n: int = 2000, seed: int = 0, steps: int = 32,
           cfg_scale: float = 2.0, atg_scale: float = 2.0, tau: float = 0.6, alpha: float = 3.0, beta: float = 1.0):
    """Euler sampling with the GFCG engine; ``method`` in none, cfg, atg, gfcg, gfcg+cfg, gfcg+atg."""
    combine = {"none": "none", "gfcg": "none", "cfg": "cfg", "gfcg+cfg": "cfg", "atg": "atg", "gfcg+atg": "atg"}[method]
    scale = {"cfg": cfg_scale, "atg": atg_scale}.get(combine, 1.0)
    use_gfcg = method.startswith("gfcg")
    engine = GFCGEngine(GFCGConfig(desired_class=desired, tau=tau if use_gfcg else 0.0, alpha=alpha, beta=beta),
                        combine=combine, mode="additive", scale=scale)
    sigmas = edm_sigmas(steps)
    engine.begin(sigmas, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 1, 1, generator=g) * sigmas[0]
    nfe = 0
    for i in range(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])

        def run(branches, guide=False):
            nonlocal nfe
            nfe += sum(x.shape[0] if b.rows is None else int(b.rows.numel()) for b in branches)
            outs = []
            for b in branches:
                xs = x if b.rows is None else x[b.rows]
                cls = torch.full((xs.shape[0],), desired) if b.classes is None else b.classes
                outs.append(toy.denoise(xs, s, b.cond, cls, guide))
            return outs

        d = engine.denoise(x, s, run, toy.posterior_logits, (lambda b: run(b, True)) if combine == "atg" else None).denoised
        x = x + (x - d) / s * (s_next - s)
    pred = toy.posterior_logits(x).argmax(1)
    return x, float((pred == desired).float().mean()), nfe / n
