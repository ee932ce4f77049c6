"""What the GPU run's sync count found (issue "On the GPUs people have", item 8; docs/performance.md),
held on the CPU: each host read or host-to-device copy that the step loop did once per use is now
done once per decision, or never."""
import torch

from comfyui_gfcg.edm2 import latents
from comfyui_gfcg.guiders import core


def test_a_decision_reads_its_rows_once_and_keeps_them(monkeypatch):
    confused = torch.tensor([False, True, False, True, True])
    d = core.Decision(omega=torch.ones(5), reference=torch.tensor([0, 4, 0, 2, 4]), confused=confused,
                      p_des=torch.ones(5))
    reads = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: reads.append(1) or real_sum(self, *a, **k))
    assert d.any_confused
    assert d.confused_rows.tolist() == [1, 3, 4] == confused.nonzero().squeeze(1).tolist()
    assert d.confident_rows.tolist() == [0, 2]
    assert d.confused_rows is d.confused_rows and len(reads) == 1      # one host read for all of them
    x = torch.arange(5.0)
    torch.testing.assert_close(x[d.confused_rows], x[confused], rtol=0, atol=0)   # indexes as the mask
    neutral = core.Decision.neutral(3)
    assert not neutral.any_confused and neutral.confused_rows.numel() == 0


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
