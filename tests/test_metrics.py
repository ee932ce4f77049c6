"""The benchmark's metrics against cases with known answers."""
import math

import pytest
import torch

from comfyui_gfcg.testbed.metrics import (class_precision, frechet_distance, knn_radii, paired_difference_bound,
                                          precision_recall)


def test_class_precision():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    assert class_precision(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    n, d = 200000, 3
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0 + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # N(0, I) vs N(m, 4I): |m|^2 + d (1 + 4 - 2 * 2) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # non-commuting covariances: symmetric in its arguments
    c = a @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, 2.0]], dtype=torch.float64)
    assert frechet_distance(a, c) == pytest.approx(frechet_distance(c, a), rel=1e-6)


def test_knn_radii_and_precision_recall():
    pts = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(pts, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    real = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    p, r = precision_recall(real, real.clone(), k=3)
    assert p == 1.0 and r == 1.0
    # fakes collapsed onto one real point: precise, but cover almost none of the real manifold
    fake = real[:1].repeat(500, 1) + 1e-4 * torch.randn(500, 2, generator=torch.Generator().manual_seed(2))
    p, r = precision_recall(real, fake, k=3)
    assert p == 1.0 and r < 0.05
    # fakes far away: neither
    p, r = precision_recall(real, real + 100.0, k=3)
    assert p == 0.0 and r == 0.0


def test_paired_difference_bound():
    a = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 1, 1] * 10)
    b = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0, 1, 1] * 10)
    mean, lo = paired_difference_bound(a, b)
    d = (a - b).double()
    assert mean == pytest.approx(0.3)
    assert lo == pytest.approx(0.3 - 2.326 * float(d.std()) / math.sqrt(100))
    assert 0 < lo < mean
