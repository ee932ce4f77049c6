"""The method works on the committed testbed: GFCG raises the evaluation classifier's class
precision over unguided sampling, and GFCG on autoguidance over autoguidance alone, each with a
one-sided 99 % confidence bound (paired samples: every method starts from the same noise). The
evaluation classifier never guides; its seeds, and this test's noise seeds (3000+), are apart
from the benchmark's (0+) and the sweep's (1000+)."""
import pytest

from comfyui_gfcg.testbed.bench import Settings, class_rows, eval_outputs, run_method
from comfyui_gfcg.testbed.metrics import paired_difference_bound
from comfyui_gfcg.testbed.models import load_testbed

N_PER_CLASS = 20      # 200 paired samples per method
SEED = 3000


@pytest.fixture(scope="module")
def hits():
    settings = Settings()                    # the benchmark's sampler and the node defaults
    tb = load_testbed(settings.dtype)
    desired = class_rows(N_PER_CLASS)
    out = {}
    for method in ("none", "gfcg", "atg", "gfcg+atg"):
        images = run_method(tb, method, desired, settings, seed=SEED)["images"]
        out[method] = eval_outputs(tb, images)[0].argmax(1) == desired
    return out


@pytest.mark.parametrize("a,b", [("gfcg", "none"), ("gfcg+atg", "atg")])
def test_gfcg_raises_evaluation_precision(hits, a, b):
    mean, lower = paired_difference_bound(hits[a], hits[b], z=2.326)
    print(f"precision {b} {hits[b].double().mean():.3f}, {a} {hits[a].double().mean():.3f}; "
          f"difference {mean:+.3f}, one-sided 99 % lower bound {lower:+.3f}")
    assert lower > 0, (mean, lower)
