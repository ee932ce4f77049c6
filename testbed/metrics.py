"""Sample-quality metrics of the testbed benchmark, in plain PyTorch (float64 where it matters).

* class precision: the evaluation classifier's top-1 agrees with the requested class;
* pair accuracy: its top-1 falls in the requested class's pair (the right kind of shape);
* FD: the Frechet distance between Gaussians fitted to penultimate features;
* precision / recall: the k-NN manifold estimates of Kynkaenniemi et al. (2019);
* a lower confidence bound for a paired difference of two precisions (the CI test's bound).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch


def class_precision(logits: torch.Tensor, desired: torch.Tensor) -> float:
    """mean_i [argmax_k logits_ik == desired_i]."""
    return float((logits.argmax(1) == desired.to(logits.device)).double().mean())


def pair_accuracy(logits: torch.Tensor, desired: torch.Tensor, pair_of: torch.Tensor) -> float:
    """mean_i [pair(argmax_k logits_ik) == pair(desired_i)], ``pair_of[k]``: the pair index of class k."""
    pair_of = pair_of.to(logits.device)
    return float((pair_of[logits.argmax(1)] == pair_of[desired.to(logits.device)]).double().mean())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD = ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a^(1/2) C_b C_a^(1/2))^(1/2)) for features [N, D].

    The matrix square root is taken through the symmetric form C_a^(1/2) C_b C_a^(1/2), whose
    eigenvalues are those of C_a C_b, clipped at 0 against round-off."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    ea, va = torch.linalg.eigh(ca)
    sqrt_a = (va * ea.clamp(min=0).sqrt()) @ va.T
    mid = torch.linalg.eigvalsh(sqrt_a @ cb @ sqrt_a).clamp(min=0)
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * mid.sqrt().sum())


def knn_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = torch.cdist(feats.double(), feats.double())
    return d.kthvalue(k + 1, dim=1).values     # the 1st smallest is the point itself (0)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> Tuple[float, float]:
    """Kynkaenniemi et al. 2019, with manifolds as unions of k-NN balls:

    precision = (1/|F|) sum_f [exists r: ||f - r|| <= rad_k(r)]   (fakes inside the real manifold)
    recall    = (1/|R|) sum_r [exists f: ||r - f|| <= rad_k(f)]   (reals inside the fake manifold)
    """
    real, fake = real.double(), fake.double()
    rr, rf = knn_radii(real, k), knn_radii(fake, k)
    d = torch.cdist(fake, real)                            # [F, R]
    precision = (d <= rr[None, :]).any(1).double().mean()
    recall = (d <= rf[:, None]).any(0).double().mean()
    return float(precision), float(recall)


def paired_difference_bound(hit_a: torch.Tensor, hit_b: torch.Tensor, z: float = 2.326) -> Tuple[float, float]:
    """Mean and one-sided lower confidence bound of mean(hit_a - hit_b) over paired samples.

    The pairs share their initial noise, so the differences d_i = a_i - b_i are i.i.d. across i:
    bound = mean(d) - z * sd(d) / sqrt(n)   (normal approximation; z = 2.326 is one-sided 99 %)."""
    d = hit_a.double() - hit_b.double()
    n = d.numel()
    mean = float(d.mean())
    sd = float(d.std(unbiased=True)) if n > 1 else math.inf
    return mean, mean - z * sd / math.sqrt(n)
