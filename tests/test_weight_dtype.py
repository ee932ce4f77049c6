"""Classifier weights in fp16 / bf16 against fp32 (issue "On the GPUs people have", item 2): the
testbed's guidance classifier (the one GFCG runs in the testbed graphs) on 1000 held-out testbed
images, loaded through the pack's loader with each weight dtype. What GFCG reads of the classifier
is the desired class's probability against tau and the runner-up, so both are compared.

The figures are printed (``-s``) and asserted with a margin; docs/performance.md quotes a run."""
import os

import pytest
import torch

from comfyui_gfcg.classifiers.timm_classifier import WEIGHT_DTYPES, load_timm_classifier, weight_dtype_of
from comfyui_gfcg.common.errors import GFCGInputError
from comfyui_gfcg.testbed import dataset
from comfyui_gfcg.testbed.files import FILES, WEIGHTS_DIR

N = 1000


@pytest.fixture(scope="module")
def fp32_and_images():
    path = os.path.join(WEIGHTS_DIR, FILES["guidance_classifier"])
    clf = load_timm_classifier(path)
    images, _ = dataset.make_split(N, seed=dataset.SEEDS["classifier_val"] + 100)
    images = dataset.to_unit(images)
    with torch.no_grad():
        probs = torch.cat([clf(images[i:i + 250]).softmax(1) for i in range(0, N, 250)])
    return path, images, probs


def agreement(path, images, ref, dtype):
    clf = load_timm_classifier(path, dtype=dtype)
    assert clf.dtype == dtype and all(p.dtype == dtype for p in clf.net.parameters())
    with torch.no_grad():
        probs = torch.cat([clf(images[i:i + 250]).softmax(1) for i in range(0, N, 250)])
    assert probs.dtype == torch.float32                      # logits come back in fp32
    top2_ref, top2 = ref.topk(2, 1).indices, probs.topk(2, 1).indices
    return {"top1": float((top2[:, 0] == top2_ref[:, 0]).float().mean()),
            "runner_up": float((top2[:, 1] == top2_ref[:, 1]).float().mean()),
            "max_abs_p": float((probs - ref).abs().max()),
            "mean_abs_p": float((probs - ref).abs().mean()),
            # GFCG's decision at tau 0.5 on the top class
            "decision": float(((probs.max(1).values >= 0.5) == (ref.max(1).values >= 0.5)).float().mean())}


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_precision_classifier_agrees_with_fp32(fp32_and_images, name):
    path, images, ref = fp32_and_images
    a = agreement(path, images, ref, weight_dtype_of(name))
    print(f"\n{name} vs fp32 on {N} testbed images: {a}")
    assert a["top1"] >= 0.99 and a["decision"] >= 0.99
    assert a["mean_abs_p"] < (2e-3 if name == "fp16" else 1e-2)


def test_weight_dtype_names():
    assert set(WEIGHT_DTYPES) == {"fp32", "fp16", "bf16"}
    with pytest.raises(GFCGInputError, match="^weight_dtype: 'fp8'"):
        weight_dtype_of("fp8")
