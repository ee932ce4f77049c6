"""What the GPU run's sync count found (issue "On the GPUs people have", item 8; docs/performance.md),
held on the CPU: each host read or host-to-device copy that the step loop did once per use is now
done once per decision, or never."""
import torch

from comfyui_gfcg.edm2 import latents
from comfyui_gfcg.guiders import core
from comfyui_gfcg.testbed.host_reads import HostReads


def test_a_decision_reads_its_rows_once_and_keeps_them():
    confused = torch.tensor([False, True, False, True, True])
    d = core.Decision(omega=torch.ones(5), reference=torch.tensor([0, 4, 0, 2, 4]), confused=confused,
                      p_des=torch.ones(5))
    with HostReads() as h:
        assert d.any_confused
        conf, rest = d.confused_rows, d.confident_rows
        groups = d.reference_groups()
        p, w, ref = d.host()
        assert d.confused_rows is conf and d.reference_groups() is groups
    assert h.total == 1, h.top()                                       # one host read for all of them
    assert conf.tolist() == [1, 3, 4] == confused.nonzero().squeeze(1).tolist() == d.confused_rows_host
    assert rest.tolist() == [0, 2] == d.confident_rows_host
    assert ref == [-1, 4, -1, 2, 4]
    # by class, ascending; positions within the confused rows, the same on the device and the host
    assert [(k, sel.tolist(), host) for k, sel, host in groups] == [(2, [1], [1]), (4, [0, 2], [0, 2])]
    x = torch.arange(5.0)
    torch.testing.assert_close(x[d.confused_rows], x[confused], rtol=0, atol=0)   # indexes as the mask
    with HostReads() as h:
        neutral = core.Decision.neutral(3)
        assert not neutral.any_confused and neutral.confused_rows.numel() == 0
        assert neutral.confident_rows.tolist() == [0, 1, 2] and neutral.reference_groups() == []
    assert h.total == 1     # the .tolist() of the line above; the neutral decision itself reads nothing


def test_deciding_reads_nothing_in_the_deterministic_and_fixed_modes():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(6, 10, generator=g) * 3, dim=1)
    desired = torch.tensor([1, 2, 3, 1, 2, 3])
    for mode, fixed in (("deterministic", None), ("fixed", 7)):
        with HostReads() as h:
            d = core.decide(probs, desired, 0.3, 4.0, 1.0, mode, fixed)
        assert h.total == 0, (mode, h.top())
        # the same decision as the masked form
        confused = probs.gather(1, desired.view(-1, 1)).squeeze(1) < 0.3
        assert 0 < int(confused.sum()) < 6
        want = torch.zeros(6, dtype=torch.long)
        want[confused] = 7 if fixed else core.deterministic_reference(probs[confused], desired[confused])
        assert torch.equal(d.reference, want) and torch.equal(d.confused, confused)
        p = probs.gather(1, desired.view(-1, 1)).squeeze(1)
        omega = torch.ones(6)
        omega[confused] = 1.0 + 4.0 * (1.0 - p[confused] / 0.3).clamp(min=0.0)
        torch.testing.assert_close(d.omega, omega, rtol=0, atol=0)


def test_a_scalar_scale_is_not_copied_to_the_device():
    like = torch.zeros(2, 3, 4, 4)
    assert core._per_sample(2.5, like) == 2.5 and not torch.is_tensor(core._per_sample(2.5, like))
    assert core._per_sample(torch.tensor([1.0, 2.0]), like).shape == (2, 1, 1, 1)


def test_edm2_latent_constants_are_made_once_per_device_and_usable_by_autograd():
    z = torch.zeros(1, 4, 2, 2)
    with torch.inference_mode():
        a = latents._v([0.1, 0.2, 0.3, 0.4], z)
    b = latents._v([0.1, 0.2, 0.3, 0.4], z)
    assert a is b and not a.is_inference()
    x = torch.ones(1, 4, 2, 2, requires_grad=True)
    (x * b).sum().backward()                                           # saved for backward: no error
    torch.testing.assert_close(x.grad[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3, 0.4]))
