"""Off-the-shelf classifier guidance (EluCD): the framework-free formulas and engine."""
import math

import pytest
import torch

from comfyui_gfcg.guiders.config import GFCGInputError
from comfyui_gfcg.guiders.gradient import (CGConfig, CGEngine, denoised_term, guidance_gradient,
                                           guidance_objective, guidance_weight, noisy_input, rms, rms_normalise,
                                           softplus_copy)


def tiny_classifier(k=5, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(inplace=True),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, k)).double()


@pytest.mark.parametrize("tau1,tau2", [(1.0, 1.0), (1.0, 0.5), (1.0, 0.0), (2.0, 0.7)])
def test_gradient_matches_per_class_jacobian(tau1, tau2):
    """g = tau1 grad f_y - tau2 sum_k softmax(tau2 f)_k grad f_k, built from the full Jacobian of the
    logits (an independent computation), for every sample of a batch at once."""
    net = tiny_classifier()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    g, logits = guidance_gradient(net, x, y, tau1, tau2)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda z: net(z.unsqueeze(0))[0], x[b])   # [K, 3, 6, 6]
        f = net(x[b:b + 1])[0].detach()
        w = torch.softmax(tau2 * f, 0)
        expect = tau1 * jac[y[b]] - tau2 * (w.view(-1, 1, 1, 1) * jac).sum(0)
        torch.testing.assert_close(g[b].double(), expect, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(logits[b], f)


def test_gradient_finite_difference_and_no_leak_into_producer():
    net = tiny_classifier()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([1, 2])
    g, _ = guidance_gradient(net, x, y, 1.0, 0.5)
    d = torch.randn_like(x)
    eps = 1e-6
    j = lambda z: guidance_objective(net(z), y, 1.0, 0.5).sum()
    with torch.no_grad():
        fd = (j(x + eps * d) - j(x - eps * d)) / (2 * eps)
    assert abs(float(fd) - float((g * d).sum())) < 1e-6 * max(1.0, abs(float(fd)))
    # x0 produced by a differentiable op: no gradient flows back to the producer, graph is freed
    w = torch.randn(1, requires_grad=True)
    x0 = x * w
    g2, _ = guidance_gradient(net, x0, y, 1.0, 0.5)
    assert w.grad is None and g2.grad_fn is None and not g2.requires_grad


def test_gradient_under_inference_mode():
    """ComfyUI runs nodes under torch.inference_mode(); the gradient must still be computed."""
    with torch.inference_mode():
        net, _ = softplus_copy(tiny_classifier().float(), 5.0)   # made while inference mode is on
        x = torch.randn(2, 3, 6, 6)
        g, _ = guidance_gradient(net, x, torch.tensor([0, 1]), 1.0, 0.0)
    assert g.abs().sum() > 0


def test_objective_limits():
    f = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([0])
    torch.testing.assert_close(guidance_objective(f, y, 1.0, 1.0), torch.log_softmax(f, 1)[:, 0])
    torch.testing.assert_close(guidance_objective(f, y, 1.0, 0.0), f[:, 0] - math.log(3))
    big = torch.tensor([[3000.0, 2990.0, 0.0]])
    assert torch.isfinite(guidance_objective(big, y, 1.0, 0.5)).all()


def _relu_calls(module, x):
    """Names of relu functions that run in ``module(x)``, seen at torch's function dispatch."""
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if "relu" in name.lower():
                seen.append(name)
            return func(*args, **(kwargs or {}))

    with Spy(), torch.no_grad():
        module(x)
    return seen


def test_softplus_replaces_every_relu_of_a_timm_resnet_and_nothing_else():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    before = [(n, type(m)) for n, m in net.named_modules()]
    n_relu = sum(t is torch.nn.ReLU for _, t in before)
    x = torch.rand(2, 3, 64, 64)
    assert len(_relu_calls(net, x)) >= n_relu > 0     # the original applies ReLU (some modules twice)

    sp, n = softplus_copy(net, 5.0)
    after = [(name, type(m)) for name, m in sp.named_modules()]
    assert n == n_relu
    assert [a for a, _ in after] == [a for a, _ in before]                 # same tree
    for (name, t0), (_, t1) in zip(before, after):
        assert t1 is (torch.nn.Softplus if t0 is torch.nn.ReLU else t0), name   # only ReLUs changed
    assert all(m.beta == 5.0 for m in sp.modules() if isinstance(m, torch.nn.Softplus))
    assert _relu_calls(sp, x) == []                                          # no ReLU runs any more
    assert [type(m) for m in net.modules()].count(torch.nn.ReLU) == n_relu  # the input is untouched
    for (k, a), (_, b) in zip(net.state_dict().items(), sp.state_dict().items()):
        assert torch.equal(a, b), k                                          # same weights
    # Softplus_beta -> ReLU as beta grows; beta = inf keeps ReLU
    big, _ = softplus_copy(net, 1e4)
    with torch.no_grad():
        torch.testing.assert_close(big(x), net(x), atol=5e-3, rtol=0)
    same, n_inf = softplus_copy(net, math.inf)
    assert n_inf == 0 and sum(isinstance(m, torch.nn.ReLU) for m in same.modules()) == n_relu
    with pytest.raises(GFCGInputError, match="softplus_beta"):
        softplus_copy(net, 0.0)


def test_weight_schedule_matches_official_numbers():
    """N = 10, s = 0.004, gamma = 0.3: the official EDM script's weights (see the reference notes)."""
    ws = [guidance_weight(i, 10, 0.004, 0.3) for i in range(10)]
    expect = [0.00400, 0.00401, 0.00398, 0.00388, 0.00369, 0.00338, 0.00296, 0.00243, 0.00180, 0.00110]
    assert [round(w, 5) for w in ws] == expect
    assert guidance_weight(0, 18, 1.0, 0.0) == 1.0
    assert guidance_weight(17, 18, 1.0, 0.0) == pytest.approx(2 / 19)


def test_rms_normalisation():
    g = torch.randn(3, 4, 5, 5)
    g[1] = 0
    ref = torch.randn(3, 4, 5, 5) * torch.tensor([1.0, 2.0, 7.0]).view(3, 1, 1, 1)
    out = rms_normalise(g, ref)
    torch.testing.assert_close(rms(out)[[0, 2]], rms(ref)[[0, 2]])
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # direction kept
    cos = torch.nn.functional.cosine_similarity(out[0].flatten(), g[0].flatten(), dim=0)
    assert cos > 0.9999
    x = torch.tensor([[[[3.0]]], [[[0.5]]]])
    torch.testing.assert_close(noisy_input(x), torch.tensor([[[[1.0]]], [[[0.5]]]]))


def test_denoised_term_reproduces_the_official_euler_update():
    """Euler with D + Delta equals the official 'x += delta, then Euler with D' (D held fixed)."""
    torch.manual_seed(0)
    x, d, delta = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), 0.1 * torch.randn(2, 3, 4, 4)
    s, s_next = 2.5, 1.7
    term = denoised_term(delta, s, s, s_next)
    ours = x + (s_next - s) * (x - (d + term)) / s
    official = (x + delta) + (s_next - s) * (x - d) / s
    torch.testing.assert_close(ours, official)
    with pytest.raises(ValueError):
        denoised_term(delta, 1.0, 1.0, 1.0)


def test_config_checks():
    with pytest.raises(GFCGInputError, match="scale"):
        CGConfig(scale=-1)
    with pytest.raises(GFCGInputError, match="classifier_input"):
        CGConfig(classifier_input="latent")
    with pytest.raises(GFCGInputError, match="softplus_beta"):
        CGConfig(softplus_beta=0)
    assert CGConfig(softplus_beta=math.inf).softplus_beta == math.inf


def _fake_main(x, branches):
    """A plain callable 'denoiser': positive -> 0.5 x, negative -> 0.25 x."""
    return [(0.5 if b.cond == "positive" else 0.25) * x for b in branches]


def test_engine_terms_and_cfg_stacking():
    net = tiny_classifier().float()
    sig = torch.tensor([3.0, 1.0, 0.3, 0.0])
    x = torch.randn(2, 3, 6, 6)
    calls = []

    def main(branches):
        calls.append([b.cond for b in branches])
        return _fake_main(x, branches)

    eng = CGEngine(CGConfig(desired_class=2, scale=0.1, gamma=0.0), scale=1.0)
    eng.begin(sig)
    res = eng.denoise(x, 3.0, main, net)
    assert calls == [["positive"]]                         # w = 1: no negative branch
    g, _ = guidance_gradient(net, 0.5 * x, torch.tensor([2, 2]), 1.0, 0.0)
    expect = 0.5 * x + 3.0 / 2.0 * 0.1 * rms_normalise(g, x)
    torch.testing.assert_close(res.denoised, expect)
    assert eng.trace[0].step == 0 and eng.trace[0].weight == pytest.approx(0.1)

    calls.clear()
    eng2 = CGEngine(CGConfig(desired_class=2, scale=0.0), scale=3.0)
    eng2.begin(sig)
    res2 = eng2.denoise(x, 1.0, main, net)
    assert calls == [["positive", "negative"]]             # both branches in one request list
    torch.testing.assert_close(res2.denoised, 0.25 * x + 3.0 * (0.5 * x - 0.25 * x))

    eng3 = CGEngine(CGConfig(scale=0.2, classifier_input="noisy"), desired_rows=torch.tensor([0, 4]))
    eng3.begin(sig)
    res3 = eng3.denoise(x, 1.0, lambda b: _fake_main(x, b), net)   # step 1: w = 0.2 * 3/4, dt = 0.7
    w1 = 0.2 * (0.75 + 0.3 * math.sin(math.pi / 3))
    g3, _ = guidance_gradient(net, noisy_input(x), torch.tensor([0, 4]), 1.0, 0.0)
    torch.testing.assert_close(res3.denoised, 0.5 * x + 1.0 / 0.7 * w1 * rms_normalise(g3, x))
    with pytest.raises(RuntimeError, match="begin"):
        CGEngine(CGConfig()).denoise(x, 1.0, lambda b: _fake_main(x, b), net)


def test_engine_on_autoguidance():
    """With ``evaluate_guide`` the base is autoguidance's G + w (D1 - G): the main model gives only
    its positive branch, the guide model its positive branch, and the classifier sees that base."""
    net = tiny_classifier().float()
    sig = torch.tensor([3.0, 1.0, 0.3, 0.0])
    x = torch.randn(2, 3, 6, 6)
    main_calls, guide_calls = [], []

    def main(branches):
        main_calls.append([b.cond for b in branches])
        return _fake_main(x, branches)

    def guide(branches):
        guide_calls.append([b.cond for b in branches])
        return [0.4 * x for _ in branches]

    eng = CGEngine(CGConfig(desired_class=1, scale=0.0), scale=2.5)
    eng.begin(sig)
    res = eng.denoise(x, 1.0, main, net, evaluate_guide=guide)
    assert main_calls == [["positive"]] and guide_calls == [["positive"]]
    torch.testing.assert_close(res.denoised, 0.4 * x + 2.5 * (0.5 * x - 0.4 * x))

    eng2 = CGEngine(CGConfig(desired_class=1, scale=0.1, gamma=0.0), scale=2.5)
    eng2.begin(sig)
    res2 = eng2.denoise(x, 3.0, main, net, evaluate_guide=guide)
    base = 0.4 * x + 2.5 * (0.5 * x - 0.4 * x)
    g, _ = guidance_gradient(net, base, torch.tensor([1, 1]), 1.0, 0.0)
    torch.testing.assert_close(res2.denoised, base + 3.0 / 2.0 * 0.1 * rms_normalise(g, x))

    guide_calls.clear()
    eng3 = CGEngine(CGConfig(desired_class=1, scale=0.0), scale=1.0)   # w = 1: the guide is not needed
    eng3.begin(sig)
    torch.testing.assert_close(eng3.denoise(x, 1.0, main, net, evaluate_guide=guide).denoised, 0.5 * x)
    assert guide_calls == []
