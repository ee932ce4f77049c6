"""The memory study's padding wrapper: rows rounded up to a bucket, the padding's outputs dropped,
and the row counts a model saw recorded (framework-free; plain callables)."""
import pytest
import torch

from comfyui_gfcg.testbed.perf_memory import Bucketed, bucket_rows


def test_bucket_rows_rounds_up_to_a_multiple():
    assert [bucket_rows(n, 8) for n in (1, 8, 9, 64, 65, 77)] == [8, 8, 16, 64, 72, 80]
    assert bucket_rows(13, 1) == 13
    with pytest.raises(ValueError, match="quantum"):
        bucket_rows(3, 0)


def test_padding_changes_no_output_row_and_records_the_shapes():
    seen = []

    def net(x, sigma, labels):                  # row-wise, like a denoiser with per-row labels
        seen.append(x.shape[0])
        return x * sigma + labels.sum(1, keepdim=True)

    w = Bucketed(net, quantum=8)
    for n in (64, 64 + 13, 13, 64 + 8):
        x, lab = torch.randn(n, 3), torch.randn(n, 10)
        assert torch.equal(w(x, 0.5, lab), net(x, 0.5, lab))
    assert seen[::2] == [64, 80, 16, 72]        # what the model ran on (padded), then the plain call
    assert w.shapes == {64, 80, 16, 72} and w.rows == 64 + 77 + 13 + 72 and w.padded == 3 + 3


def test_without_quantum_it_only_counts_and_passes_attributes_through():
    class Net:
        config = "edm2"

        def __call__(self, x):
            return x + 1

    w = Bucketed(Net())
    x = torch.zeros(5, 2)
    assert torch.equal(w(x), x + 1) and w.padded == 0 and w.shapes == {5}
    assert w.config == "edm2"
