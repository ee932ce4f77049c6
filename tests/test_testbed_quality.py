"""The method works on the committed testbed: GFCG raises the evaluation classifier's class
precision over unguided sampling, with a one-sided 99 % confidence bound (paired samples: every
method starts from the same noise). The evaluation classifier never guides; its seeds, and this
test's noise seeds (3000+), are apart from the benchmark's (0+) and the sweep's (1000+)."""

from comfyui_gfcg.testbed.bench import Settings, class_rows, eval_outputs, run_method
from comfyui_gfcg.testbed.metrics import paired_difference_bound
from comfyui_gfcg.testbed.models import load_testbed

N_PER_CLASS = 20      # 200 paired samples per method
SEED = 3000


def test_gfcg_raises_evaluation_precision_over_unguided():
    settings = Settings()                    # the benchmark's sampler and the node defaults
    tb = load_testbed(settings.dtype)
    desired = class_rows(N_PER_CLASS)
    hits = {}
    for method in ("none", "gfcg"):
        out = run_method(tb, method, desired, settings, seed=SEED)
        hits[method] = eval_outputs(tb, out["images"])[0].argmax(1) == desired
    mean, lower = paired_difference_bound(hits["gfcg"], hits["none"], z=2.326)
    print(f"precision none {hits['none'].double().mean():.3f}, GFCG {hits['gfcg'].double().mean():.3f}; "
          f"difference {mean:+.3f}, one-sided 99 % lower bound {lower:+.3f}")
    assert lower > 0, (mean, lower)
